"""The Gateway's hooks and policies as a client on the wire sees them.

A Gateway runs in this process (``start()``) on a free loopback port. Upgrades are sent by
hand on raw sockets where the test is about the HTTP exchange (statuses, headers), and by
websocket-client where it is about the WebSocket connection.
"""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import re
import socket
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import websocket

from lowmemws import Accept, Config, Connection, Gateway, Reject, Request, Response
from tests.support import waiting
from tests.support.metrics import metric_value
from tests.support.wire import read_until

DEADLINE = 10.0  # bounds every wait; not a performance figure
GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


wait_until = waiting.waiter(DEADLINE)


class RawResponse:
    """RawResponse is an HTTP response head read off a raw socket."""

    def __init__(self, head: bytes, sock: socket.socket) -> None:
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1])
        self.headers = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
        self.sock = sock


def raw_upgrade(port: int, target: str = "/", extra: dict[str, str] | None = None) -> RawResponse:
    """raw_upgrade sends a WebSocket upgrade request by hand and reads the response head."""
    key = base64.b64encode(os.urandom(16)).decode()
    headers = {
        "Host": f"127.0.0.1:{port}",
        "Upgrade": "websocket",
        "Connection": "Upgrade",
        "Sec-WebSocket-Key": key,
        "Sec-WebSocket-Version": "13",
        **(extra or {}),
    }
    request = f"GET {target} HTTP/1.1\r\n"
    request += "".join(f"{name}: {value}\r\n" for name, value in headers.items()) + "\r\n"
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(request.encode("latin-1"))
    head = read_until(sock, b"\r\n\r\n")
    response = RawResponse(head.split(b"\r\n\r\n", 1)[0], sock)
    if response.status == 101:
        expected = base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()
        assert response.headers["sec-websocket-accept"] == expected
    return response


def closed_by_server(sock: socket.socket, timeout: float = DEADLINE) -> bool:
    """closed_by_server reads and discards until EOF; True when the server closed."""
    sock.settimeout(timeout)
    try:
        while sock.recv(4096):
            pass
    except (ConnectionResetError, TimeoutError):
        return False
    return True


# -- on_connect --------------------------------------------------------------------------------


def test_on_connect_sees_path_query_params_cookies_and_headers(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway()
    seen: dict[str, Any] = {}

    @gateway.on_connect
    def inspect(request: Request) -> Accept:
        seen.update(
            method=request.method,
            path=request.path,
            query=request.query,
            params=request.params,
            cookies=dict(request.cookies),
            token=request.header("X-Token"),
            token_lower=request.header("x-token"),
            origin=request.header("Origin"),
            missing=request.header("X-Missing"),
            names=[name.lower() for name in request.headers],
            headers=request.headers,
        )
        return Accept(user=int(request.params["user"]))

    gateway.start()
    client = websocket.create_connection(
        f"ws://127.0.0.1:{gateway.port}/notify/v1?user=42&room=a%20b&flag",
        timeout=DEADLINE,
        cookie="session=abc123; theme=dark",
        header=["X-Token: s3cret"],
        origin="https://app.example",
    )
    try:
        assert seen["method"] == "GET"
        assert seen["path"] == "/notify/v1"
        assert seen["query"] == "user=42&room=a%20b&flag"
        assert seen["params"] == {"user": "42", "room": "a b", "flag": ""}
        assert seen["cookies"] == {"session": "abc123", "theme": "dark"}
        assert seen["token"] == seen["token_lower"] == "s3cret"
        assert seen["origin"] == "https://app.example"
        assert seen["missing"] is None
        assert {"host", "upgrade", "sec-websocket-key", "x-token", "cookie"} <= set(seen["names"])
        headers = seen["headers"]  # a copy: still valid after the hook returned
        assert headers["X-TOKEN"] == headers.get("x-token") == "s3cret"
        assert "Cookie" in headers and "X-Missing" not in headers
        assert gateway.send_to_user(42, "tagged") == 1
        assert client.recv() == "tagged"
    finally:
        client.close()


@pytest.mark.parametrize("status", [401, 403, 429])
def test_reject_answers_the_status_and_never_upgrades(
    make_gateway: Callable[..., Gateway], status: int
) -> None:
    gateway = make_gateway()
    opened: list[Connection] = []

    @gateway.on_connect
    def check(request: Request) -> Accept | Reject:
        return Accept() if request.params.get("token") == "good" else Reject(status)

    gateway.on_open(opened.append)
    gateway.start()
    response = raw_upgrade(gateway.port, "/?token=bad")
    assert response.status == status
    assert "sec-websocket-accept" not in response.headers
    if status == 429:
        assert response.headers["retry-after"] == "1"
    assert closed_by_server(response.sock)
    response.sock.close()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    assert refused.value.status_code == status
    assert opened == [] and gateway.connection_count == 0

    good = raw_upgrade(gateway.port, "/?token=good")
    assert good.status == 101
    good.sock.close()


def test_a_request_kept_after_the_hook_raises(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    kept: list[Request] = []

    @gateway.on_connect
    def keep(request: Request) -> None:
        kept.append(request)

    gateway.start()
    client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/p?q=1")
    client.close()
    (request,) = kept
    for use in (
        lambda: request.path,
        lambda: request.method,
        lambda: request.query,
        lambda: request.params,
        lambda: request.header("host"),
        lambda: request.headers,
        lambda: request.cookies,
        lambda: request.body,
    ):
        with pytest.raises(RuntimeError, match="valid only during the hook"):
            use()


def test_a_hook_that_raises_answers_500(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()

    @gateway.on_connect
    def broken(request: Request) -> None:
        raise KeyError("no such user")

    gateway.start()
    response = raw_upgrade(gateway.port)
    assert response.status == 500
    response.sock.close()


def test_origin_allow_list(make_gateway: Callable[..., Gateway]) -> None:
    allowed = ("https://app.example", "https://admin.example")
    gateway = make_gateway(Config(origins=allowed)).start()
    for origin in allowed:
        ok = raw_upgrade(gateway.port, extra={"Origin": origin})
        assert ok.status == 101
        ok.sock.close()
    for extra in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {}):
        refused = raw_upgrade(gateway.port, extra=extra)
        assert refused.status == 403
        assert closed_by_server(refused.sock)
        refused.sock.close()


def test_subprotocol_negotiation(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(Config(subprotocols=("chat", "superchat"))).start()
    offered = raw_upgrade(gateway.port, extra={"Sec-WebSocket-Protocol": "v2.other, chat"})
    assert offered.status == 101
    assert offered.headers["sec-websocket-protocol"] == "chat"
    offered.sock.close()
    preferred = raw_upgrade(
        gateway.port, extra={"Sec-WebSocket-Protocol": "superchat, chat"}
    )  # the server's order of preference decides
    assert preferred.headers["sec-websocket-protocol"] == "chat"
    preferred.sock.close()
    none_shared = raw_upgrade(gateway.port, extra={"Sec-WebSocket-Protocol": "mqtt"})
    assert none_shared.status == 101
    assert "sec-websocket-protocol" not in none_shared.headers
    none_shared.sock.close()
    not_offered = raw_upgrade(gateway.port)
    assert "sec-websocket-protocol" not in not_offered.headers
    not_offered.sock.close()
    client = websocket.create_connection(
        f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE, subprotocols=["chat"]
    )
    assert client.getsubprotocol() == "chat"
    client.close()


def test_on_connect_chooses_the_subprotocol(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(Config(subprotocols=("chat",)))
    gateway.on_connect(lambda request: Accept(subprotocol=request.subprotocols[-1]))
    gateway.start()
    response = raw_upgrade(gateway.port, extra={"Sec-WebSocket-Protocol": "chat, v9"})
    assert response.headers["sec-websocket-protocol"] == "v9"
    response.sock.close()


# -- plain HTTP on the same port ---------------------------------------------------------------


def http_request(
    port: int, method: str, path: str, body: bytes | None = None
) -> tuple[int, dict[str, str], bytes]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=DEADLINE)
    try:
        connection.request(method, path, body=body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def test_on_http_gets_the_body_and_falls_back_to_the_built_ins(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway()

    @gateway.on_http
    def api(request: Request) -> Response | None:
        if request.method == "POST" and request.path == "/publish":
            topic = request.params["topic"]
            reached = gateway.publish(topic, request.body)
            return Response(202, f"{len(request.body)} bytes to {reached}\n", headers={"X-A": "b"})
        return None

    gateway.on_connect(lambda request: Accept(topics=("news",)))
    gateway.start()
    client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    try:
        body = b"\x00breaking\xff" * 100
        status, headers, answer = http_request(gateway.port, "POST", "/publish?topic=news", body)
        assert (status, answer) == (202, b"1000 bytes to 1\n")
        assert headers["X-A"] == "b"
        assert client.recv() == body

        status, _, answer = http_request(gateway.port, "GET", "/healthz")
        assert (status, answer.strip()) == (200, b"ok")
        status, _, _ = http_request(gateway.port, "GET", "/nothing-here")
        assert status == 404
        status, headers, text = http_request(gateway.port, "GET", "/metrics")
        assert status == 200 and headers["Content-Type"].startswith("text/plain")
        assert re.search(rb"^lowmemws_connections 1$", text, re.M)
    finally:
        client.close()


metric = metric_value


def test_metrics_names_count_what_happened(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(Config(hook_threads=1, hook_queue=4))
    gateway.on_message(lambda conn, message: conn.send(message))
    gateway.start()
    client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    for n in range(3):
        client.send(f"m{n}")
        assert client.recv() == f"m{n}"
    client.close(status=4001)  # "other"
    websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/").close()  # 1000
    wait_until(lambda: gateway.connection_count == 0, "the clients to close")

    _, _, body = http_request(gateway.port, "GET", "/metrics")
    text = body.decode()
    assert metric(text, "lowmemws_connections") == 0
    assert metric(text, "lowmemws_handshakes_total") == 2
    assert metric(text, "lowmemws_frames_sent_total") >= 3
    assert metric(text, "lowmemws_messages_received_total") == 3
    assert metric(text, 'lowmemws_closes_total{code="1000"}') == 1
    assert metric(text, 'lowmemws_closes_total{code="other"}') == 1
    assert metric(text, "lowmemws_buffer_pool_in_use") >= 0
    assert metric(text, "lowmemws_hooks_in_flight") >= 0
    for reason in ("write_limit", "closed", "latest", "worker_queue"):
        assert metric(text, f'lowmemws_dropped_messages_total{{reason="{reason}"}}') == 0
    assert metric(text, "lowmemws_processes") == 1
    for line in text.splitlines():  # every sample has a TYPE
        if line and not line.startswith("#"):
            family = line.split("{")[0].split(" ")[0]
            assert f"# TYPE {family} " in text


# -- closing -----------------------------------------------------------------------------------


def test_on_close_gets_the_code(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    codes: dict[int, int] = {}
    gateway.on_connect(lambda request: Accept(user=int(request.params["user"])))
    gateway.on_close(lambda conn, code: codes.__setitem__(conn.user, code))
    gateway.start()
    url = f"ws://127.0.0.1:{gateway.port}/?user="
    websocket.create_connection(url + "1", timeout=DEADLINE).close()
    websocket.create_connection(url + "2", timeout=DEADLINE).close(status=1001)
    websocket.create_connection(url + "3", timeout=DEADLINE).close(status=4321)
    websocket.create_connection(url + "4", timeout=DEADLINE).sock.close()  # no close frame
    wait_until(lambda: len(codes) == 4, "four on_close calls")
    assert codes == {1: 1000, 2: 1001, 3: 4321, 4: 1006}


def test_the_server_closes_with_a_code_and_reason(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    codes: list[int] = []

    @gateway.on_message
    def bye(conn: Connection, message: str | bytes) -> None:
        conn.close(4000, "bye now")

    gateway.on_close(lambda conn, code: codes.append(code))
    gateway.start()
    client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    client.send("quit")
    frame = client.recv_frame()
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    assert frame.data == struct.pack("!H", 4000) + b"bye now"
    client.send_close(4000)
    wait_until(lambda: codes == [4000], "on_close")
    client.shutdown()


# -- hook threads ------------------------------------------------------------------------------


def test_hook_threads_process_every_message_with_back_pressure(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(hook_threads=2, hook_queue=4))
    seen: list[tuple[int, str]] = []
    threads: set[str] = set()
    lock = threading.Lock()

    @gateway.on_message
    def slow(conn: Connection, message: str | bytes) -> None:
        time.sleep(0.005)
        with lock:
            seen.append((conn.user, str(message)))
            threads.add(threading.current_thread().name)

    gateway.on_connect(lambda request: Accept(user=int(request.params["user"])))
    gateway.start()
    clients = [
        websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/?user={u}", timeout=DEADLINE)
        for u in range(1, 4)
    ]
    per_client = 60
    for n in range(per_client):
        for client in clients:
            client.send(f"m{n}")
    expected = {(u, f"m{n}") for u in range(1, 4) for n in range(per_client)}
    wait_until(lambda: len(seen) >= len(expected), "every message to be handled", 30)
    assert len(seen) == len(expected) and set(seen) == expected
    assert len(threads) == 2 and "lowmemws-loop" not in threads
    stats = gateway.stats()
    assert stats["dropped"]["worker_queue"] == 0
    assert stats["messages_received_total"] == len(expected)
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 0, "the queue to empty")
    for client in clients:
        client.close()


# -- heartbeat ---------------------------------------------------------------------------------


def test_heartbeat_keeps_answering_clients_and_drops_silent_ones(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(ping_interval=0.3, ping_timeout=0.3))
    codes: dict[int, int] = {}
    gateway.on_connect(lambda request: Accept(user=int(request.params["user"])))
    gateway.on_close(lambda conn, code: codes.__setitem__(conn.user, code))
    gateway.on_message(lambda conn, message: conn.send(message))
    gateway.start()

    silent = raw_upgrade(gateway.port, "/?user=2")  # never answers anything
    assert silent.status == 101
    lively = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/?user=1", timeout=DEADLINE)
    pings = 0
    lively.settimeout(0.1)
    end = time.monotonic() + 4.0  # the sweep runs once a second: several rounds
    while time.monotonic() < end:
        try:
            opcode, _ = lively.recv_data(control_frame=True)  # answers pings itself
            pings += opcode == websocket.ABNF.OPCODE_PING
        except websocket.WebSocketTimeoutException:
            pass
    assert pings >= 1
    lively.settimeout(DEADLINE)
    assert 1 not in codes
    lively.send("still here")
    assert lively.recv() == "still here"

    # the silent client got a ping, then the server ended the connection without waiting
    silent.sock.settimeout(DEADLINE)
    data = b""
    while True:
        try:
            chunk = silent.sock.recv(4096)
        except ConnectionResetError:
            break
        if not chunk:
            break
        data += chunk
    assert data[:1] == b"\x89"  # FIN + ping
    silent.sock.close()
    wait_until(lambda: 2 in codes, "on_close for the silent client")
    assert codes[2] == 1006
    lively.close()


# -- starting and stopping ---------------------------------------------------------------------


def test_a_gateway_is_a_context_manager(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway()
    gateway.on_message(lambda conn, message: conn.send(message))
    with gateway as started:
        assert started is gateway
        client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
        client.send("ping")
        assert client.recv() == "ping"
    frame = client.recv_frame()  # leaving the block stopped it: clients get 1001
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE
    assert struct.unpack("!H", frame.data[:2])[0] == 1001
    client.close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_start_raises_when_the_loop_does_not_start(
    make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any) -> None:
        raise MemoryError("no room for the loop")

    monkeypatch.setattr("lowmemws._loop.EventLoop.run", broken)
    with pytest.raises(RuntimeError, match="did not become ready"):
        make_gateway().start()
