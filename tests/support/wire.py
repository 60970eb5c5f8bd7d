"""Reading raw sockets in tests: read until a marker has arrived, or the peer closed."""

from __future__ import annotations

import socket
import time


def read_until(
    sock: socket.socket,
    marker: bytes,
    *,
    chunk: int = 4096,
    limit: int | None = None,
    timeout: float | None = None,
) -> bytes:
    """read_until reads until marker has arrived (or EOF) and returns all bytes read.

    chunk is the most one recv() asks for; with limit, reading also stops once that many bytes
    have arrived; with timeout, the whole read is bounded by it (socket.timeout past it),
    otherwise each recv() by the socket's own timeout.
    """
    data = b""
    deadline = None if timeout is None else time.monotonic() + timeout
    while marker not in data and (limit is None or len(data) < limit):
        if deadline is not None:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
        got = sock.recv(chunk)
        if not got:
            break
        data += got
    return data
