"""Hooks off the loop thread (issue 11): ``async def`` hooks on an asyncio loop, plain hooks on
Config.hook_threads threads, as clients on the wire see them.

Most tests run twice: "async" (every hook is ``async def`` and awaits before it decides) and
"threads" (plain hooks, ``hook_threads=2``). Both park an upgrade or HTTP request in C while
the hook decides, keep one connection's hooks in order, and are bounded by Config.hook_queue.
Slow hooks wait on events the test sets, never on sleeps the test must outlast.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import http.client
import inspect
import logging
import os
import socket
import struct
import threading
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import websocket

from lowmemws import Accept, Config, Connection, Gateway, Reject, Request, Response
from tests.support import waiting
from tests.support.wire import read_until

DEADLINE = 10.0  # bounds every wait; not a performance figure
MODES = ("async", "threads")

wait_until = waiting.waiter(DEADLINE)


# -- helpers -----------------------------------------------------------------------------------


def mode_config(mode: str, **fields: Any) -> Config:
    """mode_config is the Config of a mode: plain hooks run on two hook threads in "threads"."""
    if mode == "threads":
        fields.setdefault("hook_threads", 2)
    return Config(**fields)


def hook(mode: str, body: Callable[..., Any]) -> Callable[..., Any]:
    """hook turns body into the mode's hook: an ``async def`` that first yields to its loop
    (so the decision really comes after an await), or body itself for the hook threads."""
    if mode == "threads":
        return body

    async def coroutine_hook(*args: Any) -> Any:
        await asyncio.sleep(0)
        return body(*args)

    return coroutine_hook


def blocking_hook(mode: str, gate: threading.Event, body: Callable[..., Any]) -> Callable[..., Any]:
    """blocking_hook is a hook of the mode that waits for gate (bounded), then returns body():
    awaiting in "async" (the asyncio loop stays free), blocking its thread in "threads"."""
    if mode == "threads":

        def thread_hook(*args: Any) -> Any:
            gate.wait(DEADLINE)
            return body(*args)

        return thread_hook

    async def coroutine_hook(*args: Any) -> Any:
        end = time.monotonic() + DEADLINE
        while not gate.is_set() and time.monotonic() < end:
            await asyncio.sleep(0.005)
        return body(*args)

    return coroutine_hook


def by_path(
    mode: str, hooks: dict[str, Callable[..., Any]], default: Callable[..., Any]
) -> Callable[..., Any]:
    """by_path is an on_connect or on_http hook of the mode that hands the request to the hook
    of its path, else to default."""
    if mode == "threads":
        return lambda request: hooks.get(request.path, default)(request)

    async def route(request: Request) -> Any:
        return await hooks.get(request.path, default)(request)

    return route


def off_loop_thread(mode: str) -> bool:
    """off_loop_thread: the caller runs where the mode's hooks should (never the loop thread)."""
    name = threading.current_thread().name
    if mode == "threads":
        return name.startswith("lowmemws-hook")
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return name != "lowmemws-loop"


class RawResponse:
    """RawResponse is an HTTP response head read off a raw socket (and what followed it)."""

    def __init__(self, data: bytes, sock: socket.socket) -> None:
        head, _, self.rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        self.status = int(lines[0].split(" ")[1]) if lines[0] else 0
        self.headers: dict[str, str] = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            self.headers[name.strip().lower()] = value.strip()
        self.sock = sock


def upgrade_request(port: int, target: str = "/", key: str | None = None) -> bytes:
    """upgrade_request is a WebSocket upgrade request head."""
    key = key or base64.b64encode(os.urandom(16)).decode()
    return (
        f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode("latin-1")


def send_upgrade(port: int, target: str = "/", after: bytes = b"") -> socket.socket:
    """send_upgrade opens a socket and sends an upgrade request (and after, in the same
    write) without reading the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
    sock.sendall(upgrade_request(port, target) + after)
    return sock


def read_response(sock: socket.socket) -> RawResponse:
    """read_response reads an HTTP response head off sock ("" status 0 when it closed)."""
    return RawResponse(read_until(sock, b"\r\n\r\n", timeout=DEADLINE), sock)


def raw_upgrade(port: int, target: str = "/") -> RawResponse:
    """raw_upgrade sends an upgrade request by hand and reads the response head."""
    return read_response(send_upgrade(port, target))


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """masked_frame is one final client frame (payload shorter than 126 bytes)."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack("!BB", 0x80 | opcode, 0x80 | len(payload)) + mask + masked


def read_frame(sock: socket.socket, buffered: bytes = b"") -> tuple[int, bytes, bytes]:
    """read_frame reads one unmasked server frame: (opcode, payload, bytes left over)."""
    data = buffered
    while True:
        if len(data) >= 2:
            length = data[1] & 0x7F
            start = 2
            if length == 126:
                start = 4
                length = struct.unpack("!H", data[2:4])[0] if len(data) >= 4 else 1 << 30
            if len(data) >= start + length:
                return data[0] & 0x0F, data[start : start + length], data[start + length :]
        sock.settimeout(DEADLINE)
        got = sock.recv(65536)
        if not got:
            raise AssertionError(f"the server closed the socket; read so far: {data!r}")
        data += got


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


def ws_connect(port: int, target: str = "/", **kwargs: Any) -> websocket.WebSocket:
    return websocket.create_connection(f"ws://127.0.0.1:{port}{target}", timeout=DEADLINE, **kwargs)


def close_code(client: websocket.WebSocket) -> int:
    """close_code reads frames until the server's close frame and returns its code."""
    while True:
        frame = client.recv_frame()
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return int(struct.unpack("!H", frame.data[:2])[0])


def settled(gateway: Gateway) -> bool:
    """settled: no hook call runs or waits and no request is parked."""
    stats = gateway.stats()
    return stats["hooks_in_flight"] == 0 and stats["handshakes_parked"] == 0


def hook_errors(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "lowmemws" and text in r.getMessage()]


@pytest.fixture
def gates() -> Iterator[list[threading.Event]]:
    """gates collects the events slow hooks wait on; all are set at teardown, so no hook
    thread outlives its test waiting."""
    made: list[threading.Event] = []
    yield made
    for gate in made:
        gate.set()


def new_gate(gates: list[threading.Event]) -> threading.Event:
    gate = threading.Event()
    gates.append(gate)
    return gate


# -- the hook tests, async and on hook threads ---------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_on_connect_reads_the_request_and_its_accept_applies(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    gateway = make_gateway(mode_config(mode, subprotocols=("chat",)))
    seen: dict[str, Any] = {}

    def inspect(request: Request) -> Accept:
        seen.update(
            where=off_loop_thread(mode),
            path=request.path,
            params=request.params,
            cookies=dict(request.cookies),
            token=request.header("x-token"),
            offered=request.subprotocols,
        )
        return Accept(user=int(request.params["user"]), topics=("news",), subprotocol="v9")

    gateway.on_connect(hook(mode, inspect))
    gateway.start()
    client = ws_connect(
        gateway.port,
        "/notify?user=42&room=a%20b",
        cookie="session=abc123",
        header=["X-Token: s3cret"],
        subprotocols=["chat", "v9"],
    )
    try:
        assert seen == {
            "where": True,
            "path": "/notify",
            "params": {"user": "42", "room": "a b"},
            "cookies": {"session": "abc123"},
            "token": "s3cret",
            "offered": ["chat", "v9"],
        }
        assert client.getsubprotocol() == "v9"
        assert gateway.send_to_user(42, "tagged") == 1
        assert client.recv() == "tagged"
        assert gateway.publish("news", "subscribed") == 1
        assert client.recv() == "subscribed"
        wait_until(lambda: settled(gateway), "the hooks to settle")
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("status", [401, 403, 429])
def test_a_reject_answers_its_status_and_never_opens(
    make_gateway: Callable[..., Gateway], mode: str, status: int
) -> None:
    gateway = make_gateway(mode_config(mode))
    opened: list[Connection] = []

    def check(request: Request) -> Accept | Reject:
        return Accept() if request.params.get("token") == "good" else Reject(status)

    gateway.on_connect(hook(mode, check))
    gateway.on_open(hook(mode, opened.append))
    gateway.start()
    refused = raw_upgrade(gateway.port, "/?token=bad")
    assert refused.status == status
    assert "sec-websocket-accept" not in refused.headers
    refused.sock.close()
    good = raw_upgrade(gateway.port, "/?token=good")
    assert good.status == 101
    wait_until(lambda: len(opened) == 1, "on_open of the accepted client")
    good.sock.close()
    wait_until(lambda: settled(gateway) and gateway.connection_count == 0, "the gateway to settle")
    assert len(opened) == 1


@pytest.mark.parametrize("mode", MODES)
def test_on_http_gets_the_body_and_falls_back_to_the_built_ins(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    gateway = make_gateway(mode_config(mode))
    where: list[bool] = []

    def api(request: Request) -> Response | None:
        where.append(off_loop_thread(mode))
        if request.method == "POST" and request.path == "/publish":
            reached = gateway.publish(request.params["topic"], request.body)
            return Response(202, f"{len(request.body)} bytes to {reached}\n")
        return None

    gateway.on_http(hook(mode, api))
    gateway.on_connect(hook(mode, lambda request: Accept(topics=("news",))))
    gateway.start()
    client = ws_connect(gateway.port)
    try:
        body = b"\x00breaking\xff" * 100
        status, _, answer = http_request(gateway.port, "POST", "/publish?topic=news", body)
        assert (status, answer) == (202, b"1000 bytes to 1\n")
        assert client.recv() == body
        status, _, answer = http_request(gateway.port, "GET", "/healthz")
        assert (status, answer.strip()) == (200, b"ok")
        status, _, _ = http_request(gateway.port, "GET", "/nothing-here")
        assert status == 404
        assert where == [True, True, True]
    finally:
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_one_connections_hooks_run_in_order(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    """on_connect, on_open (its greeting first on the wire), every message, on_close."""
    gateway = make_gateway(mode_config(mode))
    events: dict[int, list[str]] = defaultdict(list)

    def connect(request: Request) -> Accept:
        user = int(request.params["user"])
        events[user].append("connect")
        return Accept(user=user)

    def opened(conn: Connection) -> None:
        events[conn.user].append("open")
        conn.send("hello")

    def message(conn: Connection, data: str | bytes) -> None:
        events[conn.user].append(str(data))
        conn.send(f"echo {data!s}")

    gateway.on_connect(hook(mode, connect))
    gateway.on_open(hook(mode, opened))
    gateway.on_message(hook(mode, message))
    gateway.on_close(hook(mode, lambda conn, code: events[conn.user].append(f"close {code}")))
    gateway.start()
    codes = {1: 1000, 2: 4321}
    clients = {user: ws_connect(gateway.port, f"/?user={user}") for user in codes}
    count = 20
    for n in range(count):
        for client in clients.values():
            client.send(f"m{n}")
    for user, client in clients.items():
        assert client.recv() == "hello"
        assert [client.recv() for _ in range(count)] == [f"echo m{n}" for n in range(count)]
        client.close(status=codes[user])
    wait_until(lambda: all(len(events[user]) == count + 3 for user in codes), "every hook")
    for user, code in codes.items():
        assert events[user] == [
            "connect",
            "open",
            *(f"m{n}" for n in range(count)),
            f"close {code}",
        ]
    wait_until(lambda: settled(gateway), "the hooks to settle")


@pytest.mark.parametrize("mode", ("inline", *MODES))
def test_the_topics_of_an_accept_apply_before_the_101(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    """A publish made as soon as the client has its 101 reaches it: the Accept's topics are
    in place before the 101 leaves, whichever thread applies the decision."""
    gateway = make_gateway(mode_config(mode) if mode != "inline" else Config())
    decide = lambda request: Accept(topics=(request.params["topic"],))  # noqa: E731
    gateway.on_connect(decide if mode == "inline" else hook(mode, decide))
    gateway.start()
    reached = []
    for n in range(30):
        client = ws_connect(gateway.port, f"/?topic=t{n}")
        reached.append(gateway.publish(f"t{n}", "first"))
        client.close()
    assert reached == [1] * 30


@pytest.mark.parametrize("mode", MODES)
def test_the_origin_check_comes_before_on_connect(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    gateway = make_gateway(mode_config(mode, origins=("https://app.example",)))
    asked: list[str | None] = []
    gateway.on_connect(hook(mode, lambda request: asked.append(request.header("origin"))))
    gateway.start()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        ws_connect(gateway.port, origin="https://evil.example")
    assert refused.value.status_code == 403
    ws_connect(gateway.port, origin="https://app.example").close()
    assert asked == ["https://app.example"]


def test_a_callable_object_with_an_async_call_is_an_async_hook(
    make_gateway: Callable[..., Gateway],
) -> None:
    class Echo:
        def __init__(self) -> None:
            self.loops: list[asyncio.AbstractEventLoop] = []

        async def __call__(self, conn: Connection, message: str | bytes) -> None:
            self.loops.append(asyncio.get_running_loop())
            await asyncio.sleep(0)
            conn.send(message)

    gateway = make_gateway(Config())
    echo = Echo()
    gateway.on_message(echo)
    gateway.start()
    client = ws_connect(gateway.port)
    client.send("awaited")
    assert client.recv() == "awaited"
    assert len(echo.loops) == 1
    client.close()


def test_a_hook_replaced_after_start_by_an_async_one_is_awaited(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config())
    gateway.on_message(lambda conn, message: conn.send(f"plain {message!s}"))
    gateway.start()
    client = ws_connect(gateway.port)
    client.send("1")
    assert client.recv() == "plain 1"

    @gateway.on_message
    async def awaited(conn: Connection, message: str | bytes) -> None:
        await asyncio.sleep(0)
        conn.send(f"async {message!s}")

    client.send("2")
    assert client.recv() == "async 2"
    gateway.on_message(lambda conn, message: conn.send(f"plain again {message!s}"))
    client.send("3")
    assert client.recv() == "plain again 3"
    client.close()


# -- exceptions and wrong types ------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_hook_exceptions_are_logged_and_answered_like_sync_ones(
    make_gateway: Callable[..., Gateway], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway(mode_config(mode))
    closed: list[int] = []

    def connect(request: Request) -> None:
        if "fail" in request.params:
            raise KeyError("no such session")

    def opened(conn: Connection) -> None:
        raise ValueError("on_open broke")

    def message(conn: Connection, data: str | bytes) -> None:
        if data == "boom":
            raise ZeroDivisionError("on_message broke")
        conn.send(f"echo {data!s}")

    def close(conn: Connection, code: int) -> None:
        closed.append(code)
        raise LookupError("on_close broke")

    def api(request: Request) -> Response:
        raise RuntimeError("on_http broke")

    for name, fn in (
        ("connect", connect),
        ("open", opened),
        ("message", message),
        ("close", close),
        ("http", api),
    ):
        getattr(gateway, f"on_{name}")(hook(mode, fn))
    gateway.start()
    refused = raw_upgrade(gateway.port, "/?fail")
    assert refused.status == 500
    refused.sock.close()
    status, _, _ = http_request(gateway.port, "GET", "/anything")
    assert status == 500
    client = ws_connect(gateway.port)  # on_open raised: the connection stays open
    client.send("boom")
    client.send("after")  # the message after one whose hook raised is still handled
    assert client.recv() == "echo after"
    client.close()
    wait_until(lambda: closed == [1000] and settled(gateway), "on_close")
    raised = {
        "on_connect": "KeyError",
        "on_open": "ValueError",
        "on_message": "ZeroDivisionError",
        "on_close": "LookupError",
        "on_http": "RuntimeError",
    }
    wait_until(  # on_close's is logged just after it ran
        lambda: all(hook_errors(caplog, f"{name} raised") for name in raised), "every error"
    )
    for hook_name, error in raised.items():
        records = hook_errors(caplog, f"{hook_name} raised")
        assert len(records) == 1, f"{hook_name}: {[r.getMessage() for r in caplog.records]}"
        assert records[0].exc_info is not None and records[0].exc_info[0].__name__ == error


async def returns_an_int(request: Request) -> int:
    return 5


def returns_a_coroutine(request: Request) -> Any:
    async def decide() -> Accept:
        return Accept()

    return decide()


@pytest.mark.parametrize(
    ("hook_name", "fn", "threads", "message"),
    [
        ("connect", returns_an_int, 0, "on_connect returned int"),
        ("connect", lambda request: 5, 2, "on_connect returned int"),
        ("connect", returns_a_coroutine, 0, "on_connect returned an awaitable from a plain"),
        ("connect", returns_a_coroutine, 2, "on_connect returned an awaitable from a plain"),
        ("http", returns_an_int, 0, "on_http returned int"),
        ("http", lambda request: b"bytes", 2, "on_http returned bytes"),
        ("http", returns_a_coroutine, 0, "on_http returned an awaitable from a plain"),
        ("http", returns_a_coroutine, 2, "on_http returned an awaitable from a plain"),
    ],
    ids=[
        "connect-async-int",
        "connect-thread-int",
        "connect-inline-coroutine",
        "connect-thread-coroutine",
        "http-async-int",
        "http-thread-bytes",
        "http-inline-coroutine",
        "http-thread-coroutine",
    ],
)
def test_a_hook_returning_the_wrong_type_gets_500_and_a_log_line_naming_it(
    make_gateway: Callable[..., Gateway],
    caplog: pytest.LogCaptureFixture,
    hook_name: str,
    fn: Callable[..., Any],
    threads: int,
    message: str,
) -> None:
    gateway = make_gateway(Config(hook_threads=threads))
    getattr(gateway, f"on_{hook_name}")(fn)
    gateway.start()
    if hook_name == "connect":
        response = raw_upgrade(gateway.port)
        response.sock.close()
        status = response.status
    else:
        status, _, _ = http_request(gateway.port, "GET", "/")
    assert status == 500
    wait_until(lambda: settled(gateway), "the hook to settle")
    (record,) = [r for r in caplog.records if r.name == "lowmemws"]
    assert record.exc_info is not None and record.exc_info[0] is TypeError
    assert message in str(record.exc_info[1])
    assert gateway.connection_count == 0


@pytest.mark.parametrize("mode", ("inline", *MODES))
def test_an_accept_whose_topics_cannot_be_subscribed_gets_500(
    make_gateway: Callable[..., Gateway], mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A topic that is not a str fails while the decision is applied: answered 500 at once
    (not left waiting for handshake_timeout), like a hook that raised."""
    gateway = make_gateway(
        mode_config(mode, handshake_timeout=60.0)
        if mode != "inline"
        else Config(handshake_timeout=60.0)
    )
    decide = lambda request: Accept(topics=(b"not a str",))  # noqa: E731
    gateway.on_connect(decide if mode == "inline" else hook(mode, decide))
    opened: list[Connection] = []
    gateway.on_open(opened.append)
    gateway.start()
    response = raw_upgrade(gateway.port)
    assert response.status == 500
    response.sock.close()
    wait_until(lambda: settled(gateway) and not gateway.stats()["handshakes"], "the request to end")
    assert opened == [] and gateway.connection_count == 0
    wait_until(  # logged just after the 500 is sent
        lambda: any(r.name == "lowmemws" and r.levelno >= logging.ERROR for r in caplog.records),
        "the error to be logged",
    )


@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
@pytest.mark.parametrize("threads", [0, 2], ids=["inline", "threads"])
def test_a_plain_on_message_returning_a_coroutine_gets_an_error_naming_the_hook(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture, threads: int
) -> None:
    gateway = make_gateway(Config(hook_threads=threads))

    async def echo(conn: Connection, message: str | bytes) -> None:
        conn.send(message)

    gateway.on_message(lambda conn, message: echo(conn, message))
    gateway.start()
    client = ws_connect(gateway.port)
    client.send("lost")
    try:
        waiting.wait_until(
            lambda: bool(hook_errors(caplog, "on_message returned an awaitable")),
            "an error naming on_message",
            2.0,
        )
    finally:
        client.close()


# -- a Request outlives its hook only as a dead handle ---------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_request_is_valid_until_the_hook_returns_and_dead_after(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    """A slow hook reads its own request after other requests went through the read
    buffers meanwhile; once it has returned, the Request raises RuntimeError."""
    gateway = make_gateway(mode_config(mode, hook_threads=4))
    gate = new_gate(gates)
    kept: list[Request] = []
    seen: dict[str, tuple[str, str | None, str, bytes]] = {}

    def keep(request: Request) -> Response | None:
        kept.append(request)
        seen[request.path] = (request.query, request.header("x-n"), request.method, request.body)
        return Response(200, "kept") if request.method == "POST" else None

    slow = blocking_hook(mode, gate, keep)
    route = by_path(mode, {"/slow": slow, "/slow-post": slow}, hook(mode, keep))
    gateway.on_connect(route)
    gateway.on_http(route)
    gateway.start()
    waiting_upgrade = send_upgrade(gateway.port, "/slow?mine=1")
    waiting_post = socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)
    waiting_post.sendall(
        b"POST /slow-post?r=2 HTTP/1.1\r\nHost: x\r\nX-N: slow\r\nContent-Length: 8\r\n\r\nthe body"
    )
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 2, "both slow hooks to run")
    for n in range(5):  # other requests pass through the read buffers meanwhile
        client = ws_connect(gateway.port, f"/other{n}?q={n}", header=[f"X-N: {n}"])
        client.close()
    gate.set()
    assert read_response(waiting_upgrade).status == 101
    assert read_response(waiting_post).status == 200
    waiting_upgrade.close()
    waiting_post.close()
    wait_until(lambda: settled(gateway), "the hooks to settle")
    assert seen["/slow"] == ("mine=1", None, "GET", b"")
    assert seen["/slow-post"] == ("r=2", "slow", "POST", b"the body")
    assert len(kept) == 7
    for n in range(5):
        assert seen[f"/other{n}"] == (f"q={n}", str(n), "GET", b"")
    for request in kept:
        for use in request_uses(request):
            with pytest.raises(RuntimeError, match="valid only during the hook"):
                use()


def request_uses(request: Request) -> list[Callable[[], object]]:
    """request_uses are the ways to read a Request."""
    return [
        lambda: request.path,
        lambda: request.method,
        lambda: request.query,
        lambda: request.params,
        lambda: request.header("host"),
        lambda: request.headers,
        lambda: request.cookies,
        lambda: request.body,
        lambda: request.subprotocols,
    ]


# -- slow hooks, clients that leave ----------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_a_hook_slower_than_handshake_timeout_gets_408_and_leaks_nothing(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    gateway = make_gateway(mode_config(mode, handshake_timeout=0.5))
    gate = new_gate(gates)
    opened: list[Connection] = []
    finished: list[str] = []

    def decide(request: Request) -> Accept | Response:
        finished.append(request.path)  # the request is still readable: the hook has not returned
        if request.method == "POST":
            return Response(200, "too late")
        return Accept(user=1, topics=("news",))

    route = by_path(mode, {"/slow": blocking_hook(mode, gate, decide)}, hook(mode, decide))
    gateway.on_connect(route)
    gateway.on_http(route)
    gateway.on_open(hook(mode, opened.append))
    gateway.start()
    before = hook_leftovers()
    upgrade = send_upgrade(gateway.port, "/slow")
    post = socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)
    post.sendall(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi")
    assert read_response(upgrade).status == 408
    assert read_response(post).status == 408
    stats = gateway.stats()
    assert stats["handshake_timeouts_total"] == 2
    assert stats["handshakes_parked"] == 0
    assert stats["hooks_in_flight"] == 2  # the hooks still run: their answers come too late
    gate.set()
    wait_until(lambda: finished == ["/slow", "/slow"], "the slow hooks to return")
    wait_until(lambda: settled(gateway), "the hooks to settle")
    upgrade.close()
    post.close()
    wait_until(lambda: gateway.stats()["handshakes"] == 0, "the timed out requests to end")
    assert opened == [] and gateway.connection_count == 0
    assert gateway.send_to_user(1, "x") == 0 and gateway.topic_size("news") == 0
    wait_until(
        lambda: all(key in before for key in hook_leftovers()), "the late hooks' objects to go"
    )
    client = ws_connect(gateway.port, "/fast")  # the gateway still serves
    assert gateway.send_to_user(1, "after") == 1
    assert client.recv() == "after"
    client.close()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hangup", ["reset", "fin"])
def test_a_client_gone_while_its_hook_runs_costs_nothing_and_misleads_no_one(
    make_gateway: Callable[..., Gateway], mode: str, hangup: str, gates: list[threading.Event]
) -> None:
    """A hangs up while its on_connect runs: its slot is freed at once; B, likely on A's
    reused fd, is not opened by A's late Accept, only by its own."""
    gateway = make_gateway(mode_config(mode))
    gate_a, gate_b = new_gate(gates), new_gate(gates)
    opened: list[int] = []

    def accept(request: Request) -> Accept:
        return Accept(user=int(request.params["user"]), topics=("news",))

    gateway.on_connect(
        by_path(
            mode,
            {"/a": blocking_hook(mode, gate_a, accept), "/b": blocking_hook(mode, gate_b, accept)},
            hook(mode, accept),
        )
    )
    gateway.on_open(hook(mode, lambda conn: opened.append(conn.user)))
    gateway.start()
    a = send_upgrade(gateway.port, "/a?user=1")
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "A's hook to run")
    if hangup == "reset":
        a.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    a.close()  # the client is gone
    wait_until(lambda: gateway.stats()["handshakes"] == 0, "A's slot to be freed")
    assert gateway.stats()["handshakes_parked"] == 0
    assert gateway.stats()["hooks_in_flight"] == 1  # A's hook still runs
    b = send_upgrade(gateway.port, "/b?user=2")
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "B's hook to run")
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 2, "A's and B's hooks to count")
    gate_a.set()
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 1, "A's hook to return")
    assert gateway.connection_count == 0 and opened == []
    assert gateway.stats()["handshakes_parked"] == 1  # B still waits for its own hook
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)  # nothing was sent to B
    b.setblocking(True)
    gate_b.set()
    response = read_response(b)
    assert response.status == 101
    wait_until(lambda: opened == [2], "B's on_open")
    assert gateway.send_to_user(1, "to A") == 0
    assert gateway.publish("news", "to B") == 1
    assert read_frame(b, response.rest)[:2] == (1, b"to B")
    b.close()
    wait_until(lambda: gateway.connection_count == 0 and settled(gateway), "B to close")


@pytest.mark.parametrize("mode", MODES)
def test_frames_sent_while_the_upgrade_is_parked_reach_on_message_after_on_open(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    gateway = make_gateway(mode_config(mode))
    gate = new_gate(gates)
    events: list[str] = []
    gateway.on_connect(blocking_hook(mode, gate, lambda request: Accept(user=5)))
    gateway.on_open(hook(mode, lambda conn: events.append("open")))

    def message(conn: Connection, data: str | bytes) -> None:
        events.append(str(data))
        conn.send(f"echo {data!s}")

    gateway.on_message(hook(mode, message))
    gateway.start()
    sock = send_upgrade(gateway.port)
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "on_connect to run")
    sock.sendall(masked_frame(1, b"early") + masked_frame(1, b"eager"))  # before the 101
    time.sleep(0.1)  # time to read them, were the parked socket read
    assert gateway.stats()["messages_received_total"] == 0
    gate.set()
    response = read_response(sock)
    assert response.status == 101
    first = read_frame(sock, response.rest)
    assert first[:2] == (1, b"echo early")
    assert read_frame(sock, first[2])[:2] == (1, b"echo eager")
    assert events == ["open", "early", "eager"]
    sock.close()
    wait_until(lambda: settled(gateway) and gateway.connection_count == 0, "the client to go")


@pytest.mark.parametrize("mode", MODES)
def test_an_http_client_gone_while_on_http_runs_costs_nothing(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    gateway = make_gateway(mode_config(mode))
    gate = new_gate(gates)
    answered: list[str] = []

    def answer(request: Request) -> Response:
        answered.append(request.path)
        return Response(200, "nobody reads this")

    gateway.on_http(by_path(mode, {"/slow": blocking_hook(mode, gate, answer)}, hook(mode, answer)))
    gateway.start()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)
    sock.sendall(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "on_http to run")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
    wait_until(lambda: gateway.stats()["handshakes"] == 0, "the slot to be freed")
    assert gateway.stats()["handshakes_parked"] == 0
    gate.set()
    wait_until(lambda: answered == ["/slow"] and settled(gateway), "on_http to return")
    status, _, body = http_request(gateway.port, "GET", "/fast")
    assert (status, body) == (200, b"nobody reads this")


@pytest.mark.parametrize("mode", MODES)
def test_a_client_gone_while_on_message_runs_gets_on_close_after_it(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    gateway = make_gateway(mode_config(mode))
    gate = new_gate(gates)
    events: list[str] = []

    def message(conn: Connection, data: str | bytes) -> None:
        events.append(f"{data!s} ends")
        events.append(f"send after the client left: {conn.send('late')!s}")

    gateway.on_message(blocking_hook(mode, gate, message))
    gateway.on_close(hook(mode, lambda conn, code: events.append(f"close {code}")))
    gateway.start()
    client = ws_connect(gateway.port)
    client.send("m")
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 1, "on_message to run")
    client.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.sock.close()
    wait_until(lambda: gateway.connection_count == 0, "the connection to end")
    time.sleep(0.1)  # time for on_close to overtake on_message, were it allowed to
    assert events == []
    gate.set()
    wait_until(lambda: len(events) == 3, "on_message, then on_close")
    assert events == ["m ends", "send after the client left: SendResult.GONE", "close 1006"]
    wait_until(lambda: settled(gateway), "the hooks to settle")


@pytest.mark.parametrize("mode", MODES)
def test_a_half_closed_http_client_still_gets_the_answer_of_a_slow_on_http(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    gateway = make_gateway(mode_config(mode))
    gate = new_gate(gates)
    gateway.on_http(blocking_hook(mode, gate, lambda request: Response(200, request.body)))
    gateway.start()
    sock = socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)
    sock.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
    sock.shutdown(socket.SHUT_WR)  # the request is complete; the client only reads now
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "on_http to run")
    time.sleep(0.1)  # time to notice the half-close, were it taken for a hang-up
    gate.set()
    response = read_response(sock)
    assert response.status == 200
    body = response.rest + read_until(sock, b"never sent", timeout=DEADLINE)  # to EOF
    assert body == b"hello"
    sock.close()
    wait_until(lambda: settled(gateway), "the hooks to settle")


# -- one connection's messages: in order, one at a time --------------------------------------------


class OrderLog:
    """OrderLog records each connection's messages as its on_message sees them, and whether
    two calls for one connection (or more than ``cap`` calls in all) ever overlapped."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.seen: dict[int, list[str]] = defaultdict(list)
        self.active: dict[int, int] = defaultdict(int)
        self.overlaps = 0
        self.running = 0
        self.most_running = 0
        self.threads: set[str] = set()

    def enter(self, user: int, message: str) -> None:
        with self.lock:
            self.active[user] += 1
            self.overlaps += self.active[user] > 1
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.seen[user].append(message)
            self.threads.add(threading.current_thread().name)

    def leave(self, user: int) -> None:
        with self.lock:
            self.active[user] -= 1
            self.running -= 1

    def count(self) -> int:
        with self.lock:
            return sum(len(messages) for messages in self.seen.values())


def connect_users(port: int, users: range) -> dict[int, websocket.WebSocket]:
    return {user: ws_connect(port, f"/?user={user}") for user in users}


def by_user(request: Request) -> Accept:
    return Accept(user=int(request.params["user"]))


def test_async_on_message_sees_one_connections_messages_in_order_one_at_a_time(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config())
    log = OrderLog()

    @gateway.on_message
    async def slow(conn: Connection, message: str | bytes) -> None:
        log.enter(conn.user, str(message))
        try:
            n = int(str(message)[1:])
            await asyncio.sleep(0.001 * (n % 3))  # uneven waits: a later call could overtake
        finally:
            log.leave(conn.user)

    gateway.on_connect(by_user)
    gateway.start()
    clients = connect_users(gateway.port, range(1, 4))
    per_client = 100
    for n in range(per_client):
        for client in clients.values():
            client.send(f"m{n}")
    wait_until(lambda: log.count() == 3 * per_client, "every message")
    for user in clients:
        assert log.seen[user] == [f"m{n}" for n in range(per_client)]
    assert log.overlaps == 0
    assert log.most_running > 1  # connections do not wait for each other
    assert log.threads == {"lowmemws-asyncio"}
    wait_until(lambda: settled(gateway), "the hooks to settle")
    for client in clients.values():
        client.close()


def test_threaded_on_message_keeps_each_connections_order(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(hook_threads=4))
    log = OrderLog()

    @gateway.on_message
    def slow(conn: Connection, message: str | bytes) -> None:
        log.enter(conn.user, str(message))
        try:
            time.sleep(0.0005 * (int(str(message)[1:]) % 3))
        finally:
            log.leave(conn.user)
        conn.send(f"done {message!s}")

    gateway.on_connect(by_user)
    gateway.start()
    clients = connect_users(gateway.port, range(1, 5))
    per_client = 100
    for n in range(per_client):
        for client in clients.values():
            client.send(f"m{n}")
    for client in clients.values():
        assert [client.recv() for _ in range(per_client)] == [
            f"done m{n}" for n in range(per_client)
        ]
    for user in clients:
        assert log.seen[user] == [f"m{n}" for n in range(per_client)]
    assert log.overlaps == 0
    assert len(log.threads) > 1 and all(t.startswith("lowmemws-hook") for t in log.threads)
    wait_until(lambda: settled(gateway), "the hooks to settle")
    for client in clients.values():
        client.close()


@pytest.mark.parametrize(
    ("connect_kind", "open_kind", "message_kind"),
    [
        ("async", "inline", "inline"),
        ("async", "inline", "async"),
        ("inline", "async", "inline"),
        ("async", "async", "inline"),
        ("async", "thread", "thread"),
        ("thread", "async", "thread"),
        ("thread", "thread", "async"),
    ],
)
def test_mixed_hooks_keep_on_open_before_the_first_message(
    make_gateway: Callable[..., Gateway], connect_kind: str, open_kind: str, message_kind: str
) -> None:
    """The first message comes in the same write as the upgrade request, so it is read as
    soon as the 101 is out: on_open (and its greeting) must still come first. "thread":
    plain hooks on hook threads (then no hook runs inline)."""
    kinds = (connect_kind, open_kind, message_kind)
    gateway = make_gateway(Config(hook_threads=2 if "thread" in kinds else 0))
    events: list[str] = []

    def connect(request: Request) -> Accept:
        events.append("connect")
        return Accept(user=1)

    def opened(conn: Connection) -> None:
        events.append("open")
        conn.send("hello")

    def message(conn: Connection, data: str | bytes) -> None:
        events.append(str(data))
        conn.send(f"echo {data!s}")

    for name, fn, kind in (
        ("connect", connect, connect_kind),
        ("open", opened, open_kind),
        ("message", message, message_kind),
    ):
        getattr(gateway, f"on_{name}")(hook("async", fn) if kind == "async" else fn)
    gateway.start()
    for round_ in range(10):
        events.clear()
        sock = send_upgrade(gateway.port, after=masked_frame(1, b"first") + masked_frame(1, b"2nd"))
        response = read_response(sock)
        assert response.status == 101
        got = []
        rest = response.rest
        for _ in range(3):
            opcode, payload, rest = read_frame(sock, rest)
            got.append(payload)
        assert got == [b"hello", b"echo first", b"echo 2nd"], f"round {round_}"
        assert events == ["connect", "open", "first", "2nd"], f"round {round_}"
        sock.close()
        wait_until(lambda: gateway.connection_count == 0, "the client to leave")


def test_with_no_hook_threads_plain_hooks_run_on_the_loop_thread_even_after_async_ones(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(hook_threads=0))
    where: list[tuple[str, str]] = []
    gateway.on_connect(hook("async", lambda request: Accept()))
    gateway.on_open(lambda conn: where.append(("open", threading.current_thread().name)))

    @gateway.on_message
    def echo(conn: Connection, message: str | bytes) -> None:
        where.append(("message", threading.current_thread().name))
        conn.send(message)

    gateway.start()
    client = ws_connect(gateway.port)
    client.send("x")
    assert client.recv() == "x"
    client.close()
    assert where == [("open", "lowmemws-loop"), ("message", "lowmemws-loop")]


# -- back-pressure at Config.hook_queue ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_at_hook_queue_slow_hooks_make_reading_wait_and_nothing_is_dropped(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    cap = 4
    gateway = make_gateway(mode_config(mode, hook_queue=cap, hook_threads=8))
    log = OrderLog()

    if mode == "threads":

        @gateway.on_message
        def slow(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            time.sleep(0.002)
            log.leave(conn.user)
            conn.send(f"done {message!s}")

    else:

        @gateway.on_message
        async def slow_async(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            await asyncio.sleep(0.002)
            log.leave(conn.user)
            conn.send(f"done {message!s}")

    gateway.on_connect(by_user)
    gateway.start()
    clients = connect_users(gateway.port, range(1, 7))
    per_client = 40
    for n in range(per_client):
        for client in clients.values():
            client.send(f"m{n}")
    for client in clients.values():
        assert [client.recv() for _ in range(per_client)] == [
            f"done m{n}" for n in range(per_client)
        ]
    for user in clients:
        assert log.seen[user] == [f"m{n}" for n in range(per_client)]
    assert log.overlaps == 0
    assert 1 < log.most_running <= cap
    stats = gateway.stats()
    assert stats["messages_received_total"] == 6 * per_client
    assert stats["dropped"] == {"write_limit": 0, "closed": 0, "latest": 0, "worker_queue": 0}
    wait_until(lambda: settled(gateway), "the hooks to settle")
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_at_hook_queue_accepting_waits_until_hooks_finish(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    """Four messages fill hook_queue=4 and two more are held: new clients then wait in the
    listen backlog (not accepted) until the hooks return; then everyone is served."""
    cap = 4
    gateway = make_gateway(mode_config(mode, hook_queue=cap, hook_threads=cap))
    gate = new_gate(gates)
    log = OrderLog()

    if mode == "threads":

        @gateway.on_message
        def blocked(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            gate.wait(DEADLINE)
            log.leave(conn.user)
            conn.send(f"done {message!s}")

    else:

        @gateway.on_message
        async def blocked_async(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            while not gate.is_set():
                await asyncio.sleep(0.005)
            log.leave(conn.user)
            conn.send(f"done {message!s}")

    gateway.on_connect(by_user)
    gateway.start()
    clients = connect_users(gateway.port, range(1, 7))
    for client in clients.values():
        client.send("first")
    wait_until(lambda: log.count() == cap, "the hooks to fill hook_queue")
    wait_until(lambda: gateway.stats()["accept_paused"] == 1, "accepting to stop")
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 6, "four running, two held")
    late = [send_upgrade(gateway.port, f"/?user={user}") for user in (7, 8)]
    time.sleep(0.3)  # time the gateway would need to accept them, were it accepting
    stats = gateway.stats()
    assert stats["handshakes"] == 0 and stats["handshakes_total"] == 6
    assert log.count() == cap and log.most_running == cap
    gate.set()
    for client in clients.values():
        assert client.recv() == "done first"
    for sock in late:
        assert read_response(sock).status == 101
        sock.close()
    for client in clients.values():
        client.send("second")
        assert client.recv() == "done second"
    assert log.most_running == cap
    wait_until(lambda: settled(gateway), "the hooks to settle")
    assert gateway.stats()["accept_paused"] == 0
    for client in clients.values():
        client.close()


@pytest.mark.parametrize("mode", MODES)
def test_at_hook_queue_every_upgrade_is_decided_in_the_end(
    make_gateway: Callable[..., Gateway], mode: str, gates: list[threading.Event]
) -> None:
    """Twelve upgrades at once with on_connect blocked and hook_queue=4: at most four hooks
    run, the rest wait (parked or in the backlog); once the hooks return all are upgraded."""
    cap = 4
    gateway = make_gateway(mode_config(mode, hook_queue=cap, hook_threads=cap))
    gate = new_gate(gates)
    log = OrderLog()

    def decide(request: Request) -> Accept:
        user = int(request.params["user"])
        log.leave(user)
        return Accept(user=user)

    inner = blocking_hook(mode, gate, decide)
    if mode == "threads":

        def connect(request: Request) -> Accept:
            log.enter(int(request.params["user"]), "connect")
            return inner(request)

    else:

        async def connect(request: Request) -> Accept:
            log.enter(int(request.params["user"]), "connect")
            return await inner(request)

    gateway.on_connect(connect)
    opened: list[int] = []
    gateway.on_open(lambda conn: opened.append(conn.user))
    gateway.start()
    users = range(1, 13)
    socks = [send_upgrade(gateway.port, f"/?user={user}") for user in users]
    wait_until(lambda: log.count() == cap, "the hooks to fill hook_queue")
    time.sleep(0.2)  # time for more hooks to start, were the cap not kept
    assert log.count() == cap
    gate.set()
    for sock in socks:
        assert read_response(sock).status == 101
    wait_until(lambda: sorted(opened) == list(users), "every on_open")
    assert log.most_running <= cap and sorted(log.seen) == list(users)
    wait_until(lambda: settled(gateway), "the hooks to settle")
    for sock in socks:
        sock.close()


def test_one_busy_connection_is_paused_not_the_others(
    make_gateway: Callable[..., Gateway], gates: list[threading.Event]
) -> None:
    """A connection whose messages queue behind its slow on_message (KEY_QUEUE_MAX of them)
    is no longer read: its next messages wait in the kernel while other connections are
    served; once its hook returns every message is handled, in order."""
    from lowmemws._dispatch import KEY_QUEUE_MAX

    gateway = make_gateway(Config())
    gate = new_gate(gates)
    log = OrderLog()

    @gateway.on_message
    async def handle(conn: Connection, message: str | bytes) -> None:
        if conn.user == 1:
            log.enter(1, str(message))
            while not gate.is_set():
                await asyncio.sleep(0.005)
            log.leave(1)
        conn.send(f"done {message!s}")

    gateway.on_connect(by_user)
    gateway.start()
    busy, other = ws_connect(gateway.port, "/?user=1"), ws_connect(gateway.port, "/?user=2")

    def received() -> int:
        return int(gateway.stats()["messages_received_total"])

    queued = KEY_QUEUE_MAX + 1  # one running, KEY_QUEUE_MAX waiting behind it: paused
    for n in range(queued):
        busy.send(f"m{n}")
        wait_until(lambda n=n: received() == n + 1, f"message {n} to be read")
    total = 3 * KEY_QUEUE_MAX
    for n in range(queued, total):
        busy.send(f"m{n}")
    other.send("hi")
    assert other.recv() == "done hi"
    time.sleep(0.2)  # time to read the busy socket, were it read
    assert received() == queued + 1
    assert log.count() == 1
    gate.set()
    assert [busy.recv() for _ in range(total)] == [f"done m{n}" for n in range(total)]
    assert log.seen[1] == [f"m{n}" for n in range(total)] and log.overlaps == 0
    wait_until(lambda: settled(gateway), "the hooks to settle")
    busy.close()
    other.close()


def test_parked_handshakes_count_against_max_handshakes(
    make_gateway: Callable[..., Gateway], gates: list[threading.Event]
) -> None:
    gateway = make_gateway(Config(max_handshakes=2))
    gate = new_gate(gates)
    gateway.on_connect(
        by_path("async", {"/slow": blocking_hook("async", gate, by_user)}, hook("async", by_user))
    )
    gateway.start()
    slow = [send_upgrade(gateway.port, f"/slow?user={user}") for user in (1, 2)]
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 2, "two parked handshakes")
    third = send_upgrade(gateway.port, "/?user=3")
    time.sleep(0.2)  # time to accept it, were there room
    assert gateway.stats()["handshakes"] == 2 and gateway.stats()["accept_paused"] == 1
    gate.set()
    for sock in (*slow, third):
        assert read_response(sock).status == 101
        sock.close()
    wait_until(lambda: settled(gateway) and gateway.connection_count == 0, "the clients to go")


def test_a_connection_with_held_messages_stays_paused_when_its_queue_drains(
    make_gateway: Callable[..., Gateway], gates: list[threading.Event]
) -> None:
    """A fills its queue past KEY_QUEUE_MAX (the Dispatcher pauses it) and, in the same read,
    the cap (its last messages are held: the loop pauses it too); B and C keep the cap full.
    Once A's own hooks have run, A's new messages must still wait in the kernel."""
    from lowmemws._dispatch import KEY_QUEUE_MAX

    cap = KEY_QUEUE_MAX + 4
    gateway = make_gateway(Config(hook_queue=cap))
    user_gates = {user: new_gate(gates) for user in (1, 2, 3)}
    log = OrderLog()

    @gateway.on_message
    async def gated(conn: Connection, message: str | bytes) -> None:
        log.enter(conn.user, str(message))
        while not user_gates[conn.user].is_set():
            await asyncio.sleep(0.002)
        log.leave(conn.user)

    gateway.on_connect(by_user)
    gateway.start()
    socks = {}
    for user in (1, 2, 3):
        socks[user] = send_upgrade(gateway.port, f"/?user={user}")
        assert read_response(socks[user]).status == 101
    a, b, c = socks[1], socks[2], socks[3]

    def received() -> int:
        return int(gateway.stats()["messages_received_total"])

    def frames(prefix: str, numbers: range) -> bytes:
        return b"".join(masked_frame(1, f"{prefix}{n}".encode()) for n in numbers)

    for n in range(3):  # B: one running, two queued
        b.sendall(frames("b", range(n, n + 1)))
        wait_until(lambda n=n: received() == n + 1, "B's message")
    a.sendall(frames("a", range(cap)))  # one read: 17 reach the queue (the cap), 3 are held
    wait_until(lambda: received() == 3 + cap, "A's messages")
    c.sendall(frames("c", range(30)))  # held too: they will refill the cap
    wait_until(lambda: received() == 3 + cap + 30, "C's messages")
    user_gates[1].set()  # A's hooks run; B's and C's keep the cap full
    wait_until(lambda: len(log.seen[1]) == cap, "A's hooks")
    time.sleep(0.3)  # the loop releases what room allows
    before = received()
    for n in range(cap, cap + 50):
        a.sendall(frames("a", range(n, n + 1)))
        time.sleep(0.005)
    time.sleep(0.3)  # time to read them, were A read
    read_meanwhile = received() - before
    user_gates[2].set()
    user_gates[3].set()
    wait_until(lambda: log.count() == 3 + cap + 50 + 30, "every message")
    assert log.seen[1] == [f"a{n}" for n in range(cap + 50)]
    assert log.seen[3] == [f"c{n}" for n in range(30)]
    for sock in socks.values():
        sock.close()
    assert read_meanwhile <= 2, f"{read_meanwhile} of A's messages read while the cap was full"


# -- zero idle cost --------------------------------------------------------------------------------


def hook_leftovers() -> dict[int, str]:
    """hook_leftovers lists (by id) the objects of hook calls alive now: Jobs, Requests,
    Connections, asyncio tasks and coroutines, and thread-pool futures."""
    from concurrent.futures import Future

    from lowmemws._dispatch import Job

    gc.collect()
    found: dict[int, str] = {}
    for obj in gc.get_objects():
        if isinstance(obj, Job | Request | Connection | asyncio.Task | Future):
            found[id(obj)] = repr(obj)[:120]
        elif inspect.iscoroutine(obj) and "lowmemws" in obj.cr_code.co_filename:
            found[id(obj)] = repr(obj)[:120]
    return found


@pytest.mark.parametrize("mode", MODES)
def test_no_hook_object_remains_once_the_hooks_have_returned(
    make_gateway: Callable[..., Gateway], mode: str
) -> None:
    gateway = make_gateway(mode_config(mode))
    gateway.on_connect(hook(mode, by_user))
    gateway.on_open(hook(mode, lambda conn: conn.send("hello")))
    gateway.on_message(hook(mode, lambda conn, message: conn.send(f"echo {message!s}")))
    closed: list[int] = []
    gateway.on_close(hook(mode, lambda conn, code: closed.append(code)))
    before = hook_leftovers()
    gateway.start()
    clients = connect_users(gateway.port, range(1, 51))
    for client in clients.values():
        client.send("ping")
    for client in clients.values():
        assert client.recv() == "hello" and client.recv() == "echo ping"
    clients[1].close()  # one on_close too
    wait_until(lambda: closed == [1000] and settled(gateway), "the hooks to settle")

    def left() -> dict[int, str]:
        return {key: text for key, text in hook_leftovers().items() if key not in before}

    # the last hook's drain may still be finishing: bounded wait, then nothing may remain
    try:
        wait_until(lambda: not left(), "the hook objects to go")
    except AssertionError:
        remaining = left()
        raise AssertionError(
            f"{len(remaining)} left, e.g. {list(remaining.values())[:5]}"
        ) from None
    stats = gateway.stats()
    assert stats["hooks_in_flight"] == 0 and stats["handshakes_parked"] == 0
    assert stats["handshakes"] == 0 and gateway.connection_count == 49
    for client in list(clients.values())[1:]:
        client.close()


# -- shutdown with hooks in flight -----------------------------------------------------------------


def answer_close(client: websocket.WebSocket) -> int:
    """answer_close reads frames until the server's close, answers it and returns its code."""
    code = close_code(client)
    client.send_close(code)
    client.shutdown()
    return code


@pytest.mark.parametrize("mode", MODES)
def test_shutdown_with_hooks_in_flight_is_bounded_and_clients_get_1001(
    make_gateway: Callable[..., Gateway],
    mode: str,
    gates: list[threading.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Three on_message calls and one on_connect never finish by themselves: stop() closes
    the clients with 1001 (the parked upgrade gets 503), waits shutdown_timeout for the
    hooks, cancels the coroutines (a hook thread cannot be stopped: its late result is
    dropped) and returns."""
    shutdown_timeout = 1.0
    gateway = make_gateway(mode_config(mode, shutdown_timeout=shutdown_timeout, hook_threads=4))
    gate = new_gate(gates)
    log = OrderLog()
    cancelled: list[str] = []
    late: list[object] = []

    def record_late(conn: Connection, message: str | bytes) -> None:
        late.append(conn.send("too late"))

    if mode == "threads":

        @gateway.on_message
        def stuck(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            gate.wait(DEADLINE)
            record_late(conn, message)

    else:

        @gateway.on_message
        async def stuck_async(conn: Connection, message: str | bytes) -> None:
            log.enter(conn.user, str(message))
            try:
                await asyncio.sleep(3 * DEADLINE)
            except asyncio.CancelledError:
                cancelled.append(str(message))
                raise

    def accept(request: Request) -> Accept:
        late.append("accept")
        return by_user(request)

    gateway.on_connect(
        by_path(mode, {"/slow": blocking_hook(mode, gate, accept)}, hook(mode, by_user))
    )
    gateway.start()
    clients = connect_users(gateway.port, range(1, 4))
    for client in clients.values():
        client.send("stuck")
    wait_until(lambda: log.count() == 3, "the three hooks to run")
    parked = send_upgrade(gateway.port, "/slow?user=9")
    wait_until(lambda: gateway.stats()["handshakes_parked"] == 1, "the slow on_connect to run")
    results: dict[int, int] = {}
    readers = [
        threading.Thread(target=lambda u=user, c=client: results.__setitem__(u, answer_close(c)))
        for user, client in clients.items()
    ]
    for reader in readers:
        reader.start()
    started = time.monotonic()
    gateway.stop(timeout=3 * DEADLINE)
    took = time.monotonic() - started
    for reader in readers:
        reader.join(DEADLINE)
    assert results == {1: 1001, 2: 1001, 3: 1001}
    assert read_response(parked).status == 503
    parked.close()
    # bounded: the hooks (30 s, or until the gate) are not waited for past shutdown_timeout
    assert took < shutdown_timeout + DEADLINE / 2, f"stop() took {took:.1f} s"
    assert hook_errors(caplog, "abandoned at shutdown")
    if mode == "async":
        wait_until(lambda: sorted(cancelled) == ["stuck"] * 3, "the coroutines to be cancelled")
        assert late == []
    else:
        gate.set()  # the hook threads finish now: their sends and Accept find nothing
        wait_until(lambda: len(late) == 4, "the hook threads to finish")
        assert sorted(map(str, late)) == ["SendResult.GONE"] * 3 + ["accept"]
    assert gateway.connection_count == 0


#: A process whose async on_open never ends is run by a hook thread (it follows a plain
#: on_connect in that connection's drain); it stops the gateway, then prints what its hook saw
#: and exits: "start" with start()/stop(), "serve" inside asyncio.run with serve() (the
#: coroutine must be cancelled when the gateway stops, not only when the application's
#: loop ends).
STUCK_IN_A_HOOK_THREAD = """
import asyncio, sys, time
import websocket
from lowmemws import Accept, Config, Gateway

gateway = Gateway("127.0.0.1", 0, config=Config(hook_threads=2, shutdown_timeout=0.5))
gateway.on_connect(lambda request: Accept())
seen = []

@gateway.on_open
async def stuck(conn):
    try:
        await asyncio.sleep(60)
    except asyncio.CancelledError:
        seen.append("cancelled")
        raise

def connect_and_wait():
    client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=5)
    deadline = time.monotonic() + 5
    while not gateway.stats()["hooks_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.01)
    return client

async def serve():
    serving = asyncio.create_task(gateway.serve(handle_signals=False))
    await asyncio.to_thread(gateway.wait_ready, 5)
    client = await asyncio.to_thread(connect_and_wait)
    gateway.stop()
    await serving
    await asyncio.sleep(0.1)
    print(seen, flush=True)  # before asyncio.run cancels what is left

if sys.argv[1] == "start":
    gateway.start()
    client = connect_and_wait()
    gateway.stop()
    print(seen, flush=True)
else:
    asyncio.run(serve())
"""


@pytest.mark.parametrize("how", ["start", "serve"])
def test_a_coroutine_hook_run_by_a_hook_thread_is_cancelled_and_the_process_exits(
    how: str,
) -> None:
    """The hook thread waits for the coroutine; at shutdown the coroutine is cancelled and
    the thread wakes, so the interpreter can exit (it joins the hook threads)."""
    import subprocess
    import sys

    try:
        done = subprocess.run(
            [sys.executable, "-c", STUCK_IN_A_HOOK_THREAD, how],
            capture_output=True,
            text=True,
            timeout=DEADLINE,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"the process did not exit; it printed {exc.stdout!r}") from None
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "['cancelled']", done.stderr


def test_a_hook_thread_that_outlives_stop_runs_no_coroutine_after_it(
    make_gateway: Callable[..., Gateway],
    gates: list[threading.Event],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A plain on_message blocks its hook thread past stop(); the connection's async on_close
    waits behind it. When the thread is released after the gateway stopped, the coroutine is
    given up quietly: no asyncio loop is started again for it, no error is logged."""
    gateway = make_gateway(Config(hook_threads=2, shutdown_timeout=0.5))
    gate = new_gate(gates)
    released: list[bool] = []
    closed: list[int] = []

    @gateway.on_message
    def blocked(conn: Connection, message: str | bytes) -> None:
        released.append(gate.wait(DEADLINE))

    @gateway.on_close
    async def note(conn: Connection, code: int) -> None:
        closed.append(code)

    gateway.start()
    client = ws_connect(gateway.port)
    client.send("stuck")
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 1, "on_message to run")
    client.close()
    wait_until(lambda: gateway.stats()["hooks_in_flight"] == 2, "on_close to wait behind it")
    gateway.stop()
    loops_before = {t for t in threading.enumerate() if t.name == "lowmemws-asyncio"}
    gate.set()
    wait_until(lambda: released == [True], "the hook thread to go on")
    time.sleep(0.2)  # time for the thread to reach on_close
    loops_after = {t for t in threading.enumerate() if t.name == "lowmemws-asyncio"}
    assert loops_after <= loops_before, "an asyncio loop was started after stop()"
    assert closed == []
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


def test_stop_lets_the_async_on_close_of_every_client_run(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(shutdown_timeout=5.0))
    codes: list[int] = []

    @gateway.on_close
    async def note(conn: Connection, code: int) -> None:
        await asyncio.sleep(0.01)
        codes.append(code)

    gateway.start()
    clients = [ws_connect(gateway.port) for _ in range(3)]
    results: list[int] = []
    readers = [
        threading.Thread(target=lambda c=c: results.append(answer_close(c))) for c in clients
    ]
    for reader in readers:
        reader.start()
    gateway.stop(timeout=3 * DEADLINE)
    for reader in readers:
        reader.join(DEADLINE)
    assert results == [1001] * 3
    assert codes == [1001] * 3  # run before stop() returned, not cancelled


# -- publishing from coroutines --------------------------------------------------------------------


def test_apublish_from_a_coroutine_goes_straight_in_with_local_bus(
    make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch
) -> None:
    """LocalBus never waits, so apublish, asend_to_user and abroadcast publish on the
    caller's loop: no thread hop (asyncio.to_thread would raise here)."""

    def no_thread_hop(*args: Any, **kwargs: Any) -> Awaitable[Any]:
        raise AssertionError("apublish went through asyncio.to_thread")

    monkeypatch.setattr(asyncio, "to_thread", no_thread_hop)
    gateway = make_gateway(Config())
    reached: list[tuple[str, int]] = []

    @gateway.on_message
    async def fan_out(conn: Connection, message: str | bytes) -> None:
        reached.append(("topic", await gateway.apublish("news", f"topic: {message!s}")))
        reached.append(("user", await gateway.asend_to_user(7, b"to seven")))
        reached.append(("all", await gateway.abroadcast("to everyone")))

    gateway.on_connect(hook("async", lambda request: Accept(user=7, topics=("news",))))
    gateway.start()
    clients = [ws_connect(gateway.port) for _ in range(2)]
    clients[0].send("go")
    for client in clients:
        assert [client.recv() for _ in range(3)] == ["topic: go", b"to seven", "to everyone"]
    assert reached == [("topic", 2), ("user", 2), ("all", 2)]
    for client in clients:
        client.close()


def test_a_cancelled_error_let_out_by_an_async_on_message_is_logged_and_the_next_runs(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    gateway = make_gateway(Config())

    @gateway.on_message
    async def echo(conn: Connection, message: str | bytes) -> None:
        if message == "cancel":  # e.g. a timeout of its own, not the gateway's cancellation
            raise asyncio.CancelledError()
        conn.send(message)

    gateway.start()
    client = ws_connect(gateway.port)
    try:
        client.send("cancel")
        client.send("after")
        assert client.recv() == "after"  # the connection's later hooks still run
        waiting.wait_until(
            lambda: bool(hook_errors(caplog, "on_message raised")), "the log line", 5.0
        )
    finally:
        client.close()
