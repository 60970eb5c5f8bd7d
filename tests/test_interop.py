"""Interop: independent clients round-trip messages through the echo server.

Three peers that share no code with lowmemws: wsproto driving a raw socket, websocket-client,
and headless Chromium running JavaScript's WebSocket. Each sends text and binary messages from
0 B to 1 MiB (text made of 2-, 3- and 4-byte UTF-8 characters, including exactly 70,000 bytes)
and must get each one back unchanged, with the same type. A burst of 20 messages is sent
before any reply is read, and must come back complete and in order.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import struct
from collections.abc import Iterator
from typing import Any

import pytest
import websocket

from tests.support.chromium import Chromium, find_chromium
from tests.support.ci import skip_or_fail
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.wsproto_client import WsprotoClient

MiB = 1024 * 1024
SIZES = (0, 1, 2, 125, 126, 127, 65535, 65536, 70_000, MiB)
WIDE_CHARACTERS = ("é", "€", "😀")  # 2, 3 and 4 bytes in UTF-8
FILLERS = {1: "a", 2: "é", 3: "€"}


def utf8_text(size: int) -> str:
    """utf8_text returns text of exactly size UTF-8 bytes, mostly multi-byte characters."""
    pattern = "".join(WIDE_CHARACTERS)
    repeats, remainder = divmod(size, len(pattern.encode()))
    text = pattern * repeats
    while remainder:
        width = min(remainder, 3)
        text += FILLERS[width]
        remainder -= width
    assert len(text.encode()) == size
    return text


def binary_data(size: int) -> bytes:
    """binary_data returns size reproducible pseudo-random bytes (every byte value occurs)."""
    return random.Random(size).randbytes(size)


def payload(kind: str, size: int) -> str | bytes:
    return utf8_text(size) if kind == "text" else binary_data(size)


PAYLOADS = [
    pytest.param(kind, size, id=f"{kind}-{size}B") for kind in ("text", "binary") for size in SIZES
]


def burst() -> list[str | bytes]:
    """burst returns 20 messages, text and binary alternating, 0 B to 64 KiB (~330 KB)."""
    sizes = [0, 1, 7, 125, 126, 127, 200, 1000, 4096, 10_000]
    sizes += [65535, 65536, 3, 70_000, 15, 300, 2048, 9, 65_000, 1]
    return [payload("text" if i % 2 else "binary", size) for i, size in enumerate(sizes)]


def describe(message: str | bytes) -> str:
    return f"{type(message).__name__} of {len(message)} items"


# -- wsproto over a raw socket -------------------------------------------------------------


@pytest.mark.parametrize("kind, size", PAYLOADS)
def test_wsproto_round_trip(echo_server: tuple[str, int], kind: str, size: int) -> None:
    message = payload(kind, size)
    with WsprotoClient(*echo_server) as client:
        client.send_message(message)
        echoed = client.receive_message()
        assert type(echoed) is type(message), describe(echoed)
        assert echoed == message
        assert client.close().code == 1000


def test_wsproto_burst_of_20_before_reading(echo_server: tuple[str, int]) -> None:
    messages = burst()
    with WsprotoClient(*echo_server) as client:
        for message in messages:
            client.send_message(message)
        echoed = [client.receive_message() for _ in messages]
    assert [type(m) for m in echoed] == [type(m) for m in messages]
    assert echoed == messages


def test_wsproto_ping_gets_pong_with_same_payload(echo_server: tuple[str, int]) -> None:
    with WsprotoClient(*echo_server) as client:
        client.send_ping(b"are you there? \x00\xff")
        assert client.receive_pong() == b"are you there? \x00\xff"
        client.send_ping(b"")
        assert client.receive_pong() == b""


@pytest.mark.parametrize("code, reason", [(1000, ""), (1001, "going"), (4001, "custom é")])
def test_wsproto_close_handshake_echoes_code(
    echo_server: tuple[str, int], code: int, reason: str
) -> None:
    with WsprotoClient(*echo_server) as client:
        client.send_message("last words")
        assert client.receive_message() == "last words"
        assert client.close(code, reason).code == code


# -- websocket-client ----------------------------------------------------------------------


@pytest.fixture
def ws_client(echo_server: tuple[str, int]) -> Iterator[websocket.WebSocket]:
    host, port = echo_server
    client = websocket.create_connection(f"ws://{host}:{port}/", timeout=10)
    try:
        yield client
    finally:
        client.shutdown()


def receive(client: websocket.WebSocket) -> str | bytes:
    """receive returns the next message, str for a text frame and bytes for a binary one."""
    opcode, data = client.recv_data()
    if opcode == websocket.ABNF.OPCODE_TEXT:
        return bytes(data).decode("utf-8")
    assert opcode == websocket.ABNF.OPCODE_BINARY, f"unexpected opcode {opcode}"
    return bytes(data)


def send(client: websocket.WebSocket, message: str | bytes) -> None:
    if isinstance(message, str):
        client.send(message)
    else:
        client.send_binary(message)


@pytest.mark.parametrize("kind, size", PAYLOADS)
def test_websocket_client_round_trip(ws_client: websocket.WebSocket, kind: str, size: int) -> None:
    message = payload(kind, size)
    send(ws_client, message)
    echoed = receive(ws_client)
    assert type(echoed) is type(message), describe(echoed)
    assert echoed == message


def test_websocket_client_burst_of_20_before_reading(ws_client: websocket.WebSocket) -> None:
    messages = burst()
    for message in messages:
        send(ws_client, message)
    assert [receive(ws_client) for _ in messages] == messages


def test_websocket_client_ping_gets_pong_with_same_payload(ws_client: websocket.WebSocket) -> None:
    ws_client.ping(b"ping \x01\x02")
    frame = ws_client.recv_frame()
    assert frame.opcode == websocket.ABNF.OPCODE_PONG
    assert frame.data == b"ping \x01\x02"


@pytest.mark.parametrize("code", [1000, 3000, 4999])
def test_websocket_client_close_handshake_echoes_code(
    ws_client: websocket.WebSocket, code: int
) -> None:
    ws_client.send_close(code, b"bye")
    frame = ws_client.recv_frame()
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    assert struct.unpack("!H", frame.data[:2])[0] == code


# -- headless Chromium ---------------------------------------------------------------------

ROUND_TRIP_JS = """
(async () => {
  const outgoing = %(outgoing)s;
  const toBytes = (b64) => Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const toBase64 = (buffer) => {
    const bytes = new Uint8Array(buffer);
    let text = "";
    for (let i = 0; i < bytes.length; i += 0x8000) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
    }
    return btoa(text);
  };
  const ws = new WebSocket(%(url)s);
  ws.binaryType = "arraybuffer";
  const replies = [];
  const allEchoed = new Promise((resolve, reject) => {
    ws.onmessage = (event) => {
      replies.push(event.data);
      if (replies.length === outgoing.length) resolve();
    };
    ws.onclose = (event) => reject(new Error("closed early with code " + event.code));
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("could not connect to " + ws.url));
  });
  for (const m of outgoing) ws.send(m.kind === "text" ? m.data : toBytes(m.b64));
  if (outgoing.length) await allEchoed;
  const closed = new Promise((resolve) => {
    ws.onclose = (event) => resolve({code: event.code, wasClean: event.wasClean});
  });
  ws.close(%(close_code)d);
  const close = await closed;
  return {
    close,
    extensions: ws.extensions,
    replies: replies.map((r) => typeof r === "string"
      ? {kind: "text", data: r}
      : {kind: "binary", b64: toBase64(r)}),
  };
})()
"""


def to_js(message: str | bytes) -> dict[str, str]:
    if isinstance(message, str):
        return {"kind": "text", "data": message}
    return {"kind": "binary", "b64": base64.b64encode(message).decode()}


def from_js(reply: dict[str, str]) -> str | bytes:
    if reply["kind"] == "text":
        return reply["data"]
    return base64.b64decode(reply["b64"])


@pytest.fixture(scope="module")
def browser() -> Iterator[Chromium]:
    if find_chromium() is None:
        skip_or_fail("headless Chromium is not installed (Debian: apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


def browser_session(
    browser: Chromium, echo_server: tuple[str, int], messages: list[str | bytes], close_code: int
) -> dict[str, Any]:
    """browser_session sends messages from the page, then closes; returns what the page saw:
    replies (as JSON), close, and extensions (the page's ws.extensions)."""
    host, port = echo_server
    script = ROUND_TRIP_JS % {
        "outgoing": json.dumps([to_js(m) for m in messages]),
        "url": json.dumps(f"ws://{host}:{port}/"),
        "close_code": close_code,
    }
    result: dict[str, Any] = browser.evaluate(script, timeout=60)
    return result


def browser_round_trip(
    browser: Chromium, echo_server: tuple[str, int], messages: list[str | bytes], close_code: int
) -> tuple[list[str | bytes], dict[str, object]]:
    """browser_round_trip sends messages from the page, then closes; returns echoes and close."""
    result = browser_session(browser, echo_server, messages, close_code)
    return [from_js(reply) for reply in result["replies"]], result["close"]


@pytest.mark.parametrize("kind, size", PAYLOADS)
def test_chromium_round_trip(
    browser: Chromium, echo_server: tuple[str, int], kind: str, size: int
) -> None:
    message = payload(kind, size)
    echoed, close = browser_round_trip(browser, echo_server, [message], 1000)
    assert [type(m) for m in echoed] == [type(message)]
    assert echoed == [message]
    assert close == {"code": 1000, "wasClean": True}


def test_chromium_burst_of_20_before_reading(
    browser: Chromium, echo_server: tuple[str, int]
) -> None:
    messages = burst()
    echoed, _ = browser_round_trip(browser, echo_server, messages, 1000)
    assert echoed == messages


def test_chromium_close_handshake_echoes_code(
    browser: Chromium, echo_server: tuple[str, int]
) -> None:
    _, close = browser_round_trip(browser, echo_server, ["hello"], 4321)
    assert close == {"code": 4321, "wasClean": True}


def test_chromium_negotiates_permessage_deflate_both_ways_up_to_1_mib(
    browser: Chromium, echo_server: tuple[str, int]
) -> None:
    """Chromium offers permessage-deflate; client_max_window_bits and accepts the server's
    answer (both no-context-takeover flags): compressed text and binary messages up to 1 MiB
    go both ways, each compressed on its own."""
    before = fetch_metrics(*echo_server)
    row = '{"id": 12345, "subject": "Quarterly report", "unread": true} '
    messages: list[str | bytes] = [
        (row * 20000)[: 1 << 20],
        (row.encode() * 20000)[: 1 << 20],
        "ü€ " + row * 30,
        bytes(range(256)) * 64,
        binary_data(70_000),  # incompressible: sent plain by both sides
    ]
    result = browser_session(browser, echo_server, messages, 1000)
    assert result["extensions"].startswith("permessage-deflate")
    assert "server_no_context_takeover" in result["extensions"]
    assert "client_no_context_takeover" in result["extensions"]
    assert [from_js(reply) for reply in result["replies"]] == messages
    after = fetch_metrics(*echo_server)

    def grew(name: str) -> float:
        return metric_value(after, name) - metric_value(before, name)

    assert grew("lowmemws_messages_inflated_total") >= 4  # Chromium compressed them
    assert grew("lowmemws_messages_deflated_total") >= 4  # and so did the server
    assert grew("lowmemws_deflate_out_bytes_total") * 10 < grew("lowmemws_deflate_in_bytes_total")


# -- plain HTTP on the same port -----------------------------------------------------------


def test_healthz_returns_200_ok(echo_server: tuple[str, int]) -> None:
    connection = http.client.HTTPConnection(*echo_server, timeout=10)
    try:
        connection.request("GET", "/healthz")
        response = connection.getresponse()
        assert (response.status, response.read().strip()) == (200, b"ok")
    finally:
        connection.close()
