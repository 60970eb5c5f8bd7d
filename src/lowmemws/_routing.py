"""Interest routing (issue 15): which Redis channel carries an envelope, and why.

Theory of operation. A deployment's messages travel on ``2 * PARTITIONS + 1`` channels: one
per user partition, one per topic partition, and one control channel for what every node
must see (broadcasts, cancels of paced sends, control envelopes). A node subscribes to the
partition channels where it has local members (the C hub counts them, `lmw_interest`), so
it receives the messages it delivers and, when users are placed by partition, almost
nothing else. Correctness never depends on placement: a user connected on several nodes
makes each of them subscribe to its partition.

Channel names carry a Redis Cluster hash tag (``{u:17}``), so each channel lives on the
shard that owns its slot and sharded pub/sub (SPUBLISH/SSUBSCRIBE) keeps the traffic there.

Why ``PARTITIONS`` = 4096 (LMW_PARTITIONS in lmw.h, the one definition):
- enough to spread the channels evenly over a cluster's shards (4096 distinct hash tags
  over 16384 slots; a shard of a 100-shard cluster gets about 41 of each kind) and to give
  each of hundreds of nodes its own slice when the load balancer places by partition;
- few enough that a node holding members in every partition (random placement, many users)
  holds 8193 subscriptions, a few hundred KB on the Redis side, and that the hub's counters
  are two arrays of 16 KB per process (never per connection).

Ordering: one publisher's envelopes keep their order on each channel. On one redis-server
they keep it across channels too (one subscriber link); in a cluster only per channel.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

from ._bus_base import Envelope, Kind
from ._native import lib

__all__ = [
    "CHANNEL_PREFIX",
    "Interest",
    "PARTITIONS",
    "channel_for",
    "control_channel",
    "route",
    "topic_partition",
    "user_partition",
    "wanted_channels",
]

#: PARTITIONS is the number of routing partitions of users, and of topics (LMW_PARTITIONS).
PARTITIONS: int = lib.LMW_PARTITIONS
#: CHANNEL_PREFIX is the default start of every channel name of a deployment.
CHANNEL_PREFIX = "lowmemws:"

_PARTITION_MASK = PARTITIONS - 1


def user_partition(user_tag: int) -> int:
    """user_partition is the routing partition (0..PARTITIONS-1) of a 64-bit user tag,
    the same on every node (computed in C: lmw_user_partition).

    Raises:
        OverflowError: user_tag outside 0..2**64-1.
    """
    return int(lib.lmw_user_partition(user_tag))


def topic_partition(topic: str) -> int:
    """topic_partition is the routing partition (0..PARTITIONS-1) of a topic name: an
    unkeyed BLAKE2b hash, the same on every node (the hub's keyed topic ids keep it in
    their low bits)."""
    digest = hashlib.blake2b(topic.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & _PARTITION_MASK


def user_channel(partition: int, prefix: str = CHANNEL_PREFIX) -> str:
    """user_channel is the channel of user partition ``partition``."""
    return f"{prefix}{{u:{partition}}}"


def topic_channel(partition: int, prefix: str = CHANNEL_PREFIX) -> str:
    """topic_channel is the channel of topic partition ``partition``."""
    return f"{prefix}{{t:{partition}}}"


def control_channel(prefix: str = CHANNEL_PREFIX) -> str:
    """control_channel is the one channel every node subscribes to: broadcasts, cancels,
    control envelopes."""
    return prefix + "bus"


def channel_for(
    kind: Kind | str, key: str | int | None = None, prefix: str = CHANNEL_PREFIX
) -> str:
    """channel_for is THE mapping from what a message is addressed to, to its Redis channel.

    ``kind`` "topic" with ``key`` the topic name; "user" with ``key`` the 64-bit user tag;
    any other kind ("broadcast", "cancel", a control kind) goes on the control channel and
    ``key`` is ignored. ``prefix`` is the bus's ``channel_prefix``. A batch of users
    ("users") spans several channels: use `route`.

    Raises:
        ValueError: a topic key that is not a str, a user key that is not an int.
    """
    if kind == "topic":
        if not isinstance(key, str):
            raise ValueError("channel_for: a topic key is the topic name (str)")
        return topic_channel(topic_partition(key), prefix)
    if kind == "user":
        if not isinstance(key, int) or isinstance(key, bool):
            raise ValueError("channel_for: a user key is the 64-bit user tag (int)")
        return user_channel(user_partition(key), prefix)
    if kind == "users":
        raise ValueError("channel_for: a batch of users spans channels; use route()")
    return control_channel(prefix)


def route(envelope: Envelope, prefix: str = CHANNEL_PREFIX) -> Iterator[tuple[str, Envelope]]:
    """route yields (channel, envelope) for every channel ``envelope`` must be published on:
    one, except a batch of users ("users"), split into one envelope per user partition (each
    keeps the batch's payload, policy and pacing)."""
    if envelope.kind != "users":
        yield channel_for(envelope.kind, envelope.key, prefix), envelope  # type: ignore[arg-type]
        return
    assert isinstance(envelope.key, tuple)
    by_partition: dict[int, list[int]] = {}
    for tag in envelope.key:
        by_partition.setdefault(user_partition(tag), []).append(tag)
    for partition, tags in by_partition.items():
        part = Envelope(
            "users", tuple(tags), envelope.opcode, envelope.payload, envelope.policy,
            envelope.spread, envelope.rate, envelope.nodes, envelope.pace_id,
        )  # fmt: skip
        yield user_channel(partition, prefix), part


class Interest(Protocol):
    """Interest is what a bus asks a node's hub (`lowmemws._c_server.CServer` is one): which
    partitions have local members, and whether one user or topic does."""

    def watch_interest(self, fd: int) -> None:
        """watch_interest: write a byte to fd when a partition gains or loses all members."""

    def interest(self) -> tuple[bytes, bytes]:
        """interest: (user partitions, topic partitions) bitmaps of PARTITIONS bits each."""

    def user_held(self, user: int) -> bool:
        """user_held: a connection tagged user is open here."""

    def topic_held(self, topic: str) -> bool:
        """topic_held: topic has a member here."""


def wanted_channels(interest: Interest | None, prefix: str = CHANNEL_PREFIX) -> set[str]:
    """wanted_channels is the set of channels a node with this interest subscribes to: the
    control channel and its partitions' channels; every channel without an interest (a bus
    started without a hub receives everything, as before issue 15)."""
    wanted = {control_channel(prefix)}
    if interest is None:
        every = range(PARTITIONS)
        wanted.update(user_channel(p, prefix) for p in every)
        wanted.update(topic_channel(p, prefix) for p in every)
        return wanted
    users, topics = interest.interest()
    wanted.update(user_channel(p, prefix) for p in _set_bits(users))
    wanted.update(topic_channel(p, prefix) for p in _set_bits(topics))
    return wanted


def _set_bits(bitmap: bytes) -> Iterator[int]:
    for index, byte in enumerate(bitmap):
        while byte:
            low = byte & -byte
            yield index * 8 + low.bit_length() - 1
            byte ^= low
