"""The echo CLI as a user runs it: ready line, health and metrics, clean stop on SIGTERM.

``python -m lowmemws echo --host H --port P [--processes N]`` prints ``listening on ws://H:P``
when it accepts connections, answers plain HTTP on the same port, and on SIGTERM closes every
client with 1001 (going away, RFC 6455 7.4.1) and exits with status 0.
"""

from __future__ import annotations

import http.client
import subprocess

import pytest
import websocket

from tests.support.servers import ServerProcess, StartServer, echo_command
from tests.support.ws_close import expect_close_frames
from tests.support.wsproto_client import WsprotoClient

EXIT_TIMEOUT = 15.0  # bounds the wait, it is not a performance figure


def http_get(server: ServerProcess, path: str) -> tuple[int, str, bytes]:
    """http_get returns (status, content type, body) of GET path on the server."""
    connection = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        connection.close()


def wait_exit(server: ServerProcess) -> int:
    try:
        return server.proc.wait(EXIT_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit within {EXIT_TIMEOUT:.0f} s of SIGTERM")


def test_prints_ready_line_with_its_address(start_server: StartServer) -> None:
    server = start_server(echo_command())
    assert server.ready_line == f"listening on ws://127.0.0.1:{server.port}"


def test_healthz_answers_200_ok_on_the_websocket_port(start_server: StartServer) -> None:
    server = start_server(echo_command())
    status, _, body = http_get(server, "/healthz")
    assert (status, body.strip()) == (200, b"ok")


def test_metrics_are_prometheus_text(start_server: StartServer) -> None:
    server = start_server(echo_command())
    status, content_type, body = http_get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert b"lowmemws_connections" in body


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_exits_with_status_0(start_server: StartServer, processes: int) -> None:
    server = start_server(echo_command(), ["--processes", str(processes)])
    server.terminate()
    assert wait_exit(server) == 0


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_closes_clients_with_1001(start_server: StartServer, processes: int) -> None:
    server = start_server(echo_command(), ["--processes", str(processes)])
    url = f"ws://{server.host}:{server.port}/"
    clients = [websocket.create_connection(url, timeout=10) for _ in range(4)]
    raw = WsprotoClient(server.host, server.port)
    try:
        for i, client in enumerate(clients):
            client.send(f"hello {i}")
            assert client.recv() == f"hello {i}"
        raw.send_message(b"hello raw")
        assert raw.receive_message() == b"hello raw"
        server.terminate()
        expect_close_frames(clients, 1001)
        assert raw.wait_for_close(EXIT_TIMEOUT).code == 1001
    finally:
        for client in clients:
            client.shutdown()
    assert wait_exit(server) == 0
