"""The pub/sub hub of issue 4, as an application and its clients see it.

A Gateway runs in this process (``start()``: a background loop thread) on a free loopback
port; real WebSocket clients (websocket-client) connect to it. Topics, user tags and
broadcasts reach exactly the connections they name; publish works from many threads at once
and from asyncio; a slow reader never makes the server hold more than its write limit, and
what happens to it is the policy the publisher chose (drop, close, latest).
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import websocket

from lowmemws import Accept, Config, Connection, Gateway, Request, SendResult
from tests.support import waiting

DEADLINE = 10.0  # bounds every wait; not a performance figure
SMALL_RCVBUF = ((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),)


wait_until = waiting.waiter(DEADLINE)


class Server:
    """A Gateway on a free port whose on_connect reads the user and topics from the query.

    ``/?user=7&topics=a,b`` is accepted with Accept(user=7, topics=("a", "b")). Every open
    connection is remembered by its user tag in ``opened`` (a list per tag), in open order.
    """

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.opened: dict[int, list[Connection]] = {}
        self.closed: list[tuple[Connection, int]] = []
        self.lock = threading.Lock()

        @self.gateway.on_connect
        def decide(request: Request) -> Accept:
            params = request.params
            topics = tuple(t for t in params.get("topics", "").split(",") if t)
            return Accept(user=int(params.get("user", "0")), topics=topics)

        @self.gateway.on_open
        def opened(conn: Connection) -> None:
            with self.lock:
                self.opened.setdefault(conn.user, []).append(conn)

        @self.gateway.on_close
        def closed(conn: Connection, code: int) -> None:
            with self.lock:
                self.closed.append((conn, code))

    def start(self) -> Server:
        self.gateway.start()
        return self

    def url(self, user: int = 0, topics: tuple[str, ...] = ()) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}/?user={user}&topics={','.join(topics)}"

    def connect(
        self, user: int = 0, topics: tuple[str, ...] = (), **options: Any
    ) -> websocket.WebSocket:
        """connect opens a client and returns once the server's on_open ran for it."""
        before = len(self.opened.get(user, []))
        client = websocket.create_connection(self.url(user, topics), timeout=DEADLINE, **options)
        wait_until(lambda: len(self.opened.get(user, [])) > before, "on_open")
        return client

    def conn(self, user: int) -> Connection:
        """conn is the server's handle of the latest connection opened with user."""
        return self.opened[user][-1]


@pytest.fixture
def make_server(make_gateway: Callable[..., Gateway]) -> Iterator[Callable[..., Server]]:
    """make_server(config) is a Server on make_gateway's Gateway; its clients are shut down at
    teardown, before the Gateway is stopped."""
    clients: list[websocket.WebSocket] = []

    def make(config: Config | None = None) -> Server:
        server = Server(make_gateway(config))
        original = server.connect

        def connect(*args: Any, **kwargs: Any) -> websocket.WebSocket:
            client = original(*args, **kwargs)
            clients.append(client)
            return client

        server.connect = connect  # type: ignore[method-assign]
        return server

    yield make
    for client in clients:
        client.shutdown()


def nothing_pending(client: websocket.WebSocket, wait: float = 0.3) -> bool:
    """nothing_pending tells whether no frame arrives at client within wait seconds."""
    client.settimeout(wait)
    try:
        frame = client.recv_frame()
    except websocket.WebSocketTimeoutException:
        return True
    finally:
        client.settimeout(DEADLINE)
    raise AssertionError(f"unexpected frame: opcode {frame.opcode}, data {frame.data!r}")


def fence(server: Server, client: websocket.WebSocket, user: int) -> None:
    """fence sends a marker to user and reads up to it: everything before it has arrived."""
    server.gateway.send_to_user(user, "fence")
    assert client.recv() == "fence"


# -- membership --------------------------------------------------------------------------------


def test_accept_topics_subscribe_and_publish_reaches_only_members(
    make_server: Callable[..., Server],
) -> None:
    server = make_server().start()
    news = server.connect(user=1, topics=("news",))
    both = server.connect(user=2, topics=("news", "sport"))
    other = server.connect(user=3, topics=("sport",))
    gw = server.gateway
    assert gw.topic_size("news") == 2 and gw.topic_size("sport") == 2
    assert gw.topic_size("nobody") == 0

    assert gw.publish("news", "headline") == 2
    assert news.recv() == "headline"
    assert both.recv() == "headline"
    assert gw.publish("sport", "score") == 2
    assert both.recv() == "score"
    assert other.recv() == "score"
    assert gw.publish("nobody", "lost") == 0
    fence(server, news, 1)
    fence(server, other, 3)  # "headline" never reached user 3


def test_subscribe_from_on_message_and_unsubscribe(make_server: Callable[..., Server]) -> None:
    server = make_server()

    @server.gateway.on_message
    def command(conn: Connection, message: str | bytes) -> None:
        assert isinstance(message, str)
        verb, topic = message.split(" ", 1)
        ok = conn.subscribe(topic) if verb == "sub" else conn.unsubscribe(topic)
        conn.send(f"{verb} {topic} {ok}")

    server.start()
    client = server.connect(user=5)
    client.send("sub alerts")
    assert client.recv() == "sub alerts True"
    assert server.gateway.topic_size("alerts") == 1
    assert server.gateway.publish("alerts", "fire") == 1
    assert client.recv() == "fire"

    client.send("unsub alerts")
    assert client.recv() == "unsub alerts True"
    client.send("unsub alerts")  # no longer a member
    assert client.recv() == "unsub alerts False"
    assert server.gateway.topic_size("alerts") == 0
    assert server.gateway.publish("alerts", "smoke") == 0
    fence(server, client, 5)


def test_gateway_unsubscribe_from_another_thread(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    client = server.connect(user=8, topics=("a", "b"))
    conn = server.conn(8)
    assert server.gateway.unsubscribe(conn, "a") is True
    assert server.gateway.unsubscribe(conn, "a") is False
    assert server.gateway.publish("a", "x") == 0
    assert server.gateway.publish("b", "y") == 1
    assert client.recv() == "y"


def test_subscriptions_end_with_the_connection(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    stays = server.connect(user=1, topics=("room",))
    clients = [server.connect(user=10 + i, topics=("room", f"own{i}")) for i in range(5)]
    assert server.gateway.topic_size("room") == 6
    for client in clients:
        client.close()
    wait_until(lambda: server.gateway.topic_size("room") == 1, "members to leave with close")
    assert all(server.gateway.topic_size(f"own{i}") == 0 for i in range(5))
    assert server.gateway.publish("room", "still here") == 1
    assert stays.recv() == "still here"
    # an abrupt end (no close frame) ends the subscription too
    gone = server.connect(user=2, topics=("room",))
    gone.sock.close()
    wait_until(lambda: server.gateway.topic_size("room") == 1, "an aborted member to leave")


def test_send_to_user_reaches_every_connection_of_that_user_only(
    make_server: Callable[..., Server],
) -> None:
    server = make_server().start()
    phone = server.connect(user=42)
    laptop = server.connect(user=42, topics=("x",))
    neighbour = server.connect(user=43)
    anonymous = server.connect(user=0)
    big = 2**63 - 1  # the largest int id: the upper half of the tags is for str ids
    maximal = server.connect(user=big)

    assert server.gateway.send_to_user(42, "you have mail") == 2
    assert phone.recv() == "you have mail"
    assert laptop.recv() == "you have mail"
    assert server.gateway.send_to_user(big, b"\x01") == 1
    assert maximal.recv() == b"\x01"
    assert server.gateway.send_to_user(0, "no tag") == 0  # 0 means no user
    assert server.gateway.send_to_user(44, "nobody") == 0
    fence(server, neighbour, 43)
    assert nothing_pending(anonymous)

    phone.close()
    wait_until(lambda: len(server.closed) == 1, "the phone to close")
    assert server.gateway.send_to_user(42, "again") == 1
    assert laptop.recv() == "again"


def test_broadcast_reaches_every_open_connection(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    clients = [server.connect(user=i, topics=("t",) if i % 2 else ()) for i in range(6)]
    assert server.gateway.broadcast("everyone: maintenance at noon") == 6
    for client in clients:
        assert client.recv() == "everyone: maintenance at noon"


def test_text_and_binary_are_preserved(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    client = server.connect(user=1, topics=("t",))
    gw = server.gateway
    gw.publish("t", "grüße ✓")
    gw.publish("t", b"\x00\xffbinary")
    gw.publish("t", "")
    gw.publish("t", b"")
    gw.send_to_user(1, b"\x80")
    gw.broadcast("text")
    big = bytes(range(256)) * 400  # > 64 KiB: the 8-byte length form
    gw.publish("t", big)
    got = [client.recv_data() for _ in range(7)]
    text, binary = websocket.ABNF.OPCODE_TEXT, websocket.ABNF.OPCODE_BINARY
    assert got == [
        (text, "grüße ✓".encode()),
        (binary, b"\x00\xffbinary"),
        (text, b""),
        (binary, b""),
        (binary, b"\x80"),
        (text, b"text"),
        (binary, big),
    ]


# -- callers -----------------------------------------------------------------------------------


def test_publish_from_eight_threads_at_once(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    readers = [server.connect(user=i, topics=("feed",)) for i in range(1, 4)]
    threads_n, per_thread = 8, 200
    start = threading.Barrier(threads_n)
    reached: list[int] = []

    def publisher(k: int) -> None:
        start.wait()
        total = 0
        for n in range(per_thread):
            total += server.gateway.publish("feed", f"{k}:{n}")
        reached.append(total)

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(threads_n)]
    for thread in threads:
        thread.start()
    received: list[list[str]] = []
    for client in readers:
        received.append([client.recv() for _ in range(threads_n * per_thread)])
    for thread in threads:
        thread.join(DEADLINE)
    assert reached == [per_thread * len(readers)] * threads_n
    for messages in received:
        assert len(messages) == threads_n * per_thread
        for k in range(threads_n):
            mine = [m for m in messages if m.startswith(f"{k}:")]
            assert mine == [f"{k}:{n}" for n in range(per_thread)]  # each sender's order
    assert all(nothing_pending(client, 0.1) for client in readers)


def test_apublish_from_asyncio(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    client = server.connect(user=1, topics=("async",))

    async def main() -> list[int]:
        first = await server.gateway.apublish("async", "first")
        rest = await asyncio.gather(*(server.gateway.apublish("async", f"m{n}") for n in range(20)))
        return [first, *rest]

    assert asyncio.run(main()) == [1] * 21
    assert client.recv() == "first"
    assert sorted(client.recv() for _ in range(20)) == sorted(f"m{n}" for n in range(20))


def test_asend_to_user_and_abroadcast_from_asyncio(make_server: Callable[..., Server]) -> None:
    server = make_server().start()
    alice, bob = server.connect(user=7), server.connect(user=8)

    async def main() -> tuple[int, int]:
        to_alice = await server.gateway.asend_to_user(7, "for alice")
        to_all = await server.gateway.abroadcast(b"for all")
        return to_alice, to_all

    assert asyncio.run(main()) == (1, 2)
    assert alice.recv() == "for alice"
    assert alice.recv() == bob.recv() == b"for all"


def test_a_stale_handle_never_reaches_a_connection_that_reuses_its_fd(
    make_server: Callable[..., Server],
) -> None:
    server = make_server().start()
    first = server.connect(user=1)
    stale = server.conn(1)
    assert stale.is_open and stale.send("hello") is SendResult.SENT
    assert first.recv() == "hello"
    first.close()
    wait_until(lambda: len(server.closed) == 1, "the first connection to close")
    assert not stale.is_open
    assert stale.send("to nobody") is SendResult.GONE

    # the kernel hands out the lowest free fd, so the next connection takes the same one
    second = server.connect(user=2)
    fresh = server.conn(2)
    assert fresh.fd == stale.fd and fresh.gen != stale.gen
    assert stale.send("for the old client") is SendResult.GONE
    assert stale.close() is False
    assert stale.subscribe("t") is False
    assert fresh.is_open and server.gateway.topic_size("t") == 0
    assert fresh.send("for the new client") is SendResult.SENT
    assert second.recv() == "for the new client"
    assert nothing_pending(second)


# -- slow consumers ----------------------------------------------------------------------------

WRITE_LIMIT = 64 * 1024


def make_backlogged(server: Server, user: int, full: bool = True) -> list[bytes]:
    """make_backlogged sends filler to user (who never reads) until the server has data
    queued for it right up to its write limit, so that even a 2-byte frame no longer fits
    (full), or until it has anything queued at all (not full); returns the filler messages
    that were sent or queued (the rest were dropped)."""
    gw = server.gateway
    accepted: list[bytes] = []
    size = 16 * 1024
    for _ in range(4000):  # kernel buffers on loopback take a few MiB at most
        filler = bytes([65 + len(accepted) % 26]) * size
        if gw.send_to_user(user, filler) == 1:
            accepted.append(filler)
            if not full and gw.stats()["pending_write_bytes"] > 0:
                return accepted
        elif gw.stats()["pending_write_bytes"] == 0:
            raise AssertionError("a message was dropped while nothing was queued")
        elif size == 0:
            return accepted  # not even an empty frame fits: past the limit
        else:
            size //= 2
    raise AssertionError("the slow client never got past the write limit")


def slow_and_fast(
    make_server: Callable[..., Server], topic: str, full: bool = True
) -> tuple[Server, websocket.WebSocket, websocket.WebSocket, list[bytes]]:
    """slow_and_fast starts a server with WRITE_LIMIT and subscribes user 1 (slow: a small
    receive buffer, backlogged with make_backlogged) and user 2 (fast) to topic; returns the
    server, the slow and the fast client, and the filler sent or queued to the slow one."""
    server = make_server(Config(write_limit=WRITE_LIMIT))
    server.start()
    slow = server.connect(user=1, topics=(topic,), sockopt=SMALL_RCVBUF)
    fast = server.connect(user=2, topics=(topic,))
    return server, slow, fast, make_backlogged(server, 1, full)


def drain(client: websocket.WebSocket) -> Iterator[websocket.ABNF]:
    """drain yields the frames the client receives until it closes or stays silent."""
    while True:
        client.settimeout(1.0)
        try:
            frame = client.recv_frame()
        except websocket.WebSocketTimeoutException:
            return
        finally:
            client.settimeout(DEADLINE)
        yield frame
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            return


def test_slow_consumer_drop_policy(make_server: Callable[..., Server]) -> None:
    server, slow, fast, filler = slow_and_fast(make_server, "news")
    gw = server.gateway
    dropped = gw.stats()["dropped"]["write_limit"]

    for n in range(50):
        assert gw.publish("news", f"news {n}", policy="drop") == 1  # the fast one only
        assert fast.recv() == f"news {n}"
    assert gw.stats()["dropped"]["write_limit"] == dropped + 50
    assert "lowmemws_dropped_messages_total" in gw.metrics_text()

    frames = list(drain(slow))  # the slow client finally reads: filler only, still open
    assert [f.data for f in frames] == filler
    assert server.conn(1).is_open
    gw.publish("news", "after")
    assert slow.recv() == "after"  # it caught up and is served again


def test_slow_consumer_close_policy(make_server: Callable[..., Server]) -> None:
    server, slow, fast, filler = slow_and_fast(make_server, "news")
    gw = server.gateway
    closed_before = gw.stats()["dropped"]["closed"]

    assert gw.publish("news", "must arrive or close", policy="close") == 1
    assert fast.recv() == "must arrive or close"
    assert gw.stats()["dropped"]["closed"] == closed_before + 1

    # the client gets what was already on its way, then the close frame at once: the
    # frames still queued for it are discarded, not sent to a client being dropped
    frames = list(drain(slow))
    got = [f.data for f in frames[:-1]]
    assert got == filler[: len(got)] and len(got) < len(filler)
    assert gw.stats()["pending_write_bytes"] == 0
    assert frames[-1].opcode == websocket.ABNF.OPCODE_CLOSE
    assert struct.unpack("!H", frames[-1].data[:2])[0] == 1008
    wait_until(lambda: any(c.user == 1 for c, _ in server.closed), "on_close")
    assert [code for c, code in server.closed if c.user == 1] == [1008]
    assert gw.topic_size("news") == 1
    assert fast.connected


def test_slow_consumer_latest_policy_keeps_only_the_newest(
    make_server: Callable[..., Server],
) -> None:
    # the slow one behind, with room left
    server, slow, fast, filler = slow_and_fast(make_server, "unread", full=False)
    gw = server.gateway
    replaced = gw.stats()["dropped"]["latest"]

    for count in range(1, 31):
        assert gw.publish("unread", f"unread={count}", policy="latest") == 2
        assert fast.recv() == f"unread={count}"  # a reading client sees every one
    assert gw.stats()["dropped"]["latest"] == replaced + 29
    assert gw.stats()["dropped"]["write_limit"] == 0

    data = [f.data for f in drain(slow)]
    assert data == [*filler, b"unread=30"]  # only the newest pending one
    gw.publish("unread", "unread=31", policy="latest")
    assert slow.recv() == "unread=31"


def test_latest_policy_delivers_the_newest_state_even_past_the_write_limit(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(Config(write_limit=WRITE_LIMIT))
    server.start()
    gw = server.gateway
    slow = server.connect(user=1, topics=("unread",), sockopt=SMALL_RCVBUF)
    filler = make_backlogged(server, 1)  # at the limit: nothing more fits
    for count in range(1, 11):
        gw.publish("unread", f"unread={count}", policy="latest")
    data = [f.data for f in drain(slow)]
    assert data[: len(filler)] == filler
    assert data[len(filler) :] == [b"unread=10"]


def test_a_slow_consumer_still_gets_its_pong(make_server: Callable[..., Server]) -> None:
    server = make_server(Config(write_limit=WRITE_LIMIT))
    server.start()
    slow = server.connect(user=1, topics=("news",), sockopt=SMALL_RCVBUF)
    filler = make_backlogged(server, 1)
    slow.ping(b"are you there")
    time.sleep(0.3)  # the server reads the ping while the client is over its limit
    for _ in range(5):  # more data dropped meanwhile: the client is still over its limit
        server.gateway.publish("news", "dropped", policy="drop")
    frames = list(drain(slow))
    pongs = [f for f in frames if f.opcode == websocket.ABNF.OPCODE_PONG]
    assert [p.data for p in pongs] == [b"are you there"]
    assert [f.data for f in frames if f.opcode != websocket.ABNF.OPCODE_PONG] == filler
    assert server.conn(1).is_open


def test_send_tells_a_dropped_message_from_a_gone_connection(
    make_server: Callable[..., Server],
) -> None:
    server = make_server(Config(write_limit=WRITE_LIMIT))
    server.start()
    slow = server.connect(user=1, sockopt=SMALL_RCVBUF)
    fast = server.connect(user=2)
    assert server.conn(2).send("hi") is SendResult.SENT
    assert fast.recv() == "hi"

    make_backlogged(server, 1)  # past its write limit: the policy drops what does not fit
    conn = server.conn(1)
    dropped = conn.send(b"x" * 1024)
    assert dropped is SendResult.DROPPED and not dropped
    assert conn.is_open

    slow.shutdown()
    wait_until(lambda: any(c.user == 1 for c, _ in server.closed), "on_close")
    gone = conn.send("anyone there?")
    assert gone is SendResult.GONE and not gone
