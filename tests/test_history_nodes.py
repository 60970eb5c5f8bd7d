"""History across processes and machines: ProcessBus workers, and RedisBus nodes with a real
redis-server killed, flushed and restarted, gateways SIGKILLed and started again.

Each node is a small script run as its own process, with history on. Subscribers are
lowmemws.client clients (the envelope subprotocol, resuming by position); a raw
websocket-client connection drives a node in text: ``pub TOPIC TEXT`` and ``user N TEXT``
publish from that node, ``users N,M TEXT`` sends a batch, ``paced TOPIC TEXT`` a paced
publish, ``positions TOPIC USER`` answers Gateway.positions; the others answer ``ok``,
``refused`` (BusUnavailable) or the ValueError.

A client's first connection is answered once its node receives the streams it joins (on
RedisBus: their partition channels confirmed by Redis), so a scenario may publish as soon as
its client is connected: every message after the 101 reaches it (docs/envelope.md).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import signal
import socket
import sys
import textwrap
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from lowmemws.client import Client, Delivery, Refresh
from tests.support import waiting
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer
from tests.support.servers import ServerProcess, StartServer

DEADLINE = 20.0  # bounds every wait; not a performance figure

NODE = textwrap.dedent(
    """
    import argparse, json, threading
    from lowmemws import Accept, BusUnavailable, Config, Gateway, History, RedisBus

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis", default="")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--write-budget", type=int, default=64 << 20)
    parser.add_argument("--replay-threads", type=int, default=4)
    args = parser.parse_args()
    bus = RedisBus(args.redis, backoff_base=0.05, backoff_cap=0.5) if args.redis else None
    history = History(replay_threads=args.replay_threads, replay_max_bytes=1 << 20)
    config = Config(history=history, write_budget=args.write_budget)
    gateway = Gateway(args.host, args.port, processes=args.processes, config=config, bus=bus)

    @gateway.on_connect
    def decide(request):
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        return Accept(user=int(request.params.get("user", "0")), topics=topics)

    @gateway.on_message
    def command(conn, message):
        verb, target, text = message.split(" ", 2)
        try:
            if verb == "pub":
                gateway.publish(target, text)
            elif verb == "users":
                gateway.send_to_users([int(user) for user in target.split(",")], text)
            elif verb == "paced":
                gateway.publish(target, text, spread=1.0)
            elif verb == "positions":  # positions TOPIC USER: answered, not "ok"
                conn.send(json.dumps(gateway.positions(topics=(target,), user=int(text))))
                return
            else:
                gateway.send_to_user(int(target), text)
            conn.send("ok")
        except BusUnavailable:
            conn.send("refused")
        except ValueError as exc:
            conn.send(f"ValueError: {exc}")

    def announce():
        ready = gateway.wait_ready(30) and (bus is None or bus.wait_ready(30))
        if ready:
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


@pytest.fixture
def node_script(tmp_path: Path) -> Path:
    script = tmp_path / "history_node.py"
    script.write_text(NODE)
    return script


@pytest.fixture
def restarted() -> Iterator[list[ServerProcess]]:
    """Nodes started again by a test (on their old port); stopped at teardown."""
    nodes: list[ServerProcess] = []
    yield nodes
    for node in nodes:
        node.stop()


def publisher(node: ServerProcess) -> Callable[[str], str]:
    control = websocket.create_connection(f"ws://{node.host}:{node.port}/", timeout=DEADLINE)

    def command(text: str) -> str:
        control.send(text)
        return str(control.recv())

    return command


def subscriber(node: ServerProcess, user: int, topics: str) -> Client:
    url = f"ws://{node.host}:{node.port}/?user={user}&topics={topics}"
    return Client(url, backoff_base=0.05, backoff_cap=0.5, heartbeat_timeout=DEADLINE)


async def deliveries(client: Client, count: int) -> list[tuple[str | None, object]]:
    got = []
    for _ in range(count):
        try:
            event = await client.next(DEADLINE)
        except TimeoutError:
            raise AssertionError(f"only {got} came; positions {client.positions}") from None
        assert isinstance(event, Delivery), event
        got.append((event.stream, event.data))
    return got


def test_processbus_workers_share_one_history(start_server: StartServer, node_script: Path) -> None:
    node = start_server([sys.executable, str(node_script)], ["--processes", "2"])
    publish = publisher(node)

    async def scenario() -> None:
        async with subscriber(node, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            expected = []
            for round_ in range(6):  # each reconnect lands on either worker
                for n in range(3):
                    text = f"r{round_}m{n}"
                    assert publish(f"pub mail {text}") == "ok"
                    expected.append(("t:mail", text))
                assert publish(f"user 5 r{round_}u") == "ok"
                expected.append(("u:5", f"r{round_}u"))
                got = await deliveries(client, 4)
                assert sorted(got, key=str) == sorted(expected[-4:], key=str)
                client.drop_link()
                await asyncio.sleep(0.05)
                publish(f"pub mail r{round_}gap")  # published while it is away
                expected.append(("t:mail", f"r{round_}gap"))
                assert await deliveries(client, 1) == [expected[-1]]
            assert client.connects == 7

    asyncio.run(scenario())


@pytest.fixture
def redis_nodes(
    start_server: StartServer, node_script: Path, redis_server: RedisServer
) -> Callable[[], ServerProcess]:
    def start() -> ServerProcess:
        return start_server([sys.executable, str(node_script)], ["--redis", redis_server.url])

    return start


def test_a_killed_gateway_restarted_resumes_what_another_node_published(
    redis_nodes: Callable[[], ServerProcess], restarted: list[ServerProcess]
) -> None:
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            assert publish_b("pub mail first") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "first")]
            await asyncio.wait_for(client.synced.wait(), DEADLINE)  # knows all its streams
            os.kill(a.proc.pid, signal.SIGKILL)  # a crash: no close frame, no goodbye
            a.proc.wait(timeout=DEADLINE)
            for n in range(5):
                assert publish_b(f"pub mail mail {n}") == "ok"
            assert publish_b("user 5 for you") == "ok"
            again = ServerProcess(a.argv, a.host, a.port)  # the same port: the client's URL
            restarted.append(again)
            again.wait_ready(30)
            got = await deliveries(client, 6)
            mail = [data for stream, data in got if stream == "t:mail"]
            assert mail == [f"mail {n}" for n in range(5)]
            assert ("u:5", "for you") in got
            assert client.connects == 2

    asyncio.run(scenario())


def test_history_lost_in_redis_changes_the_epoch_and_the_client_refreshes(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    import redis

    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            assert publish_b("pub mail before") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "before")]
            old_epoch = client.positions["t:mail"][0]
            # while connected: a flush, then a message under the new epoch
            redis.Redis.from_url(redis_server.url).flushall()
            assert publish_b("pub mail after flush") == "ok"
            refresh = await client.next(DEADLINE)
            assert isinstance(refresh, Refresh) and refresh.epoch != old_epoch
            assert await deliveries(client, 1) == [("t:mail", "after flush")]
            # while away: the gateway says refresh when the client comes back
            client.drop_link()
            redis.Redis.from_url(redis_server.url).flushall()
            assert publish_b("pub mail lost") == "ok"
            refresh = await client.next(DEADLINE)
            assert isinstance(refresh, Refresh) and refresh.stream == "t:mail"
            assert publish_b("pub mail later") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "later")]

    asyncio.run(scenario())


def test_redis_down_while_publishing_refuses_and_loses_nothing_accepted(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            accepted = []
            for n in range(3):
                assert publish_b(f"pub mail up {n}") == "ok"
                accepted.append(f"up {n}")
            assert [data for _, data in await deliveries(client, 3)] == accepted
            redis_server.kill()
            for n in range(3):
                assert publish_b(f"pub mail down {n}") == "refused"  # a clear error
            redis_server.start()  # same port, empty: the history is lost, the epoch changes
            answer = "refused"
            for _ in range(100):  # until the node's Redis link is back
                answer = publish_b("pub mail back")
                if answer == "ok":
                    break
                await asyncio.sleep(0.1)
            assert answer == "ok"
            # "back" went to a Redis without the old history: the client is told to refresh
            # (its state then includes "back"), or gets "back" after that refresh
            refresh = await client.next(DEADLINE)
            assert isinstance(refresh, Refresh) and refresh.stream == "t:mail", refresh
            assert publish_b("pub mail later") == "ok"
            after: list[object] = []
            while "later" not in after:  # (a resync racing the epoch change may say it twice)
                event = await client.next(DEADLINE)
                if isinstance(event, Delivery):
                    after.append(event.data)
            assert after in (["later"], ["back", "later"])  # each once, in order
            assert client.positions["t:mail"] == (refresh.epoch, 2)

    asyncio.run(scenario())


def rss_kib(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def open_resuming(port: int, count: int, positions: dict[str, list[object]]) -> list[socket.socket]:
    """count raw clients of lowmemws.v1 naming positions, all at once, none reading yet."""
    resume = urllib.parse.quote(json.dumps(positions))
    socks = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE)
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /?topics=all&lmw_resume={resume} HTTP/1.1\r\nHost: x\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: lowmemws.v1\r\n\r\n".encode()
        )
        socks.append(sock)
    return socks


def read_until_synced(sock: socket.socket) -> bytes:
    data = b""
    while b'{"synced":true}' not in data:
        chunk = sock.recv(1 << 20)
        assert chunk, data[-200:]
        data += chunk
    sock.close()
    return data


def test_a_mass_resume_keeps_the_gateway_rss_bounded(
    start_server: StartServer, node_script: Path
) -> None:
    budget = 8 << 20
    node = start_server(
        [sys.executable, str(node_script)],
        ["--write-budget", str(budget), "--replay-threads", "2"],
    )
    publish = publisher(node)
    first = read_until_synced(open_resuming(node.port, 1, {})[0])
    assert b'"resumed":"t:all"' in first
    for n in range(30):  # 30 x 32 KiB missed by each of 600 clients: 560 MiB if all were held
        assert publish(f"pub all {n:04d}" + "x" * 32768) == "ok"
    before = rss_kib(node.proc.pid, "VmHWM")
    clients = open_resuming(node.port, 600, {"t:all": ["", 0]})
    time.sleep(2.0)  # nobody reads: replays fill the kernel buffers, then the write budget
    outcomes = [read_until_synced(sock) for sock in clients]
    growth = (rss_kib(node.proc.pid, "VmHWM") - before) * 1024
    assert growth < budget + (48 << 20), f"peak RSS growth {growth >> 20} MiB"
    complete = 0
    for data in outcomes:
        offsets = [int(o) for o in re.findall(rb'"s":"t:all","e":"[0-9a-f]+","o":(\d+)', data)]
        if b'"resumed":"t:all"' in data:
            assert offsets == list(range(1, 31)), offsets[:5]  # every message, in order
            complete += 1
        else:
            assert b'"refresh":"t:all"' in data  # told, never a silent gap
            assert offsets == sorted(set(offsets))
    assert complete >= 1


def worker_pids(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        return [int(child) for child in children.read().split()]


def test_processbus_history_outlives_crashed_workers(
    start_server: StartServer, node_script: Path
) -> None:
    node = start_server([sys.executable, str(node_script)], ["--processes", "2"])

    async def scenario() -> None:
        async with subscriber(node, 5, "mail") as client:
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            assert publisher(node)("pub mail before") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "before")]
            workers = worker_pids(node.proc.pid)
            assert len(workers) == 2
            for pid in workers:  # both workers crash; the parent (and its history) stays
                os.kill(pid, signal.SIGKILL)
            for _ in range(100):
                await asyncio.sleep(0.1)
                fresh = worker_pids(node.proc.pid)
                if len(fresh) == 2 and not set(fresh) & set(workers):
                    break
            publish = None
            for _ in range(100):  # the respawned workers listen again
                try:
                    publish = publisher(node)
                    break
                except OSError:
                    await asyncio.sleep(0.1)
            assert publish is not None
            for n in range(3):
                assert publish(f"pub mail after crash {n}") == "ok"
            got = await deliveries(client, 3)
            assert got == [("t:mail", f"after crash {n}") for n in range(3)]
            assert client.connects == 2

    asyncio.run(scenario())


def test_a_publisher_with_history_stores_what_a_reconnecting_client_resumes(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    from lowmemws import History, Publisher

    node = redis_nodes()

    async def scenario() -> None:
        with Publisher(redis_server.url, history=History()) as backend:
            assert backend.wait_ready(DEADLINE)
            async with subscriber(node, 5, "mail") as client:
                await asyncio.wait_for(client.synced.wait(), DEADLINE)
                backend.publish("mail", "first")
                assert await deliveries(client, 1) == [("t:mail", "first")]
                client.drop_link()
                await asyncio.sleep(0.05)
                for n in range(3):
                    backend.publish("mail", f"away {n}")
                backend.send_to_user(5, "for you")
                got = await deliveries(client, 4)
                assert [d for s, d in got if s == "t:mail"] == [f"away {n}" for n in range(3)]
                assert ("u:5", "for you") in got
                assert client.connects == 2

    asyncio.run(scenario())


def shard_channels(admin: Any) -> set[str]:
    """The deployment's shard channels with a subscriber, as Redis says, but the nodes'
    answer channels (presence queries: one per node, always)."""
    found = admin.execute_command("PUBSUB", "SHARDCHANNELS", "lowmemws:*")
    return {c.decode() for c in found if not c.startswith(b"lowmemws:answers:")}


def test_a_resume_on_a_node_without_members_subscribes_and_hands_over_to_the_membership(
    redis_nodes: Callable[[], ServerProcess],
    redis_server: RedisServer,
    restarted: list[ServerProcess],
) -> None:
    """The restarted node's only member of each stream is the connection it resumes, which
    joins them only after the replay: the read must subscribe their partitions itself (or
    its marker never comes back and the client is told to refresh), then leave them to the
    membership: subscribed while the client is there, gone after it leaves."""
    import redis

    from lowmemws._routing import channel_for, control_channel

    admin = redis.Redis.from_url(redis_server.url)
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)
    user, topic = channel_for("user", 5), channel_for("topic", "mail")
    grace = 5.0  # RedisBus's default unsubscribe_grace, the nodes' setting

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait(timeout=DEADLINE)
            waiting.wait_until(lambda: topic not in shard_channels(admin), "a's leave", DEADLINE)
            for n in range(3):
                assert publish_b(f"pub mail m{n}") == "ok"
            assert publish_b("user 5 u0") == "ok"
            again = ServerProcess(a.argv, a.host, a.port)
            restarted.append(again)
            again.wait_ready(30)
            got = await deliveries(client, 4)  # a Refresh instead fails here
            assert [d for s, d in got if s == "t:mail"] == ["m0", "m1", "m2"]
            assert ("u:5", "u0") in got
            await asyncio.sleep(grace + 1.0)  # past the read's hold: the membership holds
            assert {user, topic} <= shard_channels(admin)
            assert publish_b("pub mail live") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "live")]
        # b holds no member: once the client is gone, a leaves too (no leaked interest)
        waiting.wait_until(
            lambda: shard_channels(admin) == {control_channel()}, "the leaves", DEADLINE
        )

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


def test_a_resume_after_the_node_left_the_partition_replays_what_it_did_not_see(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    """A node remembers the last offset of a stream it delivered; once its last member
    left, it unsubscribed the partition and saw none of the later messages. A client
    resuming there later must get them from the history (none will come live)."""
    import redis

    from lowmemws._routing import channel_for

    admin = redis.Redis.from_url(redis_server.url)
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)
    news = channel_for("topic", "news")

    async def scenario() -> None:
        async with subscriber(a, 7, "news") as first:
            await asyncio.wait_for(first.synced.wait(), DEADLINE)
            assert publish_b("pub news n0") == "ok"
            assert await deliveries(first, 1) == [("t:news", "n0")]
            positions = dict(first.positions)
        waiting.wait_until(lambda: news not in shard_channels(admin), "a's leave", DEADLINE)
        for n in range(1, 4):
            assert publish_b(f"pub news n{n}") == "ok"
        url = f"ws://{a.host}:{a.port}/?user=7&topics=news"
        async with Client(url, positions=positions, heartbeat_timeout=DEADLINE) as again:
            got = await deliveries(again, 3)
            assert got == [("t:news", f"n{n}") for n in range(1, 4)]

    try:
        asyncio.run(scenario())
    finally:
        admin.close()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    server = RedisCluster(tmp_path)
    server.start()
    yield server
    server.stop()


def test_a_killed_gateway_resumes_on_a_redis_cluster(
    start_server: StartServer,
    node_script: Path,
    cluster: RedisCluster,
    restarted: list[ServerProcess],
) -> None:
    """On a 3-master Redis Cluster the store script writes a stream's keys and SPUBLISHes
    on its partition channel in one slot (a cross-slot script is refused: the publish would
    answer "refused"); a gateway killed and restarted resumes streams owned by different
    shards, each in order."""
    import redis

    from lowmemws._history_redis import stream_channel, stream_keys

    def start() -> ServerProcess:
        return start_server([sys.executable, str(node_script)], ["--redis", cluster.url])

    topics = ["mail", "alerts", "news"]
    admin = redis.RedisCluster.from_url(cluster.url)
    try:
        for stream in [f"t:{topic}" for topic in topics] + ["u:5"]:
            slots = {admin.keyslot(key) for key in stream_keys("lowmemws:", stream)}
            assert slots == {admin.keyslot(stream_channel(stream))}
        streams = [f"t:{topic}" for topic in topics] + ["u:5"]
        owners = {admin.get_node_from_key(stream_channel(s)).port for s in streams}
    finally:
        admin.close()
    assert len(owners) == 3  # the streams span the three shards
    a, b = start(), start()
    publish_b = publisher(b)

    async def scenario() -> None:
        async with subscriber(a, 5, ",".join(topics)) as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            assert publish_b("pub mail first") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "first")]
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait(timeout=DEADLINE)
            expected = []
            for n in range(3):
                for topic in topics:
                    assert publish_b(f"pub {topic} {topic} {n}") == "ok"
                    expected.append((f"t:{topic}", f"{topic} {n}"))
            assert publish_b("user 5 for you") == "ok"
            again = ServerProcess(a.argv, a.host, a.port)
            restarted.append(again)
            again.wait_ready(30)
            got = await deliveries(client, len(expected) + 1)
            for topic in topics:
                mine = [d for s, d in got if s == f"t:{topic}"]
                assert mine == [f"{topic} {n}" for n in range(3)]
            assert ("u:5", "for you") in got
            assert client.connects == 2

    asyncio.run(scenario())


def test_history_survives_a_master_failover_on_a_redis_cluster(
    start_server: StartServer,
    node_script: Path,
    cluster: RedisCluster,
    restarted: list[ServerProcess],
) -> None:
    """The master holding a stream fails over to its replica (CLUSTER FAILOVER) while the
    stream's subscriber is away: every publish that answered "ok", before and after the
    failover, is replayed to the subscriber when it comes back, once and in order, with no
    "refresh" (the epoch lives in the stream's keys, which the replica took over)."""
    import redis

    from lowmemws._history_redis import stream_channel

    def start() -> ServerProcess:
        return start_server([sys.executable, str(node_script)], ["--redis", cluster.url])

    def owner() -> int:
        client = redis.RedisCluster.from_url(cluster.url)
        try:
            return int(client.get_node_from_key(stream_channel("t:mail")).port)
        finally:
            client.close()

    def fail_over(replica: int) -> None:
        deadline = time.monotonic() + DEADLINE
        while time.monotonic() < deadline:  # a manual failover may time out on a busy box
            assert cluster.cli_call(replica, "CLUSTER", "FAILOVER").strip() == "OK"
            attempt_ends = time.monotonic() + 6
            while time.monotonic() < attempt_ends:
                if owner() == replica:
                    return
                time.sleep(0.1)
        raise AssertionError(f"{replica} never took over")

    a, b = start(), start()
    publish_b = publisher(b)

    def publish_until_stored(text: str) -> None:
        """A publish refused while b's links follow the new slot map stored nothing
        (BusUnavailable's contract), so it is sent again until one answers "ok"."""
        deadline = time.monotonic() + DEADLINE
        while publish_b(f"pub mail {text}") != "ok":
            assert time.monotonic() < deadline, f"{text!r} was never stored"
            time.sleep(0.1)

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            assert publish_b("pub mail m0") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "m0")]
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            os.kill(a.proc.pid, signal.SIGKILL)
            a.proc.wait(timeout=DEADLINE)
            for text in ("m1", "m2"):
                publish_until_stored(text)
            old = owner()
            fail_over(cluster.replica_of(old))
            for text in ("m3", "m4"):
                publish_until_stored(text)
            again = ServerProcess(a.argv, a.host, a.port)
            restarted.append(again)
            again.wait_ready(30)
            got = await deliveries(client, 4)
            assert got == [("t:mail", f"m{n}") for n in range(1, 5)]
            assert client.connects == 2

    asyncio.run(scenario())


def batches_resumed_once_in_order(
    client: Client, send: Callable[[str, str], None]
) -> Callable[[], Any]:
    """A scenario: batches to users 5 (the client's) and 9, one missed while away."""

    async def scenario() -> None:
        await asyncio.wait_for(client.synced.wait(), DEADLINE)
        send("5,9", "b1")
        assert await deliveries(client, 1) == [("u:5", "b1")]
        client.drop_link()
        await asyncio.sleep(0.05)
        send("9,5,5", "b2")  # missed: stored in u:5 (once) and u:9
        send("5", "b3")
        assert await deliveries(client, 2) == [("u:5", "b2"), ("u:5", "b3")]
        assert client.connects == 2
        send("9,5", "b4")
        assert await deliveries(client, 1) == [("u:5", "b4")]
        assert client.positions["u:5"][1] == 4

    return scenario


def test_processbus_batches_are_stored_per_user_and_resumed(
    start_server: StartServer, node_script: Path
) -> None:
    node = start_server([sys.executable, str(node_script)], ["--processes", "2"])
    publish = publisher(node)

    def send(users: str, text: str) -> None:
        assert publish(f"users {users} {text}") == "ok"

    async def scenario() -> None:
        async with subscriber(node, 5, "mail") as client:
            await batches_resumed_once_in_order(client, send)()

    asyncio.run(scenario())


def test_redisbus_batches_from_another_node_are_stored_per_user_and_resumed(
    redis_nodes: Callable[[], ServerProcess],
) -> None:
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)

    def send(users: str, text: str) -> None:
        assert publish_b(f"users {users} {text}") == "ok"

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await batches_resumed_once_in_order(client, send)()

    asyncio.run(scenario())


def test_a_publisher_batch_with_history_is_stored_per_user_and_resumed(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    from lowmemws import History, Publisher

    node = redis_nodes()

    async def scenario() -> None:
        with Publisher(redis_server.url, history=History()) as backend:
            assert backend.wait_ready(DEADLINE)
            with pytest.raises(ValueError, match="several users is not supported with history"):
                backend.send_to_users([5, 6], "paced", rate=10.0)

            def send(users: str, text: str) -> None:
                backend.send_to_users([int(user) for user in users.split(",")], text)

            async with subscriber(node, 5, "mail") as client:
                await batches_resumed_once_in_order(client, send)()

    asyncio.run(scenario())


def paced_resumed_once_in_order(
    client: Client, command: Callable[[str], str]
) -> Callable[[], Awaitable[None]]:
    """A paced publish with history, stored at the call and paced: a client that drops
    while paced sends are in flight resumes them by replay, each once and in order."""

    def paced(text: str) -> None:
        assert command(f"paced mail {text}") == "ok"

    async def scenario() -> None:
        await asyncio.wait_for(client.synced.wait(), DEADLINE)
        paced("p1")
        assert await deliveries(client, 1) == [("t:mail", "p1")]
        client.drop_link()
        for n in range(2, 6):
            paced(f"p{n}")
        assert await deliveries(client, 4) == [("t:mail", f"p{n}") for n in range(2, 6)]
        assert command("pub mail m6") == "ok"
        assert await deliveries(client, 1) == [("t:mail", "m6")]
        assert client.positions["t:mail"][1] == 6

    return scenario


def test_processbus_paced_sends_with_history_resume_once_in_order(
    start_server: StartServer, node_script: Path
) -> None:
    node = start_server([sys.executable, str(node_script)], ["--processes", "2"])
    command = publisher(node)

    async def scenario() -> None:
        async with subscriber(node, 5, "mail") as client:
            await paced_resumed_once_in_order(client, command)()

    asyncio.run(scenario())


def test_redisbus_paced_sends_from_another_node_resume_once_in_order(
    redis_nodes: Callable[[], ServerProcess],
) -> None:
    a, b = redis_nodes(), redis_nodes()
    command_b = publisher(b)

    async def scenario() -> None:
        async with subscriber(a, 5, "mail") as client:
            await paced_resumed_once_in_order(client, command_b)()

    asyncio.run(scenario())


def state_positions_then_resumed(
    client_at: Callable[[dict[str, tuple[str, int]]], Client], command: Callable[[str], str]
) -> Callable[[], Awaitable[None]]:
    """Positions read (on some node) with the state; messages published after them and
    before the client connects reach it once, in order."""

    async def scenario() -> None:
        assert command("pub mail s1") == "ok"
        assert command("user 5 in-state") == "ok"
        positions = {k: (e, o) for k, (e, o) in json.loads(command("positions mail 5")).items()}
        assert positions["t:mail"][1] == 1 and positions["u:5"][1] == 1
        assert command("pub mail m2") == "ok"
        assert command("user 5 u2") == "ok"
        async with client_at(positions) as client:
            got = await deliveries(client, 2)
            assert sorted(got, key=str) == [("t:mail", "m2"), ("u:5", "u2")]
            assert command("pub mail m3") == "ok"
            assert await deliveries(client, 1) == [("t:mail", "m3")]

    return scenario


def test_processbus_positions_of_the_state_resume_a_first_connection(
    start_server: StartServer, node_script: Path
) -> None:
    node = start_server([sys.executable, str(node_script)], ["--processes", "2"])

    def client_at(positions: dict[str, tuple[str, int]]) -> Client:
        url = f"ws://{node.host}:{node.port}/?user=5&topics=mail"
        return Client(url, positions=positions, backoff_base=0.05, heartbeat_timeout=DEADLINE)

    asyncio.run(state_positions_then_resumed(client_at, publisher(node))())


def test_redisbus_positions_read_on_another_node_resume_a_first_connection(
    redis_nodes: Callable[[], ServerProcess],
) -> None:
    a, b = redis_nodes(), redis_nodes()

    def client_at(positions: dict[str, tuple[str, int]]) -> Client:
        url = f"ws://{a.host}:{a.port}/?user=5&topics=mail"
        return Client(url, positions=positions, backoff_base=0.05, heartbeat_timeout=DEADLINE)

    asyncio.run(state_positions_then_resumed(client_at, publisher(b))())


def test_a_message_published_right_after_the_101_reaches_a_first_connection(
    redis_nodes: Callable[[], ServerProcess],
) -> None:
    """The node of a fresh topic and user (partitions it holds no member of) answers the
    101 only once Redis confirmed their channels: what another node publishes right after
    the 101, before any `synced`, reaches the client live (it failed without that)."""
    a, b = redis_nodes(), redis_nodes()
    publish_b = publisher(b)
    for round_ in range(30):
        topic, user = f"fresh{round_}x{os.getpid()}", 100_000 + round_
        query = urllib.parse.urlencode({"user": user, "topics": topic, "lmw_resume": "{}"})
        client = websocket.create_connection(
            f"ws://{a.host}:{a.port}/?{query}", timeout=DEADLINE, subprotocols=["lowmemws.v1"]
        )
        try:  # create_connection returns as soon as the 101 is read
            assert publish_b(f"pub {topic} t{round_}") == "ok"
            assert publish_b(f"user {user} u{round_}") == "ok"
            got = set()
            while len(got) < 2:
                frame = json.loads(client.recv())  # a timeout fails the test
                if "d" in frame:
                    got.add((frame["s"], frame["d"]))
            assert got == {(f"t:{topic}", f"t{round_}"), (f"u:{user}", f"u{round_}")}
        finally:
            client.close()


def test_publisher_positions_read_with_the_state_resume_a_first_connection(
    redis_nodes: Callable[[], ServerProcess], redis_server: RedisServer
) -> None:
    """A backend process (no connections) reads the positions with the state: what it
    publishes afterwards, before the page connects, reaches the page once, in order."""
    from lowmemws import History, Publisher

    node = redis_nodes()

    async def scenario() -> None:
        with Publisher(redis_server.url, history=History()) as backend:
            assert backend.wait_ready(DEADLINE)
            assert backend.positions(["inbox"], "alice") == {
                "t:inbox": ("", 0),
                f"u:{backend._user_ids.tag('alice')}": ("", 0),
            }  # no history yet: from the first message on
            backend.publish("mail", "in the state")
            backend.send_to_user(5, "also in the state")
            positions = backend.positions(["mail"], 5)
            assert [offset for _, offset in positions.values()] == [1, 1]
            assert all(len(epoch) > 0 for epoch, _ in positions.values())
            for n in range(3):
                backend.publish("mail", f"after {n}")
            backend.send_to_user(5, "after the state")
            url = f"ws://{node.host}:{node.port}/?user=5&topics=mail"
            client = Client(url, positions=positions, backoff_base=0.05, heartbeat_timeout=DEADLINE)
            async with client:
                got = await deliveries(client, 4)
                assert [d for s, d in got if s == "t:mail"] == [f"after {n}" for n in range(3)]
                assert [d for s, d in got if s == "u:5"] == ["after the state"]
                backend.publish("mail", "live")
                assert await deliveries(client, 1) == [("t:mail", "live")]
            assert await backend.apositions(["mail"], 5) == {
                "t:mail": (positions["t:mail"][0], 5),
                "u:5": (positions["u:5"][0], 2),
            }

    asyncio.run(scenario())


def test_publisher_positions_refuses_what_it_cannot_answer(redis_server: RedisServer) -> None:
    from lowmemws import BusUnavailable, History, Publisher

    with Publisher(redis_server.url) as plain:
        with pytest.raises(ValueError, match="no history"):
            plain.positions(["mail"])
    with Publisher(redis_server.url, history=History()) as backend:
        assert backend.wait_ready(DEADLINE)
        with pytest.raises(ValueError):
            backend.positions(["mail"], -1)
        with pytest.raises(ValueError, match="str"):
            backend.positions([7])  # type: ignore[list-item]
    unreachable = socket.socket()
    unreachable.bind(("127.0.0.1", 0))  # a port nobody listens on
    port = unreachable.getsockname()[1]
    with Publisher(f"redis://127.0.0.1:{port}", history=History(), socket_timeout=1.0) as down:
        with pytest.raises(BusUnavailable):
            down.positions(["mail"])
    unreachable.close()
