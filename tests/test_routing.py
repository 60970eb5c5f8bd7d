"""Interest routing (issue 15): each node receives only the partitions it has members in.

The channel mapping is checked as a function; the rest runs real gateways (in this process,
each with its own RedisBus) against a real redis-server, and asks Redis itself which channels
are subscribed (PUBSUB SHARDCHANNELS / SHARDNUMSUB): a node subscribes to a partition when it
gains its first member there, leaves it after the grace once the last is gone, subscribes
again to exactly what it needs after a Redis restart or its own restart, and users with
connections on several nodes get every message on each.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from lowmemws._bus_base import Envelope
from lowmemws._c_server import TopicIds
from lowmemws._routing import (
    PARTITIONS,
    channel_for,
    control_channel,
    route,
    topic_partition,
    user_channel,
    user_partition,
)
from tests.support import waiting
from tests.support.gateway_nodes import DEADLINE, Node, same_partition_users, shard_subscribers
from tests.support.redis_cluster import RedisCluster
from tests.support.redis_server import RedisServer, require_redis

PREFIX = "lowmemws:"
ANSWERS = b"lowmemws:answers:"

wait_until = waiting.waiter(DEADLINE, interval=0.02)


# -- the mapping ------------------------------------------------------------------------------


def test_each_kind_has_its_channel_hash_tagged_for_redis_cluster() -> None:
    assert channel_for("user", 7) == f"lowmemws:{{u:{user_partition(7)}}}"
    assert channel_for("topic", "news") == f"lowmemws:{{t:{topic_partition('news')}}}"
    assert channel_for("broadcast") == channel_for("cancel", 3) == control_channel()
    assert channel_for("user", 7, prefix="app:").startswith("app:{u:")
    assert all(0 <= user_partition(tag) < PARTITIONS for tag in (0, 1, 2**64 - 1))
    spread = {user_partition(tag) for tag in range(1, 20001)}
    assert len(spread) > PARTITIONS * 0.95  # consecutive tags spread over the partitions
    with pytest.raises(ValueError):
        channel_for("topic", 7)
    with pytest.raises(ValueError):
        channel_for("user", "7")
    with pytest.raises(ValueError):
        channel_for("users", (1, 2))
    with pytest.raises(OverflowError):
        user_partition(2**64)


def test_a_batch_of_users_is_split_per_partition() -> None:
    tags = tuple(range(1, 50))
    batch = Envelope.for_users(tags, "hello", policy="latest")
    parts = list(route(batch))
    assert sorted(t for _, part in parts for t in part.key) == list(tags)  # type: ignore[union-attr]
    for channel, part in parts:
        assert {channel_for("user", t) for t in part.key} == {channel}  # type: ignore[union-attr]
        assert (part.payload, part.policy) == (b"hello", "latest")
    topic = Envelope.for_topic("news", "x")
    assert list(route(topic)) == [(channel_for("topic", "news"), topic)]


def test_the_hubs_topic_ids_carry_the_topic_partition() -> None:
    ids = TopicIds()
    for topic in ("news", "", "a" * 1000, "日本"):
        assert ids(topic) & (PARTITIONS - 1) == topic_partition(topic)
        assert ids(topic) != 0
    assert TopicIds()("news") != ids("news")  # still keyed per gateway


# -- nodes ------------------------------------------------------------------------------------


@pytest.fixture
def start_node(redis_server: RedisServer) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def start(**options: Any) -> Node:
        node = Node(redis_server.url, **options)
        made.append(node)
        return node

    yield start
    for node in made:
        node.stop()


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[Any]:
    import redis

    client = redis.Redis.from_url(redis_server.url)
    yield client
    client.close()


def subscribed(admin: Any) -> set[str]:
    """subscribed: every shard channel of the deployment with a subscriber, as Redis says,
    but the nodes' own answer channels (presence queries: always one per node)."""
    found = admin.execute_command("PUBSUB", "SHARDCHANNELS", PREFIX + "*")
    return {c.decode() for c in found if not c.startswith(ANSWERS)}


def subscribers(admin: Any, channel: str) -> int:
    return int(admin.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


def test_a_node_subscribes_on_a_partitions_first_member_and_leaves_after_its_last(
    start_node: Callable[..., Node], admin: Any
) -> None:
    node = start_node()
    assert subscribed(admin) == {control_channel()}  # no members: only the control channel
    first, second = same_partition_users(2)
    user = channel_for("user", first)
    news, sport = channel_for("topic", "news"), channel_for("topic", "sport")

    one = node.connect(user=first, topics="news")
    wait_until(lambda: subscribed(admin) == {control_channel(), user, news}, "the subscribes")
    two = node.connect(user=second, topics="news,sport")
    wait_until(lambda: sport in subscribed(admin), "the sport partition")
    one.close()  # the user partition still has a member (second), news too
    two.send("keepalive")  # a round trip: node has seen the close
    wait_until(lambda: node.gateway.stats()["connections"] == 1, "the close")
    assert subscribed(admin) == {control_channel(), user, news, sport}
    two.close()
    wait_until(lambda: subscribed(admin) == {control_channel()}, "the grace and leaves")
    assert node.bus.stats.snapshot()["disconnects"] == 0


def test_partition_of_names_where_a_users_messages_travel_for_str_and_int_ids(
    start_node: Callable[..., Node], admin: Any, redis_server: RedisServer
) -> None:
    """What an application hands its clients for sticky placement (docs/scaling.md): the
    Gateway and a Publisher of the deployment agree, and it is the partition whose channel
    the user's node subscribes to."""
    from lowmemws import Publisher

    node = start_node()
    publisher = Publisher(redis_server.url)
    try:
        users: list[int | str] = ["alice", "a.much.longer.name@example.org", 42]
        for user in users:
            assert node.gateway.partition_of(user) == publisher.partition_of(user)
            assert 0 <= node.gateway.partition_of(user) < PARTITIONS
        assert node.gateway.partition_of(42) == user_partition(42)
        with pytest.raises(ValueError):
            node.gateway.partition_of("")
    finally:
        publisher.close()
    for user in ("alice", "a.much.longer.name@example.org"):
        node.connect(user=user)
        channel = user_channel(node.gateway.partition_of(user))
        wait_until(lambda c=channel: c in subscribed(admin), f"{user}'s partition")


def test_a_redis_restart_resubscribes_exactly_the_needed_channels(
    start_node: Callable[..., Node], admin: Any, redis_server: RedisServer
) -> None:
    a, b = start_node(), start_node()
    a.connect(user=1, topics="news")
    b.connect(user=2)
    needed = {control_channel(), channel_for("user", 1), channel_for("user", 2)}
    needed.add(channel_for("topic", "news"))
    wait_until(lambda: subscribed(admin) == needed, "the first subscribes")

    redis_server.kill()
    wait_until(lambda: a.bus.stats.disconnects >= 1, "node a to notice")
    wait_until(lambda: b.bus.stats.disconnects >= 1, "node b to notice")
    redis_server.start()
    wait_until(lambda: subscribed(admin) == needed, "the same subscribes after the restart")
    wait_until(lambda: subscribers(admin, control_channel()) == 2, "both nodes back")
    assert subscribers(admin, channel_for("user", 1)) == 1  # node a only
    got = b.connect(user=3)
    wait_until(lambda: channel_for("user", 3) in subscribed(admin), "user 3's partition")
    a.gateway.send_to_user(3, "after the restart")
    assert got.recv() == "after the restart"


def test_a_restarted_node_subscribes_to_what_its_new_members_need(
    start_node: Callable[..., Node], admin: Any
) -> None:
    a, b = start_node(), start_node()
    a.connect(user=10, topics="old")
    wait_until(lambda: channel_for("topic", "old") in subscribed(admin), "node a's topic")
    a.stop()  # node a goes away: Redis drops its subscriptions with its links
    wait_until(lambda: subscribed(admin) == {control_channel()}, "node a's channels to go")
    again = start_node()
    client = again.connect(user=11, topics="new")
    needed = {control_channel(), channel_for("user", 11), channel_for("topic", "new")}
    wait_until(lambda: subscribed(admin) == needed, "the new node's channels")
    b.gateway.publish("new", "hello")
    assert client.recv() == "hello"


@pytest.fixture(params=["server", "cluster"])
def deployment(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Any]]:
    """deployment is (url, admin client) of a single redis-server or of a 3-master Redis
    Cluster: the cross-node tests run on both."""
    import redis

    if request.param == "server":
        server: RedisServer | RedisCluster = RedisServer(require_redis(), tmp_path)
    else:
        server = RedisCluster(tmp_path)
    server.start()
    admin = (redis.RedisCluster if request.param == "cluster" else redis.Redis).from_url(server.url)
    try:
        yield server.url, admin
    finally:
        admin.close()
        server.kill() if isinstance(server, RedisServer) else server.stop()


def test_three_nodes_with_users_on_several_nodes_get_every_message_once(
    deployment: tuple[str, Any],
) -> None:
    url, admin = deployment
    nodes = [Node(url) for _ in range(3)]
    try:
        three_nodes_exchange(nodes, admin)
    finally:
        for node in nodes:
            node.stop()


def three_nodes_exchange(nodes: list[Node], admin: Any) -> None:
    a, b, c = nodes
    one_a, one_b = a.connect(user=1, topics="news"), b.connect(user=1)
    two_c = c.connect(user=2, topics="news")

    def count(kind: str, key: str | int) -> int:
        return shard_subscribers(admin, channel_for(kind, key))

    wait_until(lambda: count("user", 1) == 2, "user 1's nodes")
    wait_until(lambda: count("topic", "news") == 2, "news's nodes")
    wait_until(lambda: count("user", 2) == 1, "user 2's node")

    c.gateway.send_to_user(1, "to one")
    assert one_a.recv() == one_b.recv() == "to one"
    b.gateway.publish("news", "headline")
    assert one_a.recv() == two_c.recv() == "headline"
    a.gateway.send_to_users([1, 2], "batch")
    assert [one_a.recv(), one_b.recv(), two_c.recv()] == ["batch"] * 3
    b.gateway.broadcast("everyone")
    assert [x.recv() for x in (one_a, one_b, two_c)] == ["everyone"] * 3
    fence = b.connect(user=3)
    wait_until(lambda: count("user", 3) == 1, "user 3's node")
    c.gateway.send_to_user(3, "fence")
    assert fence.recv() == "fence"
    for client in (one_a, one_b, two_c):
        client.settimeout(0.2)
        with pytest.raises(websocket.WebSocketTimeoutException):
            client.recv()  # nothing twice
    assert b.bus.stats.snapshot()["delivered"] >= 3


def test_a_user_message_for_a_user_held_elsewhere_is_dropped_undecoded(
    start_node: Callable[..., Node], admin: Any
) -> None:
    here, there = same_partition_users(2)
    a, b = start_node(), start_node()
    a.connect(user=here)
    on_b = b.connect(user=there)
    wait_until(lambda: subscribers(admin, channel_for("user", there)) == 2, "both nodes")
    a.gateway.send_to_user(there, "for b")  # a holds the partition, not the user
    b.gateway.send_to_user(there, "from b")  # reaches node a through Redis: not held there
    assert {on_b.recv(), on_b.recv()} == {"for b", "from b"}  # two publishers: any order
    wait_until(lambda: a.bus.stats.unserved == 1, "node a to drop it")
    assert a.bus.stats.snapshot()["delivered"] == 1  # its own publish only


def test_a_topic_message_for_a_topic_with_no_member_here_is_dropped_undecoded(
    start_node: Callable[..., Node], admin: Any
) -> None:
    partition = topic_partition("t0")
    twin = next(f"t{n}" for n in range(1, 10**6) if topic_partition(f"t{n}") == partition)
    a, b = start_node(), start_node()
    a.connect(topics="t0")
    on_b = b.connect(topics=twin)
    wait_until(lambda: subscribers(admin, channel_for("topic", twin)) == 2, "both nodes")
    b.gateway.publish(twin, "only for b")  # reaches node a through Redis: no member there
    assert on_b.recv() == "only for b"
    wait_until(lambda: a.bus.stats.unserved == 1, "node a to drop it")
    assert a.bus.stats.snapshot()["delivered"] == 0


def test_a_dead_redis_link_is_noticed_and_replaced(
    start_node: Callable[..., Node], admin: Any, redis_server: RedisServer
) -> None:
    # keepalive + socket_timeout bounds how long a silent dead link goes unnoticed
    node = start_node(keepalive=0.3, socket_timeout=0.5)
    client = node.connect(user=5)
    wait_until(lambda: channel_for("user", 5) in subscribed(admin), "user 5's partition")
    assert redis_server.process is not None
    os.kill(redis_server.process.pid, signal.SIGSTOP)  # links stay open, nothing answers
    try:
        wait_until(lambda: node.bus.stats.disconnects >= 1, "the silent link to be noticed")
    finally:
        os.kill(redis_server.process.pid, signal.SIGCONT)
    wait_until(lambda: node.bus.stats.reconnects >= 1, "the link to be replaced")
    wait_until(lambda: node.bus.wait_ready(0), "the bus to be ready again")
    wait_until(lambda: channel_for("user", 5) in subscribed(admin), "the partition again")
    admin.execute_command("SPUBLISH", channel_for("user", 5), b"N" * 24 + _v1_user(5, b"hi"))
    assert client.recv() == b"hi"


def _v1_user(tag: int, payload: bytes) -> bytes:
    return Envelope.for_user(tag, payload).encode()


# -- the hub's partition counters (no Redis) ---------------------------------------------------


def test_the_hub_counts_members_per_partition_and_signals_only_first_and_last(
    make_gateway: Callable[..., Any],
) -> None:
    gateway = make_gateway()
    gateway.on_connect(Node._accept)
    gateway.start()
    hub = gateway._server
    read_end, write_end = os.pipe2(os.O_NONBLOCK)
    hub.watch_interest(write_end)
    first, second = same_partition_users(2)
    url = f"ws://127.0.0.1:{gateway.port}/"

    def signals() -> int:
        try:
            return len(os.read(read_end, 4096))
        except BlockingIOError:
            return 0

    def held() -> tuple[set[int], set[int]]:
        users, topics = hub.interest()
        bits = [{i for i in range(PARTITIONS) if m[i // 8] >> (i % 8) & 1} for m in (users, topics)]
        return bits[0], bits[1]

    try:
        one = websocket.create_connection(f"{url}?user={first}&topics=news", timeout=DEADLINE)
        assert held() == ({user_partition(first)}, {topic_partition("news")})
        assert signals() == 2  # a user partition and a topic partition gained a member
        two = websocket.create_connection(f"{url}?user={second}&topics=news", timeout=DEADLINE)
        assert signals() == 0  # both partitions had members already
        assert hub.user_held(second) and not hub.user_held(second + 1)
        one.close()
        wait_until(lambda: not hub.user_held(first), "the first close")
        assert signals() == 0 and held() == ({user_partition(second)}, {topic_partition("news")})
        two.close()
        wait_until(lambda: held() == (set(), set()), "the last close")
        assert signals() == 2
    finally:
        hub.watch_interest(-1)
        os.close(read_end)
        os.close(write_end)
