"""Listening and connection caps of the Gateway: IPv4 and IPv6, the per-address cap."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
import websocket

import lowmemws
from tests.support.wire import read_until

MakeGateway = Callable[..., lowmemws.Gateway]


def _status_line(sock: socket.socket) -> bytes:
    sock.settimeout(5)
    data = read_until(sock, b"\r\n", chunk=256)
    return data.split(b"\r\n", 1)[0]


@pytest.fixture
def echo_gateway(make_gateway: MakeGateway) -> MakeGateway:
    """echo_gateway(config, hosts) is a started make_gateway Gateway echoing every message."""

    def start(
        config: lowmemws.Config | None = None, hosts: tuple[str, ...] = ("127.0.0.1",)
    ) -> lowmemws.Gateway:
        gw = make_gateway(config, hosts)

        @gw.on_message
        def echo(conn: lowmemws.Connection, message: str | bytes) -> None:
            conn.send(message)

        return gw.start()

    return start


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_a_gateway_serves_ipv4_and_ipv6_on_the_same_port(echo_gateway: MakeGateway) -> None:
    if not _has_ipv6_loopback():
        pytest.skip("this machine has no IPv6 loopback (::1)")
    gw = echo_gateway(hosts=("127.0.0.1", "::1"))
    for url in (f"ws://127.0.0.1:{gw.port}/", f"ws://[::1]:{gw.port}/"):
        ws = websocket.create_connection(url, timeout=5)
        ws.send("over " + url)
        assert ws.recv() == "over " + url
        ws.close()


def test_the_per_address_cap_answers_503_and_frees_its_share_on_close(
    echo_gateway: MakeGateway,
) -> None:
    gw = echo_gateway(lowmemws.Config(max_per_ip=3))
    held = [websocket.create_connection(f"ws://127.0.0.1:{gw.port}/") for _ in range(3)]
    extra = socket.create_connection(("127.0.0.1", gw.port))
    assert _status_line(extra) == b"HTTP/1.1 503 Service Unavailable"
    extra.close()
    held[0].send("still served")
    assert held[0].recv() == "still served"
    for ws in held:
        ws.close()
    deadline = time.monotonic() + 5
    while gw.stats()["connections"] and time.monotonic() < deadline:
        time.sleep(0.05)
    again = websocket.create_connection(f"ws://127.0.0.1:{gw.port}/")
    again.send("served again")
    assert again.recv() == "served again"
    again.close()


def test_the_connection_cap_leaves_new_clients_waiting_in_the_backlog(
    echo_gateway: MakeGateway,
) -> None:
    gw = echo_gateway(lowmemws.Config(max_connections=2))
    first = websocket.create_connection(f"ws://127.0.0.1:{gw.port}/")
    second = websocket.create_connection(f"ws://127.0.0.1:{gw.port}/")
    waiting = socket.create_connection(("127.0.0.1", gw.port))
    waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    waiting.settimeout(0.5)
    with pytest.raises(TimeoutError):
        waiting.recv(64)  # accepted by the kernel, not by the server: it waits
    assert gw.stats()["accept_paused"] == 1
    first.close()
    assert _status_line(waiting) == b"HTTP/1.1 200 OK"  # served once a slot frees
    second.close()
    waiting.close()


def _raw_websocket(gw: lowmemws.Gateway) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", gw.port), timeout=5)
    sock.sendall(
        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    assert read_until(sock, b"\r\n\r\n").startswith(b"HTTP/1.1 101 ")
    return sock


def test_a_message_trickled_past_its_deadline_is_closed_with_1008(
    echo_gateway: MakeGateway,
) -> None:
    gw = echo_gateway(lowmemws.Config(message_timeout=1.0))
    slow, quick = _raw_websocket(gw), _raw_websocket(gw)
    slow.sendall(bytes([0x82, 0x80 | 126]) + (50_000).to_bytes(2, "big") + b"\x00" * 4)
    slow.settimeout(0.2)
    answer = b""
    deadline = time.monotonic() + 10
    while not answer and time.monotonic() < deadline:
        slow.sendall(b"x")  # a byte at a time keeps the socket busy, not the message alive
        try:
            answer = slow.recv(16)
        except TimeoutError:
            pass
    assert answer[:4] == bytes([0x88, 0x02]) + (1008).to_bytes(2, "big")
    # a message that completes in time is not affected
    quick.sendall(bytes([0x81, 0x82]) + b"\x00" * 4 + b"ok")
    assert read_until(quick, b"ok").endswith(b"ok")
    slow.close()
    quick.close()
