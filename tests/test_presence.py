"""Presence and kick across nodes, from a Publisher: ``online`` and ``disconnect_user``.

Real components only: a throw-away redis-server, gateway nodes as separate processes (a
small script: ``Gateway(bus=RedisBus(url))``, or ``processes=2`` with the ProcessBus),
websocket-client clients, and a `lowmemws.Publisher` in the test process. Clients connect as
``/?user=NAME`` (digits: an int id); a client's text ``online NAME`` or ``kick NAME CODE
REASON`` asks its own node (answered with the count, or ``timeout``/``refused``).
"""

from __future__ import annotations

import os
import struct
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import websocket

import lowmemws
from lowmemws import BusUnavailable, Gateway, PresenceTimeout, Publisher, RedisBus
from tests.support import waiting
from tests.support.redis_server import RedisServer
from tests.support.servers import ServerProcess, StartServer
from tests.test_bus import fork_worker, reap, results  # noqa: F401 - reap is a fixture

DEADLINE = 20.0  # bounds every wait; not a performance figure
QUERY_TIMEOUT = 5.0

NODE = textwrap.dedent(
    """
    import argparse, os, threading
    from lowmemws import Accept, BusUnavailable, Gateway, PresenceTimeout, RedisBus

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis", default="")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    bus = RedisBus(args.redis, user_key="test-secret") if args.redis else None
    gateway = Gateway(args.host, args.port, bus=bus, processes=args.processes)

    @gateway.on_connect
    def decide(request):
        name = request.params.get("user", "0")
        return Accept(user=int(name) if name.isdigit() else name, topics=("t",))

    @gateway.on_message
    async def command(conn, message):  # async: the wait for the nodes stalls nobody
        verb, _, rest = message.partition(" ")
        try:
            if verb == "online":
                conn.send(str(await gateway.aonline(rest, timeout=5)))
            elif verb == "kick":
                user, code, reason = rest.split(" ", 2)
                conn.send(str(await gateway.adisconnect_user(user, int(code), reason, timeout=5)))
            elif verb == "who":
                conn.send(repr(conn.user))
            elif verb == "pid":
                conn.send(str(os.getpid()))
        except PresenceTimeout as exc:
            conn.send(f"timeout {exc.count} {exc.answered} {exc.expected}")
        except BusUnavailable:
            conn.send("refused")

    def announce():
        if gateway.wait_ready(30) and (bus is None or bus.wait_ready(30)):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)

wait_until = waiting.waiter(DEADLINE, interval=0.05)


@pytest.fixture
def start_node(start_server: StartServer, tmp_path: Path) -> Callable[..., ServerProcess]:
    script = tmp_path / "presence_node.py"
    script.write_text(NODE)

    def start(*args: str) -> ServerProcess:
        return start_server([sys.executable, str(script)], list(args))

    return start


@pytest.fixture
def connect() -> Iterator[Callable[[ServerProcess, str], websocket.WebSocket]]:
    made: list[websocket.WebSocket] = []

    def make(node: ServerProcess, user: str) -> websocket.WebSocket:
        client = websocket.create_connection(f"{node.url}?user={user}", timeout=DEADLINE)
        made.append(client)
        return client

    yield make
    for client in made:
        client.shutdown()


@pytest.fixture
def publisher(redis_server: RedisServer) -> Iterator[Publisher]:
    with Publisher(redis_server.url, user_key="test-secret") as made:
        assert made.wait_ready(DEADLINE)
        yield made


def close_of(client: websocket.WebSocket) -> tuple[int, str]:
    """close_of reads the client's next frame, which must be a close: (code, reason)."""
    frame = client.recv_frame()
    assert frame.opcode == websocket.ABNF.OPCODE_CLOSE, frame
    return struct.unpack("!H", frame.data[:2])[0], frame.data[2:].decode()


def test_presence_and_kick_across_two_nodes_from_a_publisher(
    start_node: Callable[..., ServerProcess],
    connect: Callable[[ServerProcess, str], websocket.WebSocket],
    redis_server: RedisServer,
    publisher: Publisher,
) -> None:
    a, b = start_node("--redis", redis_server.url), start_node("--redis", redis_server.url)
    alice_a, alice_b, also_b = connect(a, "alice"), connect(b, "alice"), connect(b, "alice")
    bob = connect(a, "bob")
    long_a = connect(a, "a-user-id-far-too-long-for-the-tag")
    number = connect(b, "42")

    assert publisher.online("alice", timeout=QUERY_TIMEOUT) == 3
    assert publisher.online("bob", timeout=QUERY_TIMEOUT) == 1
    assert publisher.online(42, timeout=QUERY_TIMEOUT) == 1
    assert publisher.online("42", timeout=QUERY_TIMEOUT) == 0  # a str is never an int id
    assert publisher.online("a-user-id-far-too-long-for-the-tag", timeout=QUERY_TIMEOUT) == 1
    assert publisher.online("nobody", timeout=QUERY_TIMEOUT) == 0
    bob.send("online alice")  # a gateway asks the nodes too: its own and the other
    assert bob.recv() == "3"

    publisher.send_to_user("alice", "you have mail")
    assert [c.recv() for c in (alice_a, alice_b, also_b)] == ["you have mail"] * 3
    publisher.send_to_users(["bob", 42], "batch")
    assert bob.recv() == number.recv() == "batch"
    publisher.send_to_users(["bob", 42], "paced", spread=0.5)  # each node spreads its own
    assert bob.recv() == number.recv() == "paced"

    # the kick comes after what the publisher sent before it, on every node
    publisher.send_to_user("alice", "last words")
    assert publisher.disconnect_user("alice", 4001, "signed out", timeout=QUERY_TIMEOUT) == 3
    for client in (alice_a, alice_b, also_b):
        assert client.recv() == "last words"
        assert close_of(client) == (4001, "signed out")
    wait_until(lambda: publisher.online("alice", timeout=QUERY_TIMEOUT) == 0, "alice to be gone")
    assert publisher.online("bob", timeout=QUERY_TIMEOUT) == 1  # nobody else was touched

    number.send("kick a-user-id-far-too-long-for-the-tag 1008 banned")  # from a gateway
    assert number.recv() == "1"
    assert close_of(long_a) == (1008, "banned")

    with pytest.raises(ValueError):
        publisher.disconnect_user("bob", 1005)  # may not be sent (RFC 6455 section 7.4.1)
    with pytest.raises(ValueError):
        publisher.disconnect_user("bob", 1000, "x" * 124)
    bob.send("who")
    assert bob.recv() == "'bob'"  # still connected


def test_a_node_that_does_not_answer_gives_a_clear_timeout(
    start_node: Callable[..., ServerProcess],
    connect: Callable[[ServerProcess, str], websocket.WebSocket],
    redis_server: RedisServer,
    publisher: Publisher,
) -> None:
    import redis

    a = start_node("--redis", redis_server.url)
    connect(a, "alice")
    assert publisher.online("alice", timeout=QUERY_TIMEOUT) == 1
    silent = redis.Redis.from_url(redis_server.url).pubsub()  # subscribed, never answers
    sharded = publisher.bus.sharded  # Redis 7+: the nodes use sharded pub/sub
    (silent.ssubscribe if sharded else silent.subscribe)("lowmemws:bus")
    try:
        with pytest.raises(PresenceTimeout) as caught:
            publisher.online("alice", timeout=1.0)
    finally:
        silent.close()
    assert (caught.value.count, caught.value.answered, caught.value.expected) == (1, 1, 2)


def test_presence_and_kick_across_worker_processes(
    start_node: Callable[..., ServerProcess],
    connect: Callable[[ServerProcess, str], websocket.WebSocket],
) -> None:
    node = start_node("--processes", "2")
    alices = [connect(node, "alice") for _ in range(16)]  # spread by SO_REUSEPORT
    pids = set()
    for client in alices:
        client.send("pid")
        pids.add(client.recv())
    assert len(pids) == 2  # both workers hold some (all in one: 2 in 65,536 runs)
    asker = connect(node, "bob")
    asker.send("online alice")
    assert asker.recv() == "16"  # both workers answered, whichever this one is
    asker.send("kick alice 4003 bye")
    assert asker.recv() == "16"
    assert [close_of(client) for client in alices] == [(4003, "bye")] * 16
    asker.send("online bob")
    assert asker.recv() == "1"


def test_a_publisher_tight_loop_is_slowed_down_never_refused(
    redis_server: RedisServer,
) -> None:
    total = 100_000
    received: list[str] = []
    gateway = Gateway("127.0.0.1", 0, bus=RedisBus(redis_server.url))
    gateway.on_connect(lambda request: lowmemws.Accept(topics=("feed",)))
    with gateway:
        assert isinstance(gateway._bus, RedisBus) and gateway._bus.wait_ready(DEADLINE)
        client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
        with Publisher(redis_server.url, max_buffered=1000) as publisher:
            assert publisher.wait_ready(DEADLINE)
            for n in range(total):
                publisher.publish("feed", str(n))  # waits for room whenever 1,000 wait
            publisher.flush()
            stats = publisher.bus.stats.snapshot()
            assert (stats["published"], stats["refused"], stats["buffered"]) == (total, 0, 0)
        while len(received) < total:
            received.append(client.recv())
        client.close()
    assert received == [str(n) for n in range(total)]  # every one, once, in order


def test_redis_down_the_publisher_errors_after_its_bound_and_loses_nothing_silently(
    redis_server: RedisServer,
) -> None:
    publisher = Publisher(redis_server.url, max_buffered=5, block_timeout=0.5)
    assert publisher.wait_ready(DEADLINE)
    redis_server.kill()
    for n in range(5):
        publisher.publish("t", f"kept {n}")  # buffered while Redis is down
    with pytest.raises(BusUnavailable, match="buffer full"):
        publisher.publish("t", "refused")  # after waiting block_timeout for room
    with pytest.raises(BusUnavailable):
        publisher.online("alice", timeout=0.5)
    with pytest.raises(BusUnavailable, match="5 messages not sent"):
        publisher.close(timeout=0.5)  # the buffered ones are lost: said, not silent
    publisher.close()  # again: nothing more to say


def test_redis_back_in_time_the_buffered_messages_arrive(redis_server: RedisServer) -> None:
    gateway = Gateway("127.0.0.1", 0, bus=RedisBus(redis_server.url))
    gateway.on_connect(lambda request: lowmemws.Accept(user="alice"))
    with gateway:
        assert isinstance(gateway._bus, RedisBus) and gateway._bus.wait_ready(DEADLINE)
        client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
        publisher = Publisher(redis_server.url, max_buffered=5, block_timeout=0.5)
        assert publisher.wait_ready(DEADLINE)
        redis_server.kill()
        for n in range(3):
            publisher.send_to_user("alice", f"during {n}")
        redis_server.start()
        publisher.close(timeout=DEADLINE)  # no error: everything reached Redis
        assert [client.recv() for _ in range(3)] == [f"during {n}" for n in range(3)]
        client.close()


def test_query_envelopes_round_trip_and_old_kinds_keep_their_wire_form() -> None:
    from lowmemws._bus_base import Envelope, Query, answer_envelope, query_envelope

    asker = bytes(range(16))
    kick = query_envelope("kick", 2**63 + 5, 77, asker, 4001, b"bye")
    back = Envelope.decode(kick.encode())
    assert Query.parse(back) == Query("kick", 2**63 + 5, 77, asker, 4001, b"bye")
    online = Envelope.decode(query_envelope("online", 42, 78, asker).encode())
    assert Query.parse(online) == Query("online", 42, 78, asker)
    answer = Envelope.decode(answer_envelope(78, 3).encode())
    assert (answer.kind, answer.key, answer.payload) == ("answer", 78, (3).to_bytes(8, "big"))
    assert kick.encode()[0] == 2  # a node of an older version refuses it as malformed
    assert Envelope.for_user(42, "x").encode()[0] == 1  # unchanged for what was there
    with pytest.raises(ValueError):
        Query.parse(Envelope("kick", 1, 2, b"short"))
    with pytest.raises(ValueError):
        Query.parse(Envelope.for_user(1, "not a query"))


def test_a_publisher_made_before_a_fork_works_in_the_child(redis_server: RedisServer) -> None:
    gateway = Gateway("127.0.0.1", 0, bus=RedisBus(redis_server.url))
    gateway.on_connect(lambda request: lowmemws.Accept(user="alice"))
    with gateway:
        assert isinstance(gateway._bus, RedisBus) and gateway._bus.wait_ready(DEADLINE)
        client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
        with Publisher(redis_server.url) as publisher:  # as Celery's prefork parent would
            assert publisher.wait_ready(DEADLINE)
            pid = os.fork()
            if pid == 0:  # the child: its own links, made on first use
                try:
                    assert publisher.online("alice", timeout=QUERY_TIMEOUT) == 1
                    publisher.send_to_user("alice", "from the child")
                    publisher.close()
                finally:
                    os._exit(0 if publisher.bus.stats.snapshot()["published"] == 2 else 1)
            _, status = os.waitpid(pid, 0)
            assert os.waitstatus_to_exitcode(status) == 0
            assert client.recv() == "from the child"
            publisher.send_to_user("alice", "from the parent")  # the parent's bus still works
            assert client.recv() == "from the parent"
        client.close()


def test_a_dead_worker_is_answered_for_by_the_parent(reap: list[int]) -> None:  # noqa: F811
    from lowmemws import ProcessBus
    from lowmemws._bus_base import QUERY_KINDS, Envelope, Query, query_envelope
    from lowmemws._queries import new_query_id

    def answering_worker(bus: ProcessBus) -> object:  # holds 5 connections of every user
        done = threading.Event()

        def deliver(envelope: Envelope) -> None:
            if envelope.kind in QUERY_KINDS:
                bus.answer(Query.parse(envelope), 5)
            elif envelope.kind == "broadcast":
                done.set()

        bus.start(deliver)
        return done.wait(DEADLINE)

    bus = ProcessBus(workers=2)
    alive = fork_worker(bus, 0, answering_worker)
    dead = fork_worker(bus, 1, lambda bus: None)  # exits at once: its slot is dead
    reap.extend([alive[0], dead[0]])
    bus.attach_parent()
    assert results([dead]) == [None]
    wait_until(lambda: bus.stats.disconnects == 1, "the parent to see worker 1 gone")
    envelope = query_envelope("online", 7, new_query_id(), bytes(16))
    tally = bus.ask(envelope, QUERY_TIMEOUT)
    assert (tally.count, tally.answered, tally.expected) == (5, 2, 2)  # 5 + the dead one's 0
    bus.publish(Envelope.for_all("done"))
    assert results([alive]) == [True]
    bus.close()
