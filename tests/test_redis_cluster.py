"""RedisBus on a real Redis Cluster (issue 15): a master failover and a slot migration.

Three masters with a replica each (tests/support/redis_cluster.py). Nodes are gateways in
this process with a RedisBus given one node's address; the bus learns the cluster, keeps one
subscriber link per shard and, when a shard gives a channel up (its slot moved, or the
master became a replica), rebuilds its links from the new slot map. What a user sees: the
messages published after that reach it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lowmemws._routing import channel_for
from tests.support import waiting
from tests.support.gateway_nodes import DEADLINE, Node, shard_subscribers
from tests.support.redis_cluster import RedisCluster

wait_until = waiting.waiter(DEADLINE, interval=0.05)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[RedisCluster]:
    server = RedisCluster(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nodes(cluster: RedisCluster) -> Iterator[list[Node]]:
    made = [Node(cluster.url), Node(cluster.url)]
    yield made
    for node in made:
        node.stop()


def admin(cluster: RedisCluster) -> Any:
    """admin is a fresh cluster client: it reads the slot map as it is now."""
    import redis

    return redis.RedisCluster.from_url(cluster.url)


def subscribers_now(cluster: RedisCluster, channel: str) -> int:
    client = admin(cluster)
    try:
        return shard_subscribers(client, channel)
    finally:
        client.close()


def owner_port(cluster: RedisCluster, channel: str) -> int:
    client = admin(cluster)
    try:
        return int(client.get_node_from_key(channel).port)
    finally:
        client.close()


def delivered_after_change(sender: Node, user: int, client: Any, text: str) -> None:
    """Publish until the client gets it: the subscriber's rebuild takes a moment, and a
    message published before it is lost (pub/sub keeps no history)."""
    client.settimeout(0.3)
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        sender.gateway.send_to_user(user, text)
        try:
            assert client.recv() == text
            return
        except Exception as exc:  # websocket timeout: not there yet
            if "timed out" not in str(exc):
                raise
    raise AssertionError(f"{text!r} never arrived")


def fail_over(cluster: RedisCluster, replica: int, channel: str) -> None:
    """fail_over makes replica the master of channel's slot with CLUSTER FAILOVER, asked
    again when a manual failover times out (5 s in Redis) on a busy machine."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        assert cluster.cli_call(replica, "CLUSTER", "FAILOVER").strip() == "OK"
        attempt_ends = time.monotonic() + 6
        while time.monotonic() < attempt_ends:
            if owner_port(cluster, channel) == replica:
                return
            time.sleep(0.1)
    raise AssertionError(f"{replica} never took over")


def test_the_bus_keeps_delivering_after_a_master_failover(
    cluster: RedisCluster, nodes: list[Node]
) -> None:
    a, b = nodes
    client = b.connect(user=1)
    channel = channel_for("user", 1)
    wait_until(lambda: subscribers_now(cluster, channel) == 1, "b's subscribe")
    a.gateway.send_to_user(1, "before")
    assert client.recv() == "before"

    old = owner_port(cluster, channel)
    replica = cluster.replica_of(old)
    fail_over(cluster, replica, channel)
    # b's links rebuild from the slot map it reads then: on the new master, or still on the
    # old one, now a replica of it, which sharded pub/sub also delivers from
    delivered_after_change(a, 1, client, "after the failover")
    assert b.bus.stats.snapshot()["reconnects"] >= 1  # the old master let go: rebuilt


def test_the_bus_keeps_delivering_after_a_slot_migration(
    cluster: RedisCluster, nodes: list[Node]
) -> None:
    a, b = nodes
    client = b.connect(user=1)
    channel = channel_for("user", 1)
    wait_until(lambda: subscribers_now(cluster, channel) == 1, "b's subscribe")
    probe = admin(cluster)
    slot = str(probe.keyslot(channel))
    probe.close()
    source = owner_port(cluster, channel)
    target = next(port for port in cluster.masters() if port != source)
    source_id = cluster.cli_call(source, "CLUSTER", "MYID").strip()
    target_id = cluster.cli_call(target, "CLUSTER", "MYID").strip()
    # the slot holds no keys (channels are not keys): importing, migrating, then owned
    cluster.cli_call(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    cluster.cli_call(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    for port in cluster.masters():
        cluster.cli_call(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    wait_until(lambda: owner_port(cluster, channel) == target, "the slot's new owner")
    delivered_after_change(a, 1, client, "after the migration")
    wait_until(lambda: subscribers_now(cluster, channel) == 1, "b on the new owner")


def test_a_whole_cluster_outage_keeps_local_traffic_then_flushes_in_order(
    cluster: RedisCluster, nodes: list[Node]
) -> None:
    a, b = nodes
    on_a, on_b = a.connect(user=1, topics="t"), b.connect(user=2, topics="t")
    for channel in (channel_for("topic", "t"), channel_for("user", 2)):
        wait_until(lambda ch=channel: subscribers_now(cluster, ch) >= 1, "the subscribes")  # type: ignore[misc]
    wait_until(lambda: subscribers_now(cluster, channel_for("topic", "t")) == 2, "both on t")
    a.gateway.publish("t", "before")
    assert on_a.recv() == on_b.recv() == "before"

    cluster.kill()
    wait_until(lambda: b.bus.stats.disconnects >= 1, "node b to notice the outage")
    during = [f"during {n}" for n in range(5)]
    for text in during:
        a.gateway.publish("t", text)
        assert on_a.recv() == text  # local delivery goes on
    a.gateway.send_to_user(2, "to two")

    cluster.restart()
    assert [on_b.recv() for _ in during] == during  # buffered, in order, each once
    assert on_b.recv() == "to two"
    a.gateway.publish("t", "after")
    assert on_a.recv() == on_b.recv() == "after"
    wait_until(lambda: a.bus.stats.snapshot()["buffered"] == 0, "node a's buffer to empty")
