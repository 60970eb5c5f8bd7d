"""RedisBus: gateways on several machines share topics and users through a redis-server.

Theory of operation. Envelopes travel on partitioned channels (`lowmemws._routing`): a
topic's on its topic partition's channel, a user's on its user partition's channel, a batch
of users split per partition, and broadcasts and cancels on one control channel
(``channel_prefix + "bus"``). A node subscribes to the control channel and to the partition
channels where its hub has local members (`follow`; the hub tells through a pipe when a
partition gains its first member or loses its last), so it receives what it delivers and,
when users are placed by partition, little else. A partition left empty is unsubscribed
after ``unsubscribe_grace`` seconds, so churn does not thrash. A bus that follows no hub
subscribes to every channel. Sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7.0) is used
when the server's version has it: in a cluster it keeps each channel's traffic on the shard
that owns it; elsewhere plain PUBLISH/SUBSCRIBE.

Each message on a channel is ``origin node id (16 bytes) + sequence number (8 bytes) +
Envelope.encode()``; a publisher numbers each channel on its own. A node delivers its own
envelopes locally inside ``publish`` and skips them when Redis echoes them back, so no node
gets an envelope twice. The sequence numbers let a receiver skip an envelope that a
publisher re-sent after a broken connection (``duplicates``) and count the envelopes of
another node that it never saw on a channel it stayed subscribed to (``missed``). A user
envelope for a user with no connection here (its partition is subscribed for another
user, or a topic envelope for a topic with no member here, is dropped before it is decoded
(``unserved``). The subscriber thread waits, reads whole chunks of the sockets and runs a
C filter (`lowmemws._bus_filter`) that frames them and makes the per-message checks (echo,
sequence, user held here), all in C with the GIL released on plain sockets: Python wakes
only for what it delivers, so a dropped message costs no Python; topics are checked in
Python (their ids are keyed in Python).

History (issue 12, `enable_history`): a topic or user message is stored and published in
one script (`lowmemws._history_redis`) on its partition channel, with origin
``STORED_ORIGIN``; every node delivers it from the channel, the publisher too, in Redis's
order. A resume reads a stream and publishes a marker on the same channel in one script;
the read is complete once the marker comes back. The resumed connection joins the stream
only after that, so it may not count as a member yet: the read holds the partition
channel (subscribed and confirmed by Redis before the script runs) and lets go of it
afterwards; the channel then leaves after the unsubscribe grace unless the joined
connection made the hub want it, as it normally does. A connection that joins a stream at
once (no position to resume from) is answered its 101 only once its node receives the
stream (`when_subscribed` holds the partition channel until Redis confirmed it), so nothing
stored after the 101 passes it by. `history_position` reads where a stream stands without
a marker (what `Gateway.positions` and `lowmemws.Publisher.positions` need).

Presence queries (issue 12, `lowmemws._presence`) travel on the control channel; each node
answers on the asker's own channel ``channel_prefix + "answers:" + node id (hex)``, which every
node (and every `lowmemws.Publisher`, which subscribes to nothing else) listens to. The asker
waits for as many answers as Redis reported receivers for the query's PUBLISH.

Threads: ``publish`` only queues (and delivers locally), in the caller's thread; a writer
thread sends the queue in pipelined batches; a subscriber thread receives and calls deliver.

Idle cost and liveness: neither thread polls. The writer sleeps until there is something
to send or ``keepalive`` seconds have passed, then asks the control channel's subscriber
count (a keepalive that Redis's ``timeout`` needs when it is set above ``keepalive``, and the
peer count); the subscriber thread sleeps in poll and PINGs after ``keepalive`` seconds of
silence. A dead link is noticed at once when the connection closes, else within
``keepalive + socket_timeout`` seconds (the subscriber's PONG deadline, the writer's reply
timeout).

During a Redis outage (server down, network cut):
- local delivery is unaffected: ``publish`` still delivers to this node at once;
- publishes are kept in a bounded buffer (``max_buffered`` envelopes, ``max_buffered_bytes``);
  when it is full ``publish`` raises BusUnavailable and delivers nothing, not even locally,
  so a retry never duplicates (``refused`` counts it);
- both links reconnect by themselves with exponential backoff and jitter (``backoff_base``
  doubling up to ``backoff_cap``), counted in ``disconnects`` and ``reconnects``; the
  subscriber subscribes again to exactly the channels its hub needs then;
- after reconnecting, the writer waits up to ``flush_grace`` seconds for as many subscribers
  as the control channel had before (the other nodes resubscribing; each subscribes its
  control channel after its partitions, so on one Redis server a node counted there holds
  its partitions again; on a cluster each shard answers for itself), then sends the buffer
  in order;
- envelopes that other nodes got into Redis while THIS node's subscription was down are not
  received: pub/sub keeps no history. They are counted in ``missed`` once a later envelope of
  the same node arrives on the same channel. The grace wait above makes that rare when the
  server restarts, not impossible (a node that needs longer than the grace to come back
  misses the flush).
- an envelope still buffered when ``close`` gives up is counted in ``dropped``.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._bus_base import (
    QUERY_KINDS,
    BusBase,
    Deliver,
    Envelope,
    Query,
    ReadWaiter,
    answer_envelope,
    log,
)
from ._bus_filter import BusFilter
from ._history import History, ReadResult
from ._history_redis import (
    MARKER_ORIGIN,
    STORED_ORIGIN,
    parse_marker,
    read_history,
    read_marker,
    read_position,
    store_and_publish,
    stream_channel,
)
from ._native import ffi, lib
from ._redis_link import SubscriberLink, wait_links
from ._routing import CHANNEL_PREFIX, Interest, control_channel, route, wanted_channels
from ._user_ids import deployment_key
from .errors import BusUnavailable

__all__ = ["RedisBus"]

_MiB = 1024 * 1024
_HEADER = struct.Struct(">16sQ")  # origin node id, sequence number
_SEQ = struct.Struct(">Q")
_BATCH_MESSAGES = 512
_BATCH_BYTES = _MiB
_WIRE_V1: int = lib.LMW_ENVELOPE_V1  # the unpaced wire version: the only one peeked at
_KIND_MASK: int = lib.LMW_ENVELOPE_KIND_MASK  # a version 1 envelope's kind bits (byte 2)
_KIND_TOPIC = 0  # Envelope's "topic" kind index
_KIND_USER: int = lib.LMW_ENVELOPE_USER  # Envelope's "user" kind index
_USER_TAG = struct.Struct(">Q")
_TOPIC_LEN = struct.Struct(">H")
_KEY_AT = _HEADER.size + 3  # the key follows the 3 header bytes of a version 1 envelope


def _options_for(url: str, options: dict[str, Any]) -> dict[str, Any]:
    """_options_for: the client options a URL's connection class accepts. A ``unix://``
    URL's connection refuses ``socket_keepalive`` (TCP keepalive means nothing on a local
    socket; the links' own PINGs still check liveness)."""
    if url.startswith("unix://"):
        return {name: value for name, value in options.items() if name != "socket_keepalive"}
    return options


class RedisBus(BusBase):
    """RedisBus carries envelopes between nodes through a redis-server at ``url``
    (``redis://``, ``rediss://`` for TLS, or ``unix://`` for a local socket).

    Create it in the process that uses it (after any fork: its threads and sockets do not
    survive one), then ``start(deliver)``. ``wait_ready(timeout)`` tells when both links are
    up and subscribed. ``sharded`` forces SPUBLISH (True) or PUBLISH (False); None asks the
    server's version; ``cluster`` uses a Redis Cluster client (True) or a single-server one
    (False); None asks the server (``INFO cluster``). ``keepalive`` is the longest silence
    on a link before it is checked; ``unsubscribe_grace`` how long an empty partition stays
    subscribed. See the module docstring for routing, liveness and what happens during an
    outage.

    ``user_key``: a secret shared by every node and `lowmemws.Publisher` of the deployment,
    from which (with ``channel_prefix``) they all derive the same key for str user ids
    (without it the key is derived from the prefix alone: see docs/presence.md).
    ``block_timeout``: how long publish may wait for room in a full buffer before it raises
    BusUnavailable (0, the default for a gateway: raise at once, never stall the caller;
    `lowmemws.Publisher` waits, so a tight loop is slowed down to Redis's pace instead).

    Raises:
        ImportError: redis-py is not installed (``pip install 'lowmemws[redis]'``).
        ValueError: keepalive or unsubscribe_grace not > 0.
    """

    may_block = False  # publish queues for the network and fans out here: no wait
    read_settles = True  # a read's marker follows every message stored before it

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = CHANNEL_PREFIX,
        max_buffered: int = 10000,
        max_buffered_bytes: int = 16 * _MiB,
        sharded: bool | None = None,
        cluster: bool | None = None,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        flush_grace: float = 6.0,
        socket_timeout: float = 5.0,
        keepalive: float = 15.0,
        unsubscribe_grace: float = 5.0,
        user_key: bytes | str | None = None,
        block_timeout: float = 0.0,
    ) -> None:
        super().__init__()
        try:
            import redis
            from redis.backoff import NoBackoff
            from redis.retry import Retry
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise ImportError("RedisBus needs redis-py: pip install 'lowmemws[redis]'") from exc
        if not (keepalive > 0 and unsubscribe_grace > 0):
            raise ValueError("RedisBus: keepalive and unsubscribe_grace must be > 0")
        self._redis: Any = redis
        self._client_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "socket_keepalive": True,
            "retry": Retry(NoBackoff(), 0),
        }
        # a cluster client raises RedisClusterException (not a RedisError) when no node answers
        self._errors: tuple[type[BaseException], ...] = (
            redis.RedisError,
            redis.exceptions.RedisClusterException,
            OSError,
        )
        self._url = url
        self._prefix = channel_prefix
        #: channel is the control channel: broadcasts, cancels; every node subscribes to it.
        self.channel = control_channel(channel_prefix)
        self._answers_prefix = channel_prefix + "answers:"
        #: user_key is the key of str user ids, the same on every node of the deployment.
        self.user_key = deployment_key(channel_prefix, user_key)
        self._block_timeout = block_timeout
        self._query_seqs: dict[int, int] = {}  # control channel seq of a query -> query id
        self._answer_client: Any = None
        self._answer_lock = threading.Lock()
        self._data_subscriber = True
        #: node_id identifies this node's envelopes on the channels.
        self.node_id = os.urandom(16)
        self._max_buffered = max_buffered
        self._max_bytes = max_buffered_bytes
        self._sharded = sharded
        self._cluster = cluster
        self._backoff = (backoff_base, backoff_cap)
        self._flush_grace = flush_grace
        self._socket_timeout = socket_timeout
        self._keepalive = keepalive
        self._unsubscribe_grace = unsubscribe_grace
        self._queue: deque[tuple[str, bytes]] = deque()
        self._queued_bytes = 0
        self._seq: dict[str, int] = {}
        self._cond = threading.Condition()
        self._mode_lock = threading.Lock()
        self._closing = threading.Event()
        self._pub_ready = threading.Event()
        self._sub_ready = threading.Event()
        self._peers = 0
        self._receivers: dict[str, int] = {}  # subscribers a channel had at its last publish
        self._unserved_count = 0  # undecoded drops not yet added to stats.unserved
        self._filter: BusFilter | None = None  # made with the node id (start)
        self._users_in_c = False  # the filter checks users (it has the hub's lmw_server)
        self._threads: list[threading.Thread] = []
        self._interest: Interest | None = None
        self._answers = b""  # this node's answer channel, set when it starts
        self._wake_r = self._wake_w = -1
        self._links: dict[str, SubscriberLink] = {}  # by shard; "server" on one server
        self._unready: set[str] = set()  # links whose subscribes are not all answered yet
        self._leaving: dict[str, float] = {}  # channel -> when it is unsubscribed
        self._history: History | None = None
        self._history_client: Any = None
        self._reads: dict[int, ReadWaiter] = {}  # history reads waiting for their marker
        self._read_ids = itertools.count(1)
        self._read_timeout = socket_timeout
        self._resync_due = False  # the subscriber reconnected: tell on_resync once ready
        #: channels a history read needs subscribed (see _hold), with how many reads hold
        #: each; the subscriber thread adds them to what the hub wants
        self._holds: dict[str, int] = {}
        self._confirmed: set[str] = set()  # channels whose subscribe Redis answered
        self._sending: dict[str, set[str]] = {}  # link -> channels sent, not answered yet
        self._confirm = threading.Condition()
        #: (channels held, ready) of `when_subscribed` calls not answered yet
        self._subscribe_waiters: list[tuple[frozenset[str], Callable[[], None]]] = []
        #: on_resync, if set, is called (on the subscriber thread) when the subscribing link
        #: is back after an outage: stored messages published meanwhile were not delivered
        #: here. The Gateway sets it to ask its envelope clients to resume.
        self.on_resync: Callable[[], None] | None = None

    def enable_history(self, history: History) -> None:
        """enable_history stores every topic and user message in Redis Streams before it is
        published (one script: see _history_redis); such a publish then waits for Redis and
        raises BusUnavailable while Redis is unreachable (nothing is stored or sent then),
        and every node, this one included, delivers it from the channel in offset order."""
        self._history = history
        self.may_block = True

    def history_read(
        self,
        stream: str,
        after: int,
        max_count: int,
        max_bytes: int,
        lock: threading.Lock | None = None,
    ) -> ReadResult:
        """history_read reads a stream's history from Redis (see BusBase.history_read). The
        read publishes a marker on the stream's channel in the same script; the subscriber
        thread takes ``lock`` when the marker comes back, having delivered every message
        stored before the read and none stored after.

        Raises:
            BusUnavailable: Redis cannot be reached.
        """
        request_id = next(self._read_ids)
        waiter = ReadWaiter(lock)
        self._reads[request_id] = waiter
        channel = stream_channel(stream, self._prefix)
        try:
            client = self._stored_client()
            if self._sharded is None:
                self._detect_mode(client)
            self._hold(channel)  # the marker comes back on it, the live messages follow
            result = read_history(
                client, stream, after, max_count, max_bytes, prefix=self._prefix,
                channel=channel, marker=read_marker(self.node_id, request_id),
                sharded=bool(self._sharded),
            )  # fmt: skip
            if waiter.wait(self._read_timeout) is None:
                raise BusUnavailable("RedisBus: the read marker did not come back in time")
            return result
        except self._errors as exc:
            raise BusUnavailable(f"RedisBus: cannot read history: {exc}") from exc
        finally:
            self._reads.pop(request_id, None)
            self._release(channel)

    def history_position(self, stream: str) -> tuple[str, int]:
        """history_position is where stream's history stands in Redis: (epoch, last offset),
        ("", 0) for a stream with no history; a plain read, no marker and no subscription
        (what `lowmemws.Publisher.positions` reads).

        Raises:
            BusUnavailable: Redis cannot be reached.
        """
        try:
            return read_position(self._stored_client(), stream, prefix=self._prefix)
        except self._errors as exc:
            raise BusUnavailable(f"RedisBus: cannot read a history position: {exc}") from exc

    def _hold(self, channel: str) -> None:
        """_hold makes the subscriber thread subscribe to channel if the hub does not want
        it already (a resumed connection joins its streams only after their replay, so it
        may be the partition's only member here) and waits until Redis confirmed it.

        Raises:
            BusUnavailable: not confirmed within the read timeout.
        """
        with self._confirm:
            self._holds[channel] = self._holds.get(channel, 0) + 1
        self._wake()
        deadline = time.monotonic() + self._read_timeout
        with self._confirm:
            while channel not in self._confirmed:
                left = deadline - time.monotonic()
                if left <= 0 or self._closing.is_set():
                    raise BusUnavailable(f"RedisBus: {channel} not subscribed in time")
                self._confirm.wait(left)

    def _release(self, channel: str) -> None:
        """_release lets go of a hold: the channel leaves after the unsubscribe grace unless
        the hub wants it by then (the resumed connection joined the stream)."""
        with self._confirm:
            held = self._holds.get(channel, 0)
            if held <= 1:
                self._holds.pop(channel, None)
            else:
                self._holds[channel] = held - 1
        self._wake()

    def when_subscribed(self, streams: list[str], ready: Callable[[], None]) -> bool:
        """when_subscribed: True when this node receives the live messages of every one of
        ``streams`` now (their partition channels are subscribed and confirmed by Redis),
        or cannot tell (the subscriber link is down: `on_resync` covers what it misses).
        Otherwise False: the channels not confirmed yet are held (subscribed even with no
        member here) and ``ready`` is called once, on the subscriber thread, when all are
        confirmed, when the link is lost or when the bus closes; the caller then lets go
        with `release_streams`. A connection joining those streams is accepted from then on,
        so every message stored after its 101 reaches it live or in its baseline (issue 12).
        """
        channels = frozenset(stream_channel(stream, self._prefix) for stream in streams)
        with self._confirm:
            if not self._sub_ready.is_set() or self._closing.is_set():
                return True
            if channels <= self._confirmed:
                return True
            for channel in channels:
                self._holds[channel] = self._holds.get(channel, 0) + 1
            self._subscribe_waiters.append((channels, ready))
        self._wake()
        return False

    def release_streams(self, streams: list[str]) -> None:
        """release_streams lets go of the channels a `when_subscribed` that returned False
        held (once its ``ready`` was called)."""
        for channel in {stream_channel(stream, self._prefix) for stream in streams}:
            self._release(channel)

    def _answer_subscribe_waiters(self, everyone: bool) -> None:
        """Call the ``ready`` of the waiters whose channels are all confirmed (``everyone``:
        of all of them, the link being lost or the bus closing)."""
        done: list[tuple[frozenset[str], Callable[[], None]]] = []
        waiting: list[tuple[frozenset[str], Callable[[], None]]] = []
        with self._confirm:
            for waiter in self._subscribe_waiters:
                (done if everyone or waiter[0] <= self._confirmed else waiting).append(waiter)
            self._subscribe_waiters = waiting
        for _, ready in done:
            try:
                ready()
            except Exception:  # one caller's failure must not stop the subscriber thread
                log.exception("lowmemws RedisBus: a when_subscribed callback raised")

    @property
    def sharded(self) -> bool | None:
        """sharded is True when the bus uses SPUBLISH/SSUBSCRIBE; None until first connected."""
        return self._sharded

    def follow(self, interest: Interest) -> None:
        """follow makes the bus subscribe only to the partitions where ``interest`` (the
        node's hub) has members, as they come and go. Call it before or after start."""
        self._interest = interest
        if self._wake_w >= 0:
            interest.watch_interest(self._wake_w)
            self._wake()

    def subscribed(self) -> frozenset[str]:
        """subscribed is the set of channels the subscriber link holds now (empty while it is
        down), including those waiting out their unsubscribe grace."""
        links = list(self._links.values())
        return frozenset().union(*(link.channels for link in links))

    def start(self, deliver: Deliver) -> None:
        """start connects in the background and begins delivering to ``deliver``.

        Raises:
            RuntimeError: the bus was started already.
        """
        if self._threads:
            raise RuntimeError("RedisBus.start: already started")
        self._deliver = deliver
        self._start_threads()

    def start_publisher(self) -> None:
        """start_publisher starts the bus for a process without connections (`Publisher`):
        it publishes, and subscribes only to the answers of its own presence queries, not to
        the envelopes of the deployment.

        Raises:
            RuntimeError: the bus was started already.
        """
        self._data_subscriber = False
        self._start_threads()

    @property
    def presence_address(self) -> bytes:  # type: ignore[override]
        """presence_address is this node's id: answers to its queries go to its channel."""
        return self.node_id

    def flush(self, timeout: float) -> int:
        """flush waits up to timeout seconds until every envelope published so far has been
        handed to Redis; returns how many are still waiting (0: all sent)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue and not self._closing.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(min(left, 0.05))
            return len(self._queue)

    def _start_threads(self) -> None:
        if self._threads:
            raise RuntimeError("RedisBus.start: already started")
        # A node is the process that starts the bus: a bus made before a fork and started
        # in each worker must give every worker its own id, or they skip each other's
        # envelopes as their own echo.
        self.node_id = os.urandom(16)
        self._answers = self._answer_channel(self.node_id).encode()
        self._filter = BusFilter(self.node_id, self._answers)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        if self._interest is not None:
            self._interest.watch_interest(self._wake_w)
        for name, target in (("pub", self._writer_loop), ("sub", self._subscriber_loop)):
            thread = threading.Thread(target=target, name=f"lowmemws-redis-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """wait_ready waits until the publishing and the subscribing links are both up."""
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in (self._pub_ready, self._sub_ready):
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                return False
        return True

    def publish(self, envelope: Envelope) -> int:
        """publish queues ``envelope`` for the other nodes, then delivers it to this node.

        It never waits for the network. Returns the count this node's deliver gave.

        Raises:
            BusUnavailable: before start, after close, and while the outage buffer is
                full; nothing is delivered then.
            ValueError: the envelope is larger than the whole buffer.
        """
        if self._history is not None and envelope.stream is not None:  # paced ones too
            return self._store_and_publish(envelope)
        parts = [(channel, part.encode()) for channel, part in route(envelope, self._prefix)]
        size = sum(len(data) + _HEADER.size for _, data in parts)
        if size > self._max_bytes:
            raise ValueError(f"RedisBus.publish: {size} bytes > max_buffered_bytes")
        with self._cond:
            refusal = self._refusal(size, len(parts))
            if refusal is not None and self._block_timeout > 0:
                refusal = self._wait_for_room(size, len(parts))
            if refusal is None:
                for channel, data in parts:
                    seq = self._seq[channel] = self._seq.get(channel, 0) + 1
                    self._queue.append((channel, _HEADER.pack(self.node_id, seq) + data))
                    if envelope.kind in QUERY_KINDS:
                        self._query_seqs[seq] = Query.parse(envelope).query_id
                self._queued_bytes += size
                self._cond.notify_all()
        if refusal is not None:
            self.stats.add("refused")
            raise BusUnavailable(refusal)
        self.stats.add("published")
        self.stats.add("buffered", len(parts))
        self.stats.add("buffered_bytes", size)
        return self._deliver_safely(envelope)

    def _store_and_publish(self, envelope: Envelope) -> int:
        """With history: store and publish in one script, now; every node delivers it from
        the channel (this one too), so it returns 0."""
        assert self._history is not None
        if not self._threads or self._closing.is_set():  # a Publisher's bus has no deliver
            self.stats.add("refused")
            raise BusUnavailable("RedisBus is not started or is closed")
        try:
            client = self._stored_client()
            if self._sharded is None:
                self._detect_mode(client)
            store_and_publish(
                client, envelope, self._history, prefix=self._prefix,
                sharded=bool(self._sharded),
            )  # fmt: skip
        except self._errors as exc:
            self.stats.add("refused")
            raise BusUnavailable(f"RedisBus: message not stored nor sent: {exc}") from exc
        self.stats.add("published")
        return 0

    def _resynced(self) -> None:
        """After an outage of the subscribing link, the stored messages published meanwhile
        never reached this node: with history, its clients are told to resume."""
        hook = self.on_resync
        if self._history is not None and hook is not None:
            try:
                hook()
            except Exception:
                log.exception("lowmemws RedisBus: on_resync failed")

    def _stored_client(self) -> Any:
        if self._history_client is None:
            self._history_client = self._client()
        return self._history_client

    def node_count(self) -> int:
        """node_count is the number of nodes subscribed to the control channel (this one
        included) as last seen: by every broadcast sent, and every keepalive while idle."""
        return max(1, self._peers)

    def close(self, timeout: float = 2.0) -> None:
        """close stops taking publishes, gives the writer up to ``timeout`` seconds to send
        what is buffered (the rest is counted in ``dropped``) and stops both threads."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        self._wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._answer_lock:
            if self._answer_client is not None:
                _quietly(self._answer_client.close)
                self._answer_client = None
        if self._interest is not None:
            self._interest.watch_interest(-1)
        if self._wake_r >= 0 and not any(thread.is_alive() for thread in self._threads):
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1

    # -- publishing --------------------------------------------------------------------------

    def _wait_for_room(self, size: int, count: int) -> str | None:
        """Wait (holding _cond) up to block_timeout for the writer to make room; None once
        there is room, else why there is none."""
        deadline = time.monotonic() + self._block_timeout
        while True:
            refusal = self._refusal(size, count)
            if refusal is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0 or self._closing.is_set():
                return f"{refusal} (waited {self._block_timeout:g} s for room)"
            self._cond.wait(left)

    def _refusal(self, size: int, count: int) -> str | None:
        if not self._threads or self._closing.is_set():
            return "RedisBus is not started or is closed"
        if len(self._queue) + count > self._max_buffered:
            return f"RedisBus buffer full ({len(self._queue)} envelopes): Redis unreachable?"
        if self._queued_bytes + size > self._max_bytes:
            return f"RedisBus buffer full ({self._queued_bytes} bytes): Redis unreachable?"
        return None

    def _writer_loop(self) -> None:
        connected_before = peers_known = False
        while (client := self._connect(not connected_before)) is not None:
            connected_before = True
            try:  # the link may break again at once: a restarting server, a reset
                if peers_known:
                    self._await_peers(client)
                else:  # ready only once known: a flush after an outage waits for them
                    self._learn_peers(client)
                    peers_known = True
                self._pub_ready.set()
                self._drain(client)
                client.close()
                break
            except self._errors as exc:
                self._link_lost("publish", exc)
                self._pub_ready.clear()
                _quietly(client.close)
        self._pub_ready.clear()
        self._drop_leftovers()

    def _drain(self, client: Any) -> None:
        """Send the queue in batches until closing; raises when the link breaks."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                # idle for a keepalive period: learn how many subscribers the control
                # channel has (the link's keepalive and liveness check), so a flush after
                # an outage waits for them even if this node sent nothing
                self._learn_peers(client)
                continue
            self._send(client, batch)

    def _next_batch(self) -> list[tuple[str, bytes]] | None:
        with self._cond:
            if not self._queue and not self._closing.is_set():
                self._cond.wait(self._keepalive)
            if not self._queue:
                return None if self._closing.is_set() else []
            batch: list[tuple[str, bytes]] = []
            size = 0
            for item in itertools.islice(self._queue, _BATCH_MESSAGES):
                if batch and size + len(item[1]) > _BATCH_BYTES:
                    break
                batch.append(item)
                size += len(item[1])
            return batch

    def _send(self, client: Any, batch: list[tuple[str, bytes]]) -> None:
        command = "SPUBLISH" if self._sharded else "PUBLISH"
        pipe = client.pipeline(transaction=False)
        for channel, message in batch:
            pipe.execute_command(command, channel, message)
        receivers = pipe.execute()
        size = 0
        with self._cond:
            for _ in batch:
                size += len(self._queue.popleft()[1])
            self._queued_bytes -= size
            self._cond.notify_all()  # a publish may wait for room (block_timeout)
        if self._query_seqs:
            self._note_receivers(batch, receivers)
        self.stats.add("buffered", -len(batch))
        self.stats.add("buffered_bytes", -size)
        for (channel, _), count in zip(batch, receivers, strict=True):
            self._receivers[channel] = int(count)
        if self.channel in self._receivers:
            self._peers = max(self._peers, self._receivers.pop(self.channel))
            self.stats.set("peers", self._peers)

    def _note_receivers(self, batch: list[tuple[str, bytes]], receivers: list[Any]) -> None:
        """The receivers of a query's PUBLISH are the nodes that will answer it."""
        for (channel, message), count in zip(batch, receivers, strict=True):
            if channel != self.channel:
                continue
            query_id = self._query_seqs.pop(_SEQ.unpack_from(message, 16)[0], None)
            if query_id is not None:
                self.queries.expect(query_id, int(count))

    def _learn_peers(self, client: Any) -> None:
        self._peers = self._subscribers(client, [self.channel])[0]
        self.stats.set("peers", self._peers)

    def _await_peers(self, client: Any) -> None:
        """After an outage, give the other nodes time to resubscribe before flushing: until
        the control channel and every channel of the buffer have as many subscribers as
        they had when last published on."""
        with self._cond:
            queued = {channel for channel, _ in self._queue}
        channels = [self.channel, *sorted(queued - {self.channel})]
        targets = [self._peers, *(self._receivers.get(ch, 0) for ch in channels[1:])]
        deadline = time.monotonic() + self._flush_grace
        while time.monotonic() < deadline and not self._closing.is_set():
            counts = self._subscribers(client, channels)
            if all(n >= target for n, target in zip(counts, targets, strict=False)):
                return
            time.sleep(0.05)

    def _subscribers(self, client: Any, channels: list[str]) -> list[int]:
        """Ask the shard of each channel how many links subscribe to it."""
        sub = "SHARDNUMSUB" if self._sharded else "NUMSUB"
        if not self._cluster:
            return _numsub(client.execute_command("PUBSUB", sub, *channels), channels)
        counts = []
        for channel in channels:  # a cluster answers for the channels of one shard at a time
            node = client.get_node_from_key(channel)
            reply = client.execute_command("PUBSUB", sub, channel, target_nodes=node)
            counts += _numsub(reply, [channel])
        return counts

    def _drop_leftovers(self) -> None:
        with self._cond:
            left, size = len(self._queue), self._queued_bytes
            self._queue.clear()
            self._queued_bytes = 0
        if left:
            log.warning("lowmemws RedisBus: closed with %d envelopes unsent", left)
            self.stats.add("dropped", left)
            self.stats.add("buffered", -left)
            self.stats.add("buffered_bytes", -size)

    # -- subscribing -------------------------------------------------------------------------

    def _subscriber_loop(self) -> None:
        first = True
        while (client := self._connect(first)) is not None:
            self._resync_due = not first
            first = False
            links: dict[str, SubscriberLink] = {}
            try:
                self._listen(client, links)
            except self._errors as exc:
                self._link_lost("subscribe", exc)
            finally:
                self._sub_ready.clear()
                with self._confirm:
                    self._confirmed.clear()
                    self._sending.clear()
                self._answer_subscribe_waiters(everyone=True)  # on_resync covers them
                self._links = {}
                for link in links.values():
                    _quietly(link.close)
                _quietly(client.close)

    def _listen(self, client: Any, links: dict[str, SubscriberLink]) -> None:
        """Hold one link per shard that owns a wanted channel (one link on a single server)
        until closing; raises when a link breaks, and the caller starts over."""
        self._leaving.clear()
        self._unready.clear()
        self._links = links
        self._follow_interest(client, links)
        while not self._closing.is_set():
            soonest = min(self._leaving.values(), default=time.monotonic() + self._keepalive)
            timeout = max(0.0, soonest - time.monotonic())
            woken = wait_links(list(links.values()), timeout, self._wake_r)
            self._flush_unserved()
            if woken:
                _drain_pipe(self._wake_r)
                self._follow_interest(client, links)
            self._leave_expired(links)

    def _point_filter_at_hub(self) -> None:
        """The filter checks users in C when the hub is a native one (open now)."""
        assert self._filter is not None
        native = getattr(self._interest, "native_hub", None)
        hub = native() if native is not None else ffi.NULL
        self._filter.hub = hub
        self._users_in_c = hub != ffi.NULL

    def _follow_interest(self, client: Any, links: dict[str, SubscriberLink]) -> None:
        """Subscribe to the channels the hub needs now; empty ones leave after the grace."""
        self._point_filter_at_hub()  # here, not per read: the hub changes when members do
        wanted = {self._answer_channel(self.node_id)}
        if self._data_subscriber:
            wanted |= wanted_channels(self._interest, self._prefix)
        with self._confirm:
            wanted.update(self._holds)
        held: set[str] = set().union(*(link.channels for link in links.values()))
        by_link: dict[str, list[str]] = {}
        for channel in wanted - held:
            by_link.setdefault(self._shard_of(client, channel), []).append(channel)
        control = control_channel(self._prefix)
        for name, channels in by_link.items():
            link = links.get(name) or self._open_link(client, name, links)
            # the control channel last: a publisher flushing after an outage waits until it
            # has as many subscribers as before (_await_peers), and Redis takes one link's
            # commands in order, so by then this link's partitions are subscribed too
            link.subscribe(channel for channel in channels if channel != control)
            link.subscribe(channel for channel in channels if channel == control)
            with self._confirm:
                self._sending.setdefault(name, set()).update(channels)
            link.mark()
            self._unready.add(name)
        for channel in wanted:
            self._leaving.pop(channel, None)
        leave_at = time.monotonic() + self._unsubscribe_grace
        for channel in held - wanted:
            self._leaving.setdefault(channel, leave_at)

    def _shard_of(self, client: Any, channel: str) -> str:
        """The name of the link a channel is subscribed on: its shard's master."""
        if not self._cluster:
            return "server"
        return str(client.get_node_from_key(channel).name)

    def _open_link(self, client: Any, name: str, links: dict[str, SubscriberLink]) -> Any:
        if self._cluster:
            pool = client.get_node(node_name=name).redis_connection.connection_pool
        else:
            pool = client.connection_pool
        connection = pool.make_connection()
        connection.connect()
        assert self._filter is not None  # made in _start_threads
        link = SubscriberLink(
            connection,
            bool(self._sharded),
            self._receive,
            self._filter,
            keepalive=self._keepalive,
            reply_timeout=self._socket_timeout,
            one_per_command=bool(self._cluster),
        )
        link.on_ready = lambda: self._link_ready(name)
        links[name] = link
        return link

    def _link_ready(self, name: str) -> None:
        with self._confirm:  # every subscribe sent on the link before its mark is answered
            self._confirmed.update(self._sending.pop(name, ()))
            self._confirm.notify_all()
        self._answer_subscribe_waiters(everyone=False)
        self._unready.discard(name)
        if not self._unready:
            self._sub_ready.set()
            if self._resync_due:
                self._resync_due = False
                self._resynced()

    def _leave_expired(self, links: dict[str, SubscriberLink]) -> None:
        now = time.monotonic()
        expired = [channel for channel, at in self._leaving.items() if at <= now]
        if not expired:
            return
        with self._confirm:  # a channel a history read holds stays (it may be confirmed)
            kept = [channel for channel in expired if channel in self._holds]
            expired = [channel for channel in expired if channel not in self._holds]
            self._confirmed.difference_update(expired)
        for channel in kept:
            del self._leaving[channel]
        for channel in expired:
            del self._leaving[channel]
        # the origins' numbering on those channels restarts when they are subscribed again
        assert self._filter is not None
        self._filter.forget(channel.encode() for channel in expired)
        for link in links.values():
            link.unsubscribe(expired)  # each drops the ones it holds

    def _receive(self, channel: bytes, data: bytes, judged: bool) -> None:
        """One message the filter kept; judged: its origin, sequence number and user were
        checked in C (see `lowmemws._bus_filter`)."""
        if channel == self._answers:
            self._receive_answer(data)
            return
        if len(data) < _HEADER.size:
            self.stats.add("malformed")
            return
        origin = _HEADER.unpack_from(data)[0]
        if origin == MARKER_ORIGIN:
            marker = parse_marker(data)
            waiter = self._reads.get(marker[1]) if marker and marker[0] == self.node_id else None
            if waiter is not None:
                waiter.answer(b"")
            return
        if origin != STORED_ORIGIN:  # a stored one: every node delivers it, in Redis's order
            assert self._filter is not None
            if not judged and not self._filter.judge(channel, data):
                return
            if self._unserved(data):
                self._unserved_count += 1  # this thread alone writes it: no lock per message
                return
        try:
            envelope = Envelope.decode(memoryview(data)[_HEADER.size :])
        except ValueError:
            self.stats.add("malformed")
            return
        self._deliver_safely(envelope)

    # -- presence queries (issue 12) --------------------------------------------------------

    def _answers_expected(self) -> int | None:
        return None  # the PUBLISH of the query says how many nodes got it: _note_receivers

    def _answer_channel(self, node: bytes) -> str:
        return self._answers_prefix + node.hex()

    def answer(self, query: Query, count: int) -> None:
        """answer sends this node's count to the node that asked, on that node's answer
        channel (directly, not through the buffer: an answer late by an outage is useless)."""
        if not query.query_id:
            return
        if query.asker == self.node_id:
            super().answer(query, count)
            return
        data = answer_envelope(query.query_id, count).encode()
        command = "SPUBLISH" if self._sharded else "PUBLISH"
        try:
            with self._answer_lock:
                if self._answer_client is None:
                    self._answer_client = self._client()
                self._answer_client.execute_command(
                    command, self._answer_channel(query.asker), data
                )
        except self._errors as exc:
            log.warning("lowmemws RedisBus: could not answer a presence query: %s", exc)

    def _receive_answer(self, data: bytes) -> None:
        try:
            envelope = Envelope.decode(data)
        except ValueError:
            self.stats.add("malformed")
            return
        self._take_answer(envelope)

    def _flush_unserved(self) -> None:
        """Add the drops of one read to the stats: one locked add per read, not per message."""
        assert self._filter is not None
        unserved, duplicates, missed = self._filter.take_counts()
        unserved += self._unserved_count
        self._unserved_count = 0
        for name, count in (("unserved", unserved), ("duplicates", duplicates), ("missed", missed)):
            if count:
                self.stats.add(name, count)

    def _unserved(self, data: bytes) -> bool:
        """A user or topic envelope (wire version 1) for a user with no connection here, or
        a topic with no member here: dropped undecoded. Anything else is decoded. (Users are
        checked in C when the hub is native.)"""
        interest = self._interest
        if interest is None or len(data) < _KEY_AT or data[_HEADER.size] != _WIRE_V1:
            return False
        kind = data[_HEADER.size + 1] & _KIND_MASK
        if kind == _KIND_USER and not self._users_in_c and len(data) >= _KEY_AT + _USER_TAG.size:
            return not interest.user_held(_USER_TAG.unpack_from(data, _KEY_AT)[0])
        if kind == _KIND_TOPIC and len(data) >= _KEY_AT + _TOPIC_LEN.size:
            (length,) = _TOPIC_LEN.unpack_from(data, _KEY_AT)
            name = data[_KEY_AT + _TOPIC_LEN.size : _KEY_AT + _TOPIC_LEN.size + length]
            try:
                return not interest.topic_held(name.decode("utf-8"))
            except UnicodeDecodeError:
                return False  # decode says malformed
        return False

    # -- links -------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wake_w >= 0:
            try:
                os.write(self._wake_w, b"!")
            except BlockingIOError:
                pass  # a wake-up is pending already

    def _client(self) -> Any:
        if self._cluster:
            return self._redis.RedisCluster.from_url(self._url, **self._client_options)
        return self._redis.Redis.from_url(
            self._url, **_options_for(self._url, self._client_options)
        )

    def _connect(self, first: bool) -> Any | None:
        """A client that answered PING (retried with backoff and jitter); None once closing.
        The first answer tells the mode: sharded pub/sub or not, a cluster or one server."""
        for attempt in itertools.count():
            if self._closing.is_set():
                return None
            client = None
            try:
                client = self._client()
                client.ping()
                self._detect_mode(client)
                if self._cluster != isinstance(client, self._redis.RedisCluster):
                    client.close()  # made before the mode was known: the server is a cluster
                    client = self._client()
                    client.ping()
            except self._errors:
                if client is not None:
                    _quietly(client.close)
                base, cap = self._backoff
                delay = min(cap, base * 2**attempt)
                self._closing.wait(random.uniform(delay / 2, delay))
                continue
            if not first:
                self.stats.add("reconnects")
                log.info("lowmemws RedisBus: reconnected (%d attempts)", attempt + 1)
            return client
        return None  # pragma: no cover - the loop above never ends by itself

    def _detect_mode(self, client: Any) -> None:
        """Learn sharded and cluster from the server (once)."""
        with self._mode_lock:
            if self._sharded is None:
                version = str(client.info("server").get("redis_version", "0"))
                self._sharded = int(version.split(".")[0]) >= 7
            if self._cluster is None:
                self._cluster = bool(client.info("cluster").get("cluster_enabled", 0))

    def _link_lost(self, link: str, exc: BaseException) -> None:
        if self._closing.is_set():
            return
        self.stats.add("disconnects")
        log.warning("lowmemws RedisBus: %s link lost: %s", link, exc)


def _numsub(reply: Any, channels: list[str]) -> list[int]:
    """The counts of a PUBSUB (SHARD)NUMSUB reply, in the order of channels."""
    if isinstance(reply, dict):  # RESP3, or a cluster client's answer
        return [int(reply.get(ch.encode(), reply.get(ch)) or 0) for ch in channels]
    flat = (
        list(itertools.chain.from_iterable(reply))
        if reply and isinstance(reply[0], tuple)
        else reply
    )
    return [int(n) for n in flat[1::2]]


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception:
        pass
