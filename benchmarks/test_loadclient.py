"""Tests of the C load-client worker (loadclient.c) against a scripted server in this process.

Run with: pytest benchmarks/test_loadclient.py
The server side is plain sockets, so each test decides exactly what the worker receives: a
good or a bad 101, pings with payloads, a close, a dropped connection.
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator

import pytest
from loadclients import LoadClients, accept_value, c_worker, mask


def server_frame(opcode: int, payload: bytes) -> bytes:
    """server_frame builds one unmasked final frame with a payload under 126 bytes."""
    return bytes([0x80 | opcode, len(payload)]) + payload


def read_client_frame(sock: socket.socket) -> tuple[int, bytes]:
    """read_client_frame reads one masked client frame (payload under 126 bytes)."""
    head = recv_exact(sock, 2)
    assert head[1] & 0x80, "a client frame must be masked"
    key = recv_exact(sock, 4)
    payload = recv_exact(sock, head[1] & 0x7F)
    return head[0] & 0x0F, mask(payload, key)


def recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk, "connection closed early"
        data += chunk
    return data


class Scripted:
    """Scripted is a listening socket whose connections the test answers by hand."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(10)
        self.port = self.listener.getsockname()[1]

    def accept(self, good: bool = True) -> tuple[socket.socket, bytes]:
        """accept takes one connection and answers its Upgrade; returns it and its head."""
        sock, _ = self.listener.accept()
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            head += sock.recv(4096)
        key = next(
            line.split(b":", 1)[1].strip()
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = accept_value(key) if good else b"bm90IHRoZSByaWdodCB2YWx1ZT0="
        sock.sendall(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        return sock, head


class Worker:
    """Worker is one C worker process commanded directly over its pipes."""

    def __init__(self, port: int, user_base: int = 7) -> None:
        self.proc = subprocess.Popen(
            [
                c_worker(),
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--sources",
                "127.0.0.2,127.0.0.3",
                "--user-base",
                str(user_base),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )

    def send(self, **cmd: object) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        self.proc.stdin.flush()

    def answer(self) -> dict[str, object]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the worker died"
        reply: dict[str, object] = json.loads(line)
        return reply

    def stop(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


@pytest.fixture
def server() -> Iterator[Scripted]:
    s = Scripted()
    yield s
    s.listener.close()


def test_open_answers_pings_and_counts_pongs(server: Scripted) -> None:
    w = Worker(server.port)
    w.send(cmd="open", count=2, window=1, timeout=10)
    sock1, head1 = server.accept()
    sock2, head2 = server.accept()
    opened = w.answer()
    assert {k: opened[k] for k in ("opened", "wanted", "failed", "deflated")} == {
        "opened": 2,
        "wanted": 2,
        "failed": 0,
        "deflated": 0,
    }
    assert head1.startswith(b"GET /ws?user=7 HTTP/1.1\r\n")
    assert head2.startswith(b"GET /ws?user=8 HTTP/1.1\r\n")
    assert b"\r\nSec-WebSocket-Version: 13\r\n" in head1
    # between commands: every ping is answered at once with its payload, masked
    for payload in (b"", b"x", bytes(range(125))):
        sock1.sendall(server_frame(9, payload))
        assert read_client_frame(sock1) == (10, payload)
    # several frames in one segment, one of them split over two segments
    sock2.sendall(server_frame(2, b"data") + server_frame(9, b"a") + server_frame(9, b"bc")[:2])
    sock2.sendall(server_frame(9, b"bc")[2:])
    assert read_client_frame(sock2) == (10, b"a")
    assert read_client_frame(sock2) == (10, b"bc")
    # our ping: only one connection answers before the timeout
    w.send(cmd="ping", timeout=1.0)
    assert read_client_frame(sock1) == (9, b"ping")
    assert read_client_frame(sock2) == (9, b"ping")
    sock1.sendall(server_frame(10, b"ping"))
    assert w.answer() == {"asked": 2, "answered": 1, "lost": 0}
    w.send(cmd="reset")
    assert w.answer() == {"open": 2, "lost": 0}
    # close: one connection finishes the handshake, the other is forced after the timeout
    w.send(cmd="close", timeout=1.0)
    for sock in (sock1, sock2):
        assert read_client_frame(sock) == (8, (1000).to_bytes(2, "big"))
    sock1.sendall(server_frame(8, (1000).to_bytes(2, "big")))
    sock1.close()
    assert w.answer() == {"closed_by_server": 1, "forced": 1}
    sock2.close()
    assert w.stop() == 0


def test_server_close_is_answered_and_a_drop_is_lost(server: Scripted) -> None:
    w = Worker(server.port)
    w.send(cmd="open", count=2, window=2, timeout=10)
    sock1, _ = server.accept()
    sock2, _ = server.accept()
    assert w.answer()["opened"] == 2
    sock1.sendall(server_frame(8, (1001).to_bytes(2, "big") + b"bye"))
    assert read_client_frame(sock1) == (8, (1001).to_bytes(2, "big"))
    sock1.close()  # after a close handshake: not lost
    sock2.close()  # without one: lost
    w.send(cmd="ping", timeout=2.0)
    assert w.answer() == {"asked": 0, "answered": 0, "lost": 1}
    assert w.stop() == 0


def test_a_bad_accept_fails_and_is_retried(server: Scripted) -> None:
    w = Worker(server.port)
    w.send(cmd="open", count=1, window=1, timeout=10)
    bad, _ = server.accept(good=False)
    good, head = server.accept()  # the retry
    opened = w.answer()
    assert (opened["opened"], opened["failed"]) == (1, 1)
    assert head.startswith(b"GET /ws?user=8 ")
    bad.close()
    good.close()
    w.stop()


def test_refused_connections_are_retried_then_given_up() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    w = Worker(port)
    w.send(cmd="open", count=3, window=2, timeout=10)
    opened = w.answer()
    assert opened["opened"] == 0 and opened["failed"] == 6  # count, then count again
    w.stop()


def test_commands_it_does_not_have_are_errors(server: Scripted) -> None:
    w = Worker(server.port)
    for line in (
        {"cmd": "echo", "size": 1, "seconds": 1, "connections": 1},
        {"cmd": "open", "count": 1},
        {"cmd": "reset", "extra": 1},
    ):
        w.send(**line)
        assert "error" in w.answer()
    assert w.proc.stdin is not None
    w.proc.stdin.write(b'{"cmd": "reset"\n')
    w.proc.stdin.flush()
    assert "error" in w.answer()
    w.send(cmd="reset")
    assert w.answer() == {"open": 0, "lost": 0}
    w.send(cmd="exit")
    assert w.proc.wait(10) == 0


def test_load_clients_refuse_what_the_c_engine_lacks(server: Scripted) -> None:
    with pytest.raises(ValueError, match="permessage-deflate"):
        LoadClients("127.0.0.1", server.port, 1, engine="c", deflate=True)
    with pytest.raises(ValueError, match="engine"):
        LoadClients("127.0.0.1", server.port, 1, engine="rust")
    with LoadClients("127.0.0.1", server.port, 2, engine="c") as lc:
        with pytest.raises(NotImplementedError, match="engine='python'"):
            lc.echo(16, 1.0, 2)
        with pytest.raises(NotImplementedError):
            lc.wait_frames(1)
        assert lc.reset() == {"open": 0, "lost": 0}
