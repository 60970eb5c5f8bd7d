"""Gateways in this process, each with its own RedisBus: the nodes of the routing tests."""

from __future__ import annotations

from typing import Any

import websocket

from lowmemws import Accept, Gateway, RedisBus
from lowmemws._routing import PARTITIONS, user_partition

DEADLINE = 20.0  # bounds every wait; not a performance figure
GRACE = 0.2  # unsubscribe grace of the nodes here: short, so the tests see leaves


class Node:
    """Node is a gateway in this process with its own RedisBus; clients pick their user
    and topics in the query string (``?user=7&topics=a,b``)."""

    def __init__(self, url: str, **options: Any) -> None:
        options.setdefault("unsubscribe_grace", GRACE)
        options.setdefault("backoff_cap", 0.3)
        self.bus = RedisBus(url, **options)
        self.gateway = Gateway("127.0.0.1", 0, bus=self.bus)
        self.gateway.on_connect(self._accept)
        self.gateway.start()
        assert self.bus.wait_ready(DEADLINE)
        self.clients: list[websocket.WebSocket] = []

    @staticmethod
    def _accept(request: Any) -> Accept:
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        user = request.params.get("user", "0")
        return Accept(user=int(user) if user.isdigit() else user, topics=topics)  # int or str

    def connect(self, user: int | str = 0, topics: str = "") -> websocket.WebSocket:
        url = f"ws://127.0.0.1:{self.gateway.port}/?user={user}&topics={topics}"
        client = websocket.create_connection(url, timeout=DEADLINE)
        self.clients.append(client)
        return client

    def stop(self) -> None:
        for client in self.clients:
            client.close()
        self.gateway.stop(timeout=10)


def same_partition_users(count: int) -> list[int]:
    """same_partition_users: count user tags that share one partition."""
    by_partition: dict[int, list[int]] = {}
    for tag in range(1, 100 * PARTITIONS):
        found = by_partition.setdefault(user_partition(tag), [])
        found.append(tag)
        if len(found) == count:
            return found
    raise AssertionError("no partition with enough users")  # pragma: no cover


def shard_subscribers(admin: Any, channel: str) -> int:
    """shard_subscribers asks the shard that owns channel how many links subscribe to it;
    admin is a redis-py client for one server or for a cluster."""
    if hasattr(admin, "get_node_from_key"):
        node = admin.get_node_from_key(channel)
        reply = admin.execute_command("PUBSUB", "SHARDNUMSUB", channel, target_nodes=node)
    else:
        reply = admin.execute_command("PUBSUB", "SHARDNUMSUB", channel)
    if isinstance(reply, dict):
        return int(reply.get(channel.encode(), reply.get(channel)) or 0)
    return int(reply[1])
