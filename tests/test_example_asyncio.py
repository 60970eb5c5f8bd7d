"""examples/asyncio_app.py end to end: aiohttp and a lowmemws gateway in one asyncio loop.

The example runs as a child process on two free loopback ports (WebSocket and HTTP) and is
stopped by PID. websocket-client connects with a valid token (upgraded after the async
on_connect awaited the "store") and with a bad one (401); POST /notify and POST /announce
from the aiohttp side reach the clients. Every wait is bounded.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from tests.support.ci import skip_or_fail
from tests.support.servers import LOOPBACK, ServerProcess, ServerStartError, free_port
from tests.support.ws_close import expect_close_frames

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "asyncio_app.py"
WAIT = 10.0
START_ATTEMPTS = 3


class App:
    """App is the running example: its process and its HTTP port."""

    def __init__(self, server: ServerProcess, http_port: int) -> None:
        self.server = server
        self.http_port = http_port

    def ws(self, token: str) -> websocket.WebSocket:
        """ws opens a WebSocket with ?token=token (raises on a refused upgrade)."""
        return websocket.create_connection(f"{self.server.url}?token={token}", timeout=WAIT)

    def post(self, path: str, body: str) -> tuple[int, bytes]:
        """post sends POST path with a text body to the aiohttp side: (status, body)."""
        conn = http.client.HTTPConnection(LOOPBACK, self.http_port, timeout=WAIT)
        try:
            conn.request("POST", path, body=body.encode(), headers={"Content-Type": "text/plain"})
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()


def start_app() -> App:
    """start_app runs the example on free ports and waits for its ready line; a port taken
    between the choice and the bind (the process exits) is retried on new ports."""
    if importlib.util.find_spec("aiohttp") is None:
        skip_or_fail("the example needs aiohttp (pip install -e '.[test]')")
    last: ServerStartError | None = None
    for _ in range(START_ATTEMPTS):
        ws_port, http_port = free_port(), free_port()
        if ws_port == http_port:
            continue
        argv = [
            sys.executable,
            str(EXAMPLE),
            "--host",
            LOOPBACK,
            "--ws-port",
            str(ws_port),
            "--http-port",
            str(http_port),
        ]
        server = ServerProcess(argv, LOOPBACK, ws_port)
        try:
            server.wait_ready(30.0)  # stops the process (by PID) when it fails
        except ServerStartError as exc:
            last = exc
            continue
        return App(server, http_port)
    pytest.fail(f"the example did not start: {last}")


@pytest.fixture(scope="module")
def app() -> Iterator[App]:
    """app is one running example shared by this module's tests, ended by PID."""
    running = start_app()
    try:
        yield running
    finally:
        running.server.stop()


def test_valid_token_is_upgraded_and_gets_notify(app: App) -> None:
    client = app.ws("alice-token")
    try:
        assert client.recv() == "hello user 1"  # on_open, after the async on_connect
        status, body = app.post("/notify?user=1", "you have mail")
        assert status == 202, body
        assert json.loads(body) == {"delivered": 1}
        assert client.recv() == "you have mail"
    finally:
        client.close()


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_bad_token_gets_401(app: App, token: str) -> None:
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        app.ws(token)
    assert refused.value.status_code == 401


def test_notify_reaches_only_that_user_and_announce_everyone(app: App) -> None:
    alice, bob = app.ws("alice-token"), app.ws("bob-token")
    try:
        assert alice.recv() == "hello user 1"
        assert bob.recv() == "hello user 2"
        status, body = app.post("/notify?user=2", "for bob")
        assert (status, json.loads(body)) == (202, {"delivered": 1})
        status, body = app.post("/announce", "for everyone")
        assert status == 202, body
        assert json.loads(body)["delivered"] >= 2  # other tests' clients may still be open
        assert bob.recv() == "for bob"
        assert bob.recv() == "for everyone"
        assert alice.recv() == "for everyone"  # alice never got bob's notification
    finally:
        alice.close()
        bob.close()


def test_notify_checks_its_user(app: App) -> None:
    status, body = app.post("/notify?user=99", "nobody is there")
    assert (status, json.loads(body)) == (202, {"delivered": 0})
    for query in ("", "?user=bob", "?user=0", f"?user={1 << 64}"):
        status, _ = app.post(f"/notify{query}", "x")
        assert status == 400, query


def test_sigterm_closes_clients_with_1001_and_exits() -> None:
    running = start_app()
    try:
        client = running.ws("alice-token")
        assert client.recv() == "hello user 1"
        running.server.terminate()  # SIGTERM to its PID: handled by Gateway.serve()
        expect_close_frames([client], 1001)
        client.close()
        assert running.server.proc.wait(WAIT) == 0
    finally:
        running.server.stop()
