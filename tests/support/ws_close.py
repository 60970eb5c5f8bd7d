"""What websocket-client connections see when the server closes them."""

from __future__ import annotations

import struct
from collections.abc import Iterable

import websocket


def expect_close_frames(clients: Iterable[websocket.WebSocket], code: int) -> None:
    """expect_close_frames reads the next frame of every client, checks it is a close frame
    with code, and answers it with the same code."""
    for client in clients:
        frame = client.recv_frame()
        assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
        assert struct.unpack("!H", frame.data[:2])[0] == code
        client.send_close(code)
