"""The message buses of issue 4: every envelope reaches every node once, in order, or the
publisher is told (BusUnavailable) or a counter says so. Real processes, a real redis-server."""

from __future__ import annotations

import asyncio
import hashlib
import os
import pickle
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowmemws.bus import (
    Bus,
    BusUnavailable,
    Envelope,
    LocalBus,
    ProcessBus,
    RedisBus,
)
from tests.support import waiting
from tests.support.redis_server import RedisServer, require_redis
from tests.support.servers import free_port

DEADLINE = 20.0
FENCE = Envelope.for_topic("fence", b"")


wait_until = waiting.waiter(DEADLINE)


# -- Envelope ---------------------------------------------------------------------------------


def envelopes_of(kind: str, keys: st.SearchStrategy[Any]) -> st.SearchStrategy[Envelope]:
    """envelopes_of builds Envelopes of one kind, with keys drawn from keys."""
    return st.builds(
        Envelope,
        kind=st.just(kind),
        key=keys,
        opcode=st.sampled_from([1, 2]),
        payload=st.binary(max_size=300),
        policy=st.sampled_from(["drop", "close", "latest"]),
    )


envelopes = st.one_of(
    envelopes_of("topic", st.text(max_size=40)),
    envelopes_of("user", st.integers(0, 2**64 - 1)),
    envelopes_of("broadcast", st.none()),
)


@given(envelopes)
def test_envelope_round_trips_through_its_wire_form(envelope: Envelope) -> None:
    assert Envelope.decode(envelope.encode()) == envelope


@given(st.binary(max_size=64))
def test_envelope_decode_accepts_or_raises_value_error(data: bytes) -> None:
    try:
        Envelope.decode(data)
    except ValueError:
        pass


def test_envelope_constructors_pick_the_opcode_from_the_data_type() -> None:
    assert Envelope.for_topic("mail", "hi") == Envelope("topic", "mail", 1, b"hi", "drop")
    assert Envelope.for_user(42, b"\x00", policy="close") == Envelope(
        "user", 42, 2, b"\x00", "close"
    )
    assert Envelope.for_all("x", policy="latest").key is None


@pytest.mark.parametrize(
    "args",
    [
        ("topic", 7, 1, b"", "drop"),
        ("user", "42", 1, b"", "drop"),
        ("user", -1, 1, b"", "drop"),
        ("user", 2**64, 1, b"", "drop"),
        ("broadcast", "x", 1, b"", "drop"),
        ("topic", "t", 9, b"", "drop"),
        ("topic", "t", 1, b"", "sometimes"),
        ("nobody", None, 1, b"", "drop"),
    ],
)
def test_envelope_rejects_inconsistent_fields(args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        Envelope(*args)


paced_envelopes = (
    st.builds(
        Envelope.with_pace,
        st.one_of(envelopes, envelopes_of("users", st.tuples(st.integers(0, 2**64 - 1)))),
        st.sampled_from([0.0, 0.5, 10.0]),
        st.just(0.0),
        st.integers(1, 65535),
        st.integers(0, 2**64 - 1),
    )
    | st.builds(
        Envelope.with_pace,
        envelopes,
        st.just(0.0),
        st.floats(0.001, 1e6),
        st.integers(1, 9),
        st.just(7),
    )
    | st.builds(Envelope.for_cancel, st.integers(0, 2**64 - 1))
)


@given(paced_envelopes)
def test_paced_envelopes_round_trip_through_their_wire_form(envelope: Envelope) -> None:
    assert Envelope.decode(envelope.encode()) == envelope


@given(st.binary(max_size=64))
def test_envelope_decode_of_version_2_accepts_or_raises_value_error(data: bytes) -> None:
    try:
        Envelope.decode(b"\x02" + data)
    except ValueError:
        pass


def test_only_envelopes_that_need_it_travel_as_version_2() -> None:
    assert Envelope.for_topic("t", "x").encode()[0] == 1  # what every node reads
    assert Envelope.for_topic("t", "x").with_pace(1.0, 0.0, 1, 5).encode()[0] == 2
    assert Envelope.for_users((1, 2), "x").encode()[0] == 2
    assert Envelope.for_cancel(5).encode()[0] == 2


def test_an_envelope_is_spread_or_rated_not_both() -> None:
    with pytest.raises(ValueError):
        Envelope.for_all("x").with_pace(1.0, 5.0, 1, 0)
    with pytest.raises(ValueError):
        Envelope.for_all("x").with_pace(0.0, 5.0, 0, 0)  # no node to share the rate


# -- LocalBus ---------------------------------------------------------------------------------


def test_local_bus_delivers_synchronously_and_counts() -> None:
    bus = LocalBus()
    assert isinstance(bus, Bus)
    with pytest.raises(BusUnavailable):
        bus.publish(FENCE)
    got: list[Envelope] = []
    bus.start(got.append)
    bus.publish(Envelope.for_user(1, "a"))
    assert got == [Envelope.for_user(1, "a")]
    assert bus.stats.snapshot()["published"] == 1
    assert bus.stats.snapshot()["refused"] == 1
    bus.close()
    with pytest.raises(BusUnavailable):
        bus.publish(FENCE)


def test_local_bus_publish_returns_what_deliver_counted() -> None:
    bus = LocalBus()
    bus.start(lambda envelope: 3)
    assert bus.publish(FENCE) == 3
    bus.start(lambda envelope: None)  # a callback that does not count
    assert bus.publish(FENCE) == 0


def test_local_bus_reports_a_failing_deliver_to_the_publisher() -> None:
    bus = LocalBus()

    def deliver(envelope: Envelope) -> None:
        raise RuntimeError("boom")

    bus.start(deliver)
    with pytest.raises(RuntimeError):
        bus.publish(FENCE)
    assert bus.stats.deliver_errors == 1


def test_local_bus_apublish_from_asyncio() -> None:
    bus = LocalBus()
    got: list[Envelope] = []
    bus.start(got.append)

    async def main() -> None:
        await asyncio.gather(*(bus.apublish(Envelope.for_user(i, "x")) for i in range(10)))

    asyncio.run(main())
    assert sorted(e.key for e in got if isinstance(e.key, int)) == list(range(10))


# -- ProcessBus -------------------------------------------------------------------------------

Summary = tuple[str, object, str, int]


def summary(envelope: Envelope) -> Summary:
    return (
        envelope.kind,
        envelope.key,
        hashlib.sha256(envelope.payload).hexdigest(),
        len(envelope.payload),
    )


def fork_worker(
    bus: ProcessBus, index: int, body: Callable[[ProcessBus], object]
) -> tuple[int, int]:
    """Fork worker ``index`` running ``body``; its pickled result comes back on a pipe."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(read_end)
            bus.attach_worker(index)
            with os.fdopen(write_end, "wb") as out:
                pickle.dump(body(bus), out)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(write_end)
    return pid, read_end


def collect_until_fence(*to_publish: Envelope, threads: int = 1) -> Callable[[ProcessBus], object]:
    """A worker body: publish, then record everything delivered until the fence."""

    def body(bus: ProcessBus) -> object:
        got: list[Summary] = []
        fenced = threading.Event()

        def deliver(envelope: Envelope) -> None:
            if envelope == FENCE:
                fenced.set()
            else:
                got.append(summary(envelope))

        bus.start(deliver)
        publishers = [
            threading.Thread(target=lambda k=k: [bus.publish(e) for e in to_publish[k::threads]])
            for k in range(threads)
        ]
        for thread in publishers:
            thread.start()
        for thread in publishers:
            thread.join()
        if not fenced.wait(DEADLINE):
            raise AssertionError("no fence")
        return got, bus.stats.snapshot()

    return body


def results(children: list[tuple[int, int]]) -> list[Any]:
    out = []
    for pid, fd in children:
        with os.fdopen(fd, "rb") as stream:
            data = stream.read()
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0, f"worker {pid} failed"
        out.append(pickle.loads(data))
    return out


@pytest.fixture
def reap() -> Iterator[list[int]]:
    """Pids to kill and reap if a test fails half-way."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def fence_after(bus: ProcessBus, relayed: int) -> None:
    wait_until(lambda: bus.stats.relayed >= relayed, f"{relayed} relayed envelopes")
    bus.publish(FENCE)


def test_process_bus_publish_from_workers_and_parent_reaches_every_worker_once(
    reap: list[int],
) -> None:
    bus = ProcessBus(workers=3)
    sent = {
        i: [Envelope.for_topic(f"t{i}", f"w{i}-{n}") for n in range(3)]
        + [Envelope.for_user(i, b"u"), Envelope.for_all(f"all from {i}")]
        for i in range(3)
    }
    children = [fork_worker(bus, i, collect_until_fence(*sent[i])) for i in range(3)]
    reap.extend(pid for pid, _ in children)
    bus.attach_parent()
    from_parent = [Envelope.for_topic("t0", "parent"), Envelope.for_all(b"\x01" * 10)]
    for envelope in from_parent:
        bus.publish(envelope)
    fence_after(bus, 3 * 5 + 2)
    every = sorted(summary(e) for e in [*from_parent, *(e for i in sent for e in sent[i])])
    outcomes = results(children)
    orders = [got for got, _ in outcomes]
    for got, stats in outcomes:
        assert sorted(got) == every  # each envelope exactly once
        assert stats["delivered"] == len(every) + 1
    assert orders[0] == orders[1] == orders[2]  # one order for every worker
    for i in range(3):  # and each publisher's order kept
        mine = [summary(e) for e in sent[i]]
        assert [s for s in orders[0] if s in mine] == mine
    bus.close()


def test_process_bus_carries_large_payloads(reap: list[int]) -> None:
    big = [Envelope.for_all(os.urandom(1 << 20)), Envelope.for_topic("x", os.urandom(3 << 20 | 1))]
    bus = ProcessBus(workers=2)
    children = [
        fork_worker(bus, 0, collect_until_fence(*big)),
        fork_worker(bus, 1, collect_until_fence()),
    ]
    reap.extend(pid for pid, _ in children)
    bus.attach_parent()
    from_parent = Envelope.for_user(7, os.urandom(1536 * 1024))
    bus.publish(from_parent)
    fence_after(bus, 3)
    every = sorted(summary(e) for e in [*big, from_parent])
    for got, _ in results(children):
        assert sorted(got) == every
    bus.close()


def test_process_bus_threads_in_a_worker_publish_concurrently(reap: list[int]) -> None:
    sent = [Envelope.for_topic("t", f"{n}") for n in range(400)]
    bus = ProcessBus(workers=2)
    children = [
        fork_worker(bus, 0, collect_until_fence(*sent, threads=4)),
        fork_worker(bus, 1, collect_until_fence()),
    ]
    reap.extend(pid for pid, _ in children)
    bus.attach_parent()
    fence_after(bus, len(sent))
    for got, _ in results(children):
        assert sorted(got) == sorted(summary(e) for e in sent)
        for k in range(4):
            mine = [summary(e) for e in sent[k::4]]
            assert [s for s in got if s in mine] == mine
    bus.close()


def test_process_bus_worker_respawn_gets_a_fresh_pair(reap: list[int]) -> None:
    bus = ProcessBus(workers=2)
    survivor = fork_worker(bus, 0, collect_until_fence())
    short_lived = fork_worker(bus, 1, lambda bus: None)
    reap.extend([survivor[0], short_lived[0]])
    bus.attach_parent()
    assert results([short_lived]) == [None]
    wait_until(lambda: bus.stats.disconnects == 1, "the parent to see worker 1 gone")

    bus.respawn_pair(1)
    replacement = fork_worker(bus, 1, collect_until_fence())
    reap.append(replacement[0])
    bus.attach_parent()
    envelope = Envelope.for_user(99, "after respawn")
    bus.publish(envelope)
    fence_after(bus, 1)
    for got, _ in results([survivor, replacement]):
        assert got == [summary(envelope)]
    assert bus.stats.reconnects == 1
    bus.close()


def test_process_bus_workers_notice_the_parent_going_away(reap: list[int]) -> None:
    def body(bus: ProcessBus) -> object:
        bus.start(lambda envelope: None)
        gone = bus.parent_gone.wait(DEADLINE)
        try:
            bus.publish(FENCE)
            refused = False
        except BusUnavailable:
            refused = True
        return gone, refused, bus.stats.disconnects

    bus = ProcessBus(workers=3)
    children = [fork_worker(bus, i, body) for i in range(3)]
    reap.extend(pid for pid, _ in children)
    bus.attach_parent()
    time.sleep(0.1)
    bus.close()  # what the kernel does to the parent's ends when the parent dies
    assert results(children) == [(True, True, 1)] * 3


def test_process_bus_workers_notice_a_killed_parent() -> None:
    report_r, report_w = os.pipe()
    supervisor = os.fork()
    if supervisor == 0:  # a parent of its own, killed below with its workers still running
        try:
            bus = ProcessBus(workers=2)
            for i in range(2):
                if os.fork() == 0:
                    try:
                        bus.attach_worker(i)
                        bus.start(lambda envelope: None)
                        os.write(report_w, b"r")
                        gone = bus.parent_gone.wait(DEADLINE)
                        os.write(report_w, b"g" if gone and bus.stats.disconnects == 1 else b"x")
                    finally:
                        os._exit(0)
            bus.attach_parent()
            time.sleep(DEADLINE)
        finally:
            os._exit(0)
    os.close(report_w)
    with os.fdopen(report_r, "rb", buffering=0) as reports:
        assert reports.read(1) + reports.read(1) == b"rr"
        os.kill(supervisor, signal.SIGKILL)
        os.waitpid(supervisor, 0)
        assert reports.read(1) + reports.read(1) == b"gg"


def test_process_bus_refuses_before_attach_and_oversized_envelopes() -> None:
    bus = ProcessBus(workers=1, max_message=1000)
    with pytest.raises(BusUnavailable):
        bus.publish(FENCE)
    with pytest.raises(ValueError):
        bus.publish(Envelope.for_all(bytes(2000)))
    bus.close()


# -- RedisBus ---------------------------------------------------------------------------------


class Node:
    """One gateway node as the bus sees it: a RedisBus and what it delivered."""

    def __init__(self, url: str, **options: Any) -> None:
        self.got: list[Envelope] = []
        options.setdefault("backoff_cap", 0.5)
        self.bus = RedisBus(url, **options)
        self.bus.start(self.got.append)

    def payloads(self) -> list[bytes]:
        return [e.payload for e in self.got]


@pytest.fixture
def nodes(redis_server: RedisServer) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(**options: Any) -> Node:
        node = Node(redis_server.url, **options)
        made.append(node)
        assert node.bus.wait_ready(10)
        return node

    yield make
    for node in made:
        node.bus.close(timeout=1)


@pytest.mark.parametrize("sharded", [None, False])
def test_redis_two_nodes_exchange_topic_user_and_broadcast(
    nodes: Callable[..., Node], sharded: bool | None
) -> None:
    a, b = nodes(sharded=sharded), nodes(sharded=sharded)
    if sharded is None:  # the server here is 7.x: sharded pub/sub
        assert a.bus.sharded is True
    sent = [
        Envelope.for_topic("mail", "new mail", policy="latest"),
        Envelope.for_user(2**63 + 5, b"\x00\xff"),
        Envelope.for_all("maintenance at noon", policy="close"),
    ]
    for envelope in sent:
        a.bus.publish(envelope)
    assert a.got == sent  # delivered locally at once
    wait_until(lambda: len(b.got) == 3, "node b to receive")
    assert b.got == sent
    b.bus.publish(FENCE)
    wait_until(lambda: FENCE in a.got, "the fence")
    assert a.got == [*sent, FENCE]  # its own envelopes did not come back from Redis
    assert b.got == [*sent, FENCE]
    assert a.bus.stats.snapshot()["delivered"] == 4


def test_redis_connects_two_processes(
    redis_server: RedisServer, nodes: Callable[..., Node], reap: list[int]
) -> None:
    a = nodes()
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # node b: its own process, its bus made after the fork
        code = 1
        try:
            b = Node(redis_server.url)
            assert b.bus.wait_ready(10)
            b.bus.publish(Envelope.for_user(5, "from the child"))
            wait_until(lambda: len(b.got) == 2, "the parent's answer")
            os.write(write_end, pickle.dumps(b.got))
            b.bus.close(timeout=1)
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    reap.append(pid)
    os.close(write_end)
    wait_until(lambda: len(a.got) == 1, "the child's envelope")
    a.bus.publish(Envelope.for_topic("news", "from the parent"))
    with os.fdopen(read_end, "rb") as stream:
        got = pickle.loads(stream.read())
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    assert (
        a.got
        == got
        == [
            Envelope.for_user(5, "from the child"),
            Envelope.for_topic("news", "from the parent"),
        ]
    )


def test_redis_outage_keeps_local_delivery_buffers_refuses_then_flushes_in_order(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    a, b = nodes(max_buffered=20), nodes()
    a.bus.publish(Envelope.for_all("before"))
    wait_until(lambda: b.payloads() == [b"before"], "the first envelope")
    wait_until(lambda: a.bus.stats.buffered == 0, "node a to see its first envelope sent")

    redis_server.kill()
    during = [Envelope.for_topic("t", f"during {n}") for n in range(20)]
    for envelope in during:
        a.bus.publish(envelope)
        assert a.got[-1] == envelope  # local traffic is unaffected
    wait_until(lambda: a.bus.stats.disconnects >= 1, "node a to notice the outage")
    assert a.bus.stats.buffered == 20
    with pytest.raises(BusUnavailable):
        a.bus.publish(Envelope.for_all("one too many"))
    assert a.got[-1] == during[-1]  # a refused envelope is not delivered anywhere
    assert a.bus.stats.refused == 1

    redis_server.start()  # same port
    wait_until(lambda: len(b.got) == 21, "the buffered envelopes at node b")
    assert b.got[1:] == during  # in order, each once
    assert a.bus.stats.reconnects >= 1 and b.bus.stats.reconnects >= 1
    assert b.bus.stats.missed == 0
    assert a.bus.stats.buffered == 0
    a.bus.publish(Envelope.for_all("after"))
    wait_until(lambda: b.payloads()[-1:] == [b"after"], "traffic after the outage")


def test_redis_skips_resent_envelopes_and_counts_the_missed_ones(
    redis_server: RedisServer, nodes: Callable[..., Node]
) -> None:
    import redis

    b = nodes()
    command = "SPUBLISH" if b.bus.sharded else "PUBLISH"
    admin = redis.Redis.from_url(redis_server.url)

    def send(seq: int, envelope: Envelope) -> None:  # another node, as the wire sees it
        message = b"N" * 16 + seq.to_bytes(8, "big") + envelope.encode()
        admin.execute_command(command, b.bus.channel, message)

    send(1, Envelope.for_all("one"))
    send(7, Envelope.for_all("seven"))  # 2..6 never reached this node
    send(7, Envelope.for_all("seven"))  # re-sent after a broken connection
    admin.execute_command(command, b.bus.channel, b"junk")
    send(8, FENCE)
    wait_until(lambda: FENCE in b.got, "the fence")
    assert b.payloads() == [b"one", b"seven", b""]
    stats = b.bus.stats.snapshot()
    assert (stats["missed"], stats["duplicates"], stats["malformed"]) == (5, 1, 1)
    admin.close()


def test_redis_concurrent_publishers_keep_each_threads_order(nodes: Callable[..., Node]) -> None:
    a, b = nodes(), nodes()

    def publisher(k: int) -> None:
        for n in range(100):
            a.bus.publish(Envelope.for_topic(f"thread{k}", f"{n}"))

    threads = [threading.Thread(target=publisher, args=(k,)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wait_until(lambda: len(b.got) == 400, "400 envelopes at node b")
    for node in (a, b):
        for k in range(4):
            mine = [e.payload for e in node.got if e.key == f"thread{k}"]
            assert mine == [str(n).encode() for n in range(100)]


def test_redis_asyncio_callers(nodes: Callable[..., Node]) -> None:
    a, b = nodes(), nodes()

    async def main() -> None:
        await asyncio.gather(*(a.bus.apublish(Envelope.for_user(n, "hi")) for n in range(20)))
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, a.bus.publish, FENCE)

    asyncio.run(main())
    wait_until(lambda: FENCE in b.got, "the fence at node b")
    assert sorted(e.key for e in b.got if e.kind == "user") == list(range(20))  # type: ignore[type-var]


def test_redis_close_counts_what_it_could_not_send() -> None:
    require_redis()
    got: list[Envelope] = []
    bus = RedisBus(f"redis://127.0.0.1:{free_port()}/0", backoff_cap=0.1)  # nobody listens
    bus.start(got.append)
    for n in range(5):
        bus.publish(Envelope.for_all(f"{n}"))
    assert len(got) == 5 and not bus.wait_ready(0.2)
    bus.close(timeout=2)
    assert bus.stats.dropped == 5 and bus.stats.buffered == 0
    with pytest.raises(BusUnavailable):
        bus.publish(FENCE)
