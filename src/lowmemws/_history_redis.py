"""History in Redis Streams: store before publish, in one script, for RedisBus and publishers.

Theory of operation (issue 12). Each stream has two keys: ``<prefix>{<tag>}:<stream>:s``, a
Redis Stream of the kept messages (entry id ``<offset>-0``, field ``d`` the stored entry),
and ``<prefix>{<tag>}:<stream>:m``, a hash of the stream's ``epoch`` and last ``offset``.
Their hash tag is the one of the stream's partition channel (`lowmemws._routing`: ``t:<n>``
for a topic of partition n, ``u:<n>`` for a user), so in a Redis Cluster both keys and the
channel live in one slot and one script may write the keys and SPUBLISH on the channel (a
script may only touch its own slot). The price: a partition's streams share a slot, as its
messages already share a shard; 4096 partitions per kind spread them over the cluster.
`store_and_publish` runs `STORE_SCRIPT`, which in one atomic step takes the next offset (a
new random epoch when the hash is gone: Redis flushed, restarted without persistence, or the
stream expired), appends the entry with XADD MAXLEN, renews both keys' expiry, and PUBLISHes
the envelope with its position on the stream's partition channel. So no node ever sees a
position before it is stored, and every node sees a stream's messages in offset order. When
Redis cannot be reached the script does not run: the caller gets the error (never a silent
loss).

The kept messages expire ``ttl`` seconds after a stream's last message (Redis Streams have
no per-entry expiry); the position hash lives `_META_TTL_FACTOR` times longer, so a client
whose position is still current resumes even after its stream's messages expired.

Anything that publishes into a deployment (a gateway's RedisBus, a backend publisher) calls
`store_and_publish`; the channel comes from the routing function (`stream_channel`), the
same one a plain envelope of the stream travels on, so a node subscribed to the partition
gets both.
"""

from __future__ import annotations

import functools
import struct
from typing import Any

from ._bus_base import Envelope
from ._history import History, ReadResult, new_epoch, stored_entry
from ._routing import CHANNEL_PREFIX, channel_for

__all__ = [
    "MARKER_ORIGIN",
    "READ_SCRIPT",
    "STORED_ORIGIN",
    "STORE_SCRIPT",
    "parse_marker",
    "read_history",
    "read_marker",
    "read_position",
    "store_and_publish",
    "stream_channel",
    "stream_keys",
]

#: STORED_ORIGIN is the origin id of a stored envelope on the bus channel: every node
#: delivers it (the publishing node too, in Redis's order), without the sequence check of
#: the buffered path.
STORED_ORIGIN = bytes(16)
_HEADER = struct.Struct(">16sQ")  # the bus's message header: origin node id, sequence
_META_TTL_FACTOR = 10

#: STORE_SCRIPT: KEYS stream, meta; ARGV channel, header, envelope (unpositioned wire form),
#: entry, maxlen, ttl, meta ttl, fresh epoch, publish command. Returns {epoch, offset}.
STORE_SCRIPT = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[8]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[5], offset .. '-0', 'd', ARGV[4])
redis.call('EXPIRE', KEYS[1], ARGV[6])
redis.call('EXPIRE', KEYS[2], ARGV[7])
local position = epoch .. ':' .. offset
redis.call(ARGV[9], ARGV[1], ARGV[2] .. string.char(3, #position) .. position .. ARGV[3])
return {epoch, offset}
"""

#: MARKER_ORIGIN is the origin id of a read marker on the bus channel (see read_history).
MARKER_ORIGIN = b"\xff" * 16

#: READ_SCRIPT: KEYS stream, meta; ARGV first offset wanted, count, channel, marker,
#: publish command. Returns {epoch, last, first kept, entries} ({"", 0, 1, {}} for an
#: unknown stream) and publishes the marker in the same step.
READ_SCRIPT = """
redis.call(ARGV[5], ARGV[3], ARGV[4])
local meta = redis.call('HMGET', KEYS[2], 'epoch', 'offset')
if not meta[1] then return {'', 0, 1, {}} end
local last = tonumber(meta[2])
local first = last + 1
local oldest = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)
if #oldest > 0 then first = tonumber(string.match(oldest[1][1], '^(%d+)')) end
local entries = redis.call('XRANGE', KEYS[1], ARGV[1] .. '-0', '+', 'COUNT', ARGV[2])
return {meta[1], last, first, entries}
"""


@functools.lru_cache(maxsize=64)
def _scripts(client: Any) -> tuple[Any, Any]:
    """The two scripts registered with client (EVALSHA, loaded on first use), made once."""
    return client.register_script(STORE_SCRIPT), client.register_script(READ_SCRIPT)


def stream_channel(stream: str, prefix: str = CHANNEL_PREFIX) -> str:
    """stream_channel is the channel stream's messages travel on ("t:<topic>": its topic
    partition's, "u:<user tag>": its user partition's), as `lowmemws._routing.channel_for`.

    Raises:
        ValueError: not a stream name.
    """
    if stream.startswith("t:"):
        return channel_for("topic", stream[2:], prefix)
    if stream.startswith("u:") and stream[2:].isdigit():
        return channel_for("user", int(stream[2:]), prefix)
    raise ValueError(f"not a stream name: {stream!r}")


def stream_keys(prefix: str, stream: str) -> tuple[str, str]:
    """stream_keys are the Redis keys of stream (its messages, its position), hash-tagged
    like its partition channel: both keys and the channel are in one Redis Cluster slot."""
    tag = stream_channel(stream, prefix)[len(prefix) :]  # "{t:17}"
    return f"{prefix}{tag}:{stream}:s", f"{prefix}{tag}:{stream}:m"


def store_and_publish(
    client: Any,
    envelope: Envelope,
    history: History,
    *,
    prefix: str = CHANNEL_PREFIX,
    sharded: bool = False,
) -> Envelope:
    """store_and_publish appends envelope to its stream's history and publishes it on the
    stream's partition channel, atomically (STORE_SCRIPT); returns the envelope with its
    position.

    client is a redis-py client (a cluster client too); every node subscribed to the
    channel delivers the envelope. ``prefix`` is the bus's ``channel_prefix``; ``sharded``
    publishes with SPUBLISH (as the bus does on Redis >= 7).

    Raises:
        ValueError: the envelope has no stream (a broadcast, a batch of users).
        redis.RedisError, OSError: Redis could not be reached: nothing was stored or sent.
    """
    stream = envelope.stream
    if stream is None:
        raise ValueError("store_and_publish: only a topic or user message is stored")
    ttl = max(1, int(history.ttl_for(stream)))
    keys = stream_keys(prefix, stream)
    args = (
        stream_channel(stream, prefix), _HEADER.pack(STORED_ORIGIN, 0), envelope.encode(),
        stored_entry(envelope),
        history.size_for(stream), ttl, ttl * _META_TTL_FACTOR, new_epoch(),
        "SPUBLISH" if sharded else "PUBLISH",
    )  # fmt: skip
    epoch, offset = _scripts(client)[0](keys=keys, args=args)
    return envelope.with_position(_text(epoch), int(offset))


def read_marker(node_id: bytes, request_id: int) -> bytes:
    """read_marker is the bus message a node's history read publishes: whoever is not
    node_id ignores it; node_id's subscriber, meeting it, has delivered every message
    stored before the read (Redis runs the script and the PUBLISHes in one order)."""
    return _HEADER.pack(MARKER_ORIGIN, 0) + node_id + struct.pack(">Q", request_id)


def parse_marker(message: bytes) -> tuple[bytes, int] | None:
    """parse_marker returns (node id, request id) of a read marker, None for another message."""
    if len(message) != _HEADER.size + 24 or message[:16] != MARKER_ORIGIN:
        return None
    body = message[_HEADER.size :]
    return body[:16], int(struct.unpack(">Q", body[16:])[0])


def read_history(
    client: Any,
    stream: str,
    after: int,
    max_count: int,
    max_bytes: int,
    *,
    prefix: str = CHANNEL_PREFIX,
    channel: str,
    marker: bytes,
    sharded: bool = False,
) -> ReadResult:
    """read_history returns the kept messages of stream after offset ``after`` and publishes
    marker on channel, in one step (READ_SCRIPT).

    Raises:
        redis.RedisError, OSError: Redis could not be reached.
    """
    keys = stream_keys(prefix, stream)
    command = "SPUBLISH" if sharded else "PUBLISH"
    epoch, last, first, rows = _scripts(client)[1](
        keys=keys, args=(str(after + 1), max_count + 1, channel, marker, command)
    )
    result = ReadResult(_text(epoch), int(last), int(first))
    size = 0
    for entry_id, fields in rows:
        entry = _field(fields, b"d")
        if len(result.entries) >= max_count or size + len(entry) > max_bytes:
            result.truncated = True
            break
        result.entries.append((int(_text(entry_id).split("-")[0]), entry))
        size += len(entry)
    return result


def read_position(client: Any, stream: str, *, prefix: str = CHANNEL_PREFIX) -> tuple[str, int]:
    """read_position is where stream's history stands: (epoch, last offset), ("", 0) for a
    stream with no history (yet, or lost). One read of the position hash: no marker, no
    subscription (a process that holds no connections reads it so).

    Raises:
        redis.RedisError, OSError: Redis could not be reached.
    """
    epoch, offset = client.hmget(stream_keys(prefix, stream)[1], "epoch", "offset")
    if epoch is None:
        return "", 0
    return _text(epoch), int(offset)


def _text(value: bytes | str) -> str:
    return value.decode("ascii") if isinstance(value, bytes) else value


def _field(fields: list[Any], name: bytes) -> bytes:
    for index in range(0, len(fields) - 1, 2):
        if fields[index] in (name, name.decode()):
            value = fields[index + 1]
            return value if isinstance(value, bytes) else str(value).encode()
    return b""
