"""``await gateway.serve()`` inside a running asyncio loop (issue 11), next to an asyncio HTTP
application that publishes on request, in this process and as a child process
(tests/support/asyncio_app.py) that a signal stops; and the memory of 2,000 idle connections
accepted through an ``async def`` on_connect.

The blocking clients (websocket-client, http.client, raw sockets) run in threads
(``asyncio.to_thread``) so the loop the hooks need stays free.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import signal
import socket
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from lowmemws import Accept, Config, Connection, Gateway, Request
from tests.support import waiting
from tests.support.asyncio_app import http_app
from tests.support.servers import ServerProcess, start_cli_server
from tests.support.wire import read_until

DEADLINE = 10.0  # bounds every wait; not a performance figure
APP = Path(__file__).parent / "support" / "asyncio_app.py"
MiB = 1 << 20

wait_until = waiting.waiter(DEADLINE)


def http_request(port: int, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def ws_connect(port: int, target: str = "/") -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}{target}", timeout=DEADLINE)


def close_code(client: websocket.WebSocket) -> int:
    """close_code reads frames until the server's close frame, answers it as a client does,
    and returns its code."""
    while True:
        frame = client.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            code = int(struct.unpack("!H", frame.data[:2])[0])
            client.send_close(code)
            client.shutdown()
            return code


def async_gateway(make_gateway: Callable[..., Gateway], loops: list[Any]) -> Gateway:
    """async_gateway has async hooks that note the loop they run on: on_connect accepts with
    the topic "news", on_message echoes."""
    gateway = make_gateway(Config(shutdown_timeout=2.0))

    @gateway.on_connect
    async def connect(request: Request) -> Accept:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        return Accept(topics=("news",))

    @gateway.on_message
    async def echo(conn: Connection, message: str | bytes) -> None:
        loops.append(asyncio.get_running_loop())
        await asyncio.sleep(0)
        conn.send(message)

    return gateway


def test_serve_runs_the_hooks_on_the_callers_loop_next_to_an_http_app_that_publishes(
    make_gateway: Callable[..., Gateway],
) -> None:
    loops: list[Any] = []
    gateway = async_gateway(make_gateway, loops)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
        serving = asyncio.create_task(gateway.serve(handle_signals=False))
        await asyncio.sleep(0)
        assert gateway.port != 0  # bound before serve()'s first await
        assert await asyncio.to_thread(gateway.wait_ready, DEADLINE)
        assert {sig: signal.getsignal(sig) for sig in handlers} == handlers  # the app's own
        app = await http_app(gateway)
        app_port = app.sockets[0].getsockname()[1]
        async with app:
            clients = [await asyncio.to_thread(ws_connect, gateway.port) for _ in range(3)]
            status, answer = await asyncio.to_thread(
                http_request, app_port, "POST", "/publish?topic=news", b"breaking"
            )
            assert (status, answer) == (200, b"3")
            for client in clients:
                assert await asyncio.to_thread(client.recv) == b"breaking"
            await asyncio.to_thread(clients[0].send, "echo me")
            assert await asyncio.to_thread(clients[0].recv) == "echo me"
            assert await gateway.apublish("news", "from the loop") == 3
            for client in clients:
                assert await asyncio.to_thread(client.recv) == "from the loop"
            assert loops and all(seen is loop for seen in loops)

            closes = [asyncio.create_task(asyncio.to_thread(close_code, c)) for c in clients]
            gateway.stop()  # on the serving loop: returns at once, serve() ends after shutdown
            await asyncio.wait_for(serving, DEADLINE)
            assert await asyncio.gather(*closes) == [1001, 1001, 1001]
            assert gateway.connection_count == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE).close()

    asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))


def test_cancelling_serve_closes_the_clients_with_1001_and_returns(
    make_gateway: Callable[..., Gateway],
) -> None:
    loops: list[Any] = []
    gateway = async_gateway(make_gateway, loops)

    async def main() -> None:
        serving = asyncio.create_task(gateway.serve(handle_signals=False))
        assert await asyncio.to_thread(gateway.wait_ready, DEADLINE)
        client = await asyncio.to_thread(ws_connect, gateway.port)
        await asyncio.to_thread(client.send, "hi")
        assert await asyncio.to_thread(client.recv) == "hi"
        closing = asyncio.create_task(asyncio.to_thread(close_code, client))
        serving.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(serving, DEADLINE)
        assert await closing == 1001
        assert gateway.connection_count == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE).close()

    asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))


def test_serve_stops_within_its_bound_while_hooks_are_in_flight(
    make_gateway: Callable[..., Gateway],
) -> None:
    """Two on_message coroutines that would await 30 s: stop() closes the clients with 1001,
    serve() returns after shutdown_timeout and the coroutines are cancelled on the loop."""
    gateway = make_gateway(Config(shutdown_timeout=1.0))
    cancelled: list[str | bytes] = []

    @gateway.on_message
    async def stuck(conn: Connection, message: str | bytes) -> None:
        try:
            await asyncio.sleep(3 * DEADLINE)
        except asyncio.CancelledError:
            cancelled.append(message)
            raise

    async def main() -> None:
        serving = asyncio.create_task(gateway.serve(handle_signals=False))
        assert await asyncio.to_thread(gateway.wait_ready, DEADLINE)
        clients = [await asyncio.to_thread(ws_connect, gateway.port) for _ in range(2)]
        for client in clients:
            await asyncio.to_thread(client.send, "stuck")
        await asyncio.to_thread(
            wait_until, lambda: gateway.stats()["hooks_in_flight"] == 2, "the hooks to run"
        )
        closes = [asyncio.create_task(asyncio.to_thread(close_code, c)) for c in clients]
        gateway.stop()
        await asyncio.wait_for(serving, DEADLINE)  # bounded: the hooks are not waited for
        assert await asyncio.gather(*closes) == [1001, 1001]
        for _ in range(100):
            if len(cancelled) == 2:
                break
            await asyncio.sleep(0.01)
        assert cancelled == ["stuck", "stuck"]

    asyncio.run(asyncio.wait_for(main(), 3 * DEADLINE))


def test_serve_refuses_worker_processes() -> None:
    gateway = Gateway("127.0.0.1", 0, processes=2)
    with pytest.raises(ValueError, match="processes"):
        asyncio.run(gateway.serve())


# -- the application as a child process ------------------------------------------------------------


@pytest.fixture
def asyncio_app() -> Iterator[Callable[..., tuple[ServerProcess, int]]]:
    """asyncio_app(config) starts tests/support/asyncio_app.py: (process, HTTP port)."""
    started: list[ServerProcess] = []

    def start(config: dict[str, object] | None = None) -> tuple[ServerProcess, int]:
        server = start_cli_server(
            [sys.executable, str(APP)], ["--config", json.dumps(config or {})]
        )
        started.append(server)
        line = next(ln for ln in server.output().splitlines() if ln.startswith("http on "))
        return server, int(line.rsplit(":", 1)[1])

    yield start
    for server in started:
        server.stop()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_serve_with_1001_for_every_client(
    asyncio_app: Callable[..., tuple[ServerProcess, int]], sig: signal.Signals
) -> None:
    server, http_port = asyncio_app()
    clients = [ws_connect(server.port, f"/?user={n}&topic=news") for n in range(3)]
    assert http_request(http_port, "POST", "/publish?topic=news", b"breaking") == (200, b"3")
    for client in clients:
        assert client.recv() == b"breaking"
    clients[0].send("echo me")
    assert clients[0].recv() == "echo me"
    server.proc.send_signal(sig)
    for client in clients:
        assert close_code(client) == 1001
    assert server.proc.wait(DEADLINE) == 0
    wait_until(lambda: "stopped" in server.output(), "the application to print 'stopped'")


def rss_bytes(pid: int) -> int:
    """rss_bytes is the resident set size of process pid (VmRSS of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def open_upgraded(port: int, count: int) -> list[socket.socket]:
    """open_upgraded opens count WebSocket connections on raw sockets (all requests first,
    then every 101 is read)."""
    socks = []
    for n in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /?user={n + 1} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode("latin-1")
        )
        socks.append(sock)
    for sock in socks:
        head = read_until(sock, b"\r\n\r\n", timeout=DEADLINE)
        assert head.startswith(b"HTTP/1.1 101 "), head
    return socks


def app_stats(http_port: int) -> dict[str, Any]:
    status, body = http_request(http_port, "GET", "/stats")
    assert status == 200
    return dict(json.loads(body))


#: What 2,000 idle connections accepted through an async on_connect may add to the server's
#: RSS: 1 KiB each, 16 times the 64 B the benchmarks hold it to. A task, coroutine or
#: request copy kept per connection would exceed it.
IDLE_RSS_BOUND = 2000 * 1024


def test_idle_connections_accepted_through_an_async_on_connect_cost_little_rss(
    asyncio_app: Callable[..., tuple[ServerProcess, int]],
) -> None:
    server, http_port = asyncio_app({"hook_queue": 64})
    warm = open_upgraded(server.port, 200)  # the code paths and pools of a few hooks in flight
    for sock in warm:
        sock.close()
    wait_until(lambda: app_stats(http_port)["connections"] == 0, "the warm-up clients to go")
    before = rss_bytes(server.pid)
    socks = open_upgraded(server.port, 2000)
    try:
        wait_until(
            lambda: (
                (stats := app_stats(http_port))["hooks_in_flight"] == 0
                and stats["handshakes_parked"] == 0
                and stats["connections"] == 2000
            ),
            "the hooks to settle",
        )
        grown = rss_bytes(server.pid) - before
        print(f"2000 idle connections: RSS +{grown / 1024:.0f} KiB ({grown / 2000:.0f} B each)")
        assert grown <= IDLE_RSS_BOUND, f"RSS grew {grown / MiB:.2f} MiB for 2000 connections"
    finally:
        for sock in socks:
            sock.close()
