"""Messages as the application receives them: assembled from fragments, empty or not."""

from __future__ import annotations

import websocket

import lowmemws


def _echo() -> lowmemws.Gateway:
    gw = lowmemws.Gateway("127.0.0.1", 0)

    @gw.on_message
    def echo(conn: lowmemws.Connection, message: str | bytes) -> None:
        conn.send(message)

    return gw.start()


def _send_fragments(ws: websocket.WebSocket, opcode: int, parts: list[bytes]) -> None:
    for i, part in enumerate(parts):
        first, last = i == 0, i == len(parts) - 1
        frame = websocket.ABNF(
            fin=1 if last else 0,
            opcode=opcode if first else websocket.ABNF.OPCODE_CONT,
            data=part,
        )
        ws.send_frame(frame)


def test_a_message_of_empty_fragments_arrives_empty() -> None:
    gw = _echo()
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{gw.port}/", timeout=5)
        _send_fragments(ws, websocket.ABNF.OPCODE_TEXT, [b"", b"", b""])
        assert ws.recv() == ""
        _send_fragments(ws, websocket.ABNF.OPCODE_BINARY, [b"", b""])
        assert ws.recv() == b""
        ws.close()
    finally:
        gw.stop()


def test_fragments_are_joined_in_order_with_utf8_split_between_them() -> None:
    gw = _echo()
    try:
        ws = websocket.create_connection(f"ws://127.0.0.1:{gw.port}/", timeout=5)
        text = "héllo wörld €"
        raw = text.encode()
        _send_fragments(ws, websocket.ABNF.OPCODE_TEXT, [raw[:2], raw[2:9], b"", raw[9:]])
        assert ws.recv() == text
        ws.close()
    finally:
        gw.stop()
