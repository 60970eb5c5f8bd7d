"""RedisBus: gateways on several machines share topics and users through a redis-server.

Theory of operation. Every node (process) publishes to, and subscribes to, ONE channel,
``channel_prefix + "bus"``, that carries whole encoded envelopes. One channel, not one per
topic, because every node must see every user message and every broadcast anyway (no node
knows where a user is connected), per-topic channels would need the hub to report each topic's
first and last local subscriber, and one channel keeps one publisher's envelopes in the order
it published them, whatever their kind. Sharded pub/sub (SPUBLISH/SSUBSCRIBE, Redis >= 7.0) is
used when the server's version has it: in a cluster it keeps the traffic on the shard that
owns the channel instead of broadcasting it over the cluster bus; elsewhere plain
PUBLISH/SUBSCRIBE.

Each message on the channel is ``origin node id (16 bytes) + sequence number (8 bytes) +
Envelope.encode()``. A node delivers its own envelopes locally inside ``publish`` and skips
them when Redis echoes them back, so no node gets an envelope twice. The sequence numbers let
a receiver skip an envelope that a publisher re-sent after a broken connection (``duplicates``)
and count the envelopes of another node that it never saw (``missed``).

Threads: ``publish`` only queues (and delivers locally), in the caller's thread; a writer
thread sends the queue in pipelined batches; a subscriber thread receives and calls deliver.

Presence queries (issue 12, `lowmemws._presence`) travel on the channel like any envelope;
each node answers on the asker's own channel ``channel_prefix + "answers:" + node id (hex)``,
which every node (and every `lowmemws.Publisher`, which subscribes to nothing else) listens
to. The asker waits for as many answers as Redis reported receivers for the query's PUBLISH.

During a Redis outage (server down, network cut):
- local delivery is unaffected: ``publish`` still delivers to this node at once;
- publishes are kept in a bounded buffer (``max_buffered`` envelopes, ``max_buffered_bytes``);
  when it is full ``publish`` raises BusUnavailable and delivers nothing, not even locally,
  so a retry never duplicates (``refused`` counts it);
- both links reconnect by themselves with exponential backoff and jitter (``backoff_base``
  doubling up to ``backoff_cap``), counted in ``disconnects`` and ``reconnects``;
- after reconnecting, the writer waits up to ``flush_grace`` seconds for as many subscribers
  as the channel had before (the other nodes resubscribing), then sends the buffer in order;
- envelopes that other nodes got into Redis while THIS node's subscription was down are not
  received: pub/sub keeps no history. They are counted in ``missed`` once a later envelope of
  the same node arrives. The grace wait above makes that rare when the server restarts, not
  impossible (a node that needs longer than the grace to come back misses the flush).
- an envelope still buffered when ``close`` gives up is counted in ``dropped``.
"""

from __future__ import annotations

import itertools
import os
import random
import struct
import threading
import time
from collections import OrderedDict, deque
from typing import Any

from ._bus_base import QUERY_KINDS, BusBase, Deliver, Envelope, Query, answer_envelope, log
from ._user_ids import deployment_key
from .errors import BusUnavailable

__all__ = ["RedisBus"]

_MiB = 1024 * 1024
_HEADER = struct.Struct(">16sQ")  # origin node id, sequence number
_BATCH_MESSAGES = 512
_BATCH_BYTES = _MiB
_MAX_ORIGINS = 4096
_IDLE_PING = 1.0
_SEQ = struct.Struct(">Q")


class RedisBus(BusBase):
    """RedisBus carries envelopes between nodes through a redis-server at ``url``.

    Create it in the process that uses it (after any fork: its threads and sockets do not
    survive one), then ``start(deliver)``. ``wait_ready(timeout)`` tells when both links are
    up. ``sharded`` forces SPUBLISH (True) or PUBLISH (False); None asks the server's version.
    See the module docstring for what happens during an outage.

    ``user_key``: a secret shared by every node and `lowmemws.Publisher` of the deployment,
    from which (with ``channel_prefix``) they all derive the same key for str user ids
    (without it the key is derived from the prefix alone: see docs/presence.md).
    ``block_timeout``: how long publish may wait for room in a full buffer before it raises
    BusUnavailable (0, the default for a gateway: raise at once, never stall the caller;
    `lowmemws.Publisher` waits, so a tight loop is slowed down to Redis's pace instead).

    Raises:
        ImportError: redis-py is not installed (``pip install 'lowmemws[redis]'``).
    """

    may_block = False  # publish queues for the network and fans out here: no wait

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "lowmemws:",
        max_buffered: int = 10000,
        max_buffered_bytes: int = 16 * _MiB,
        sharded: bool | None = None,
        backoff_base: float = 0.05,
        backoff_cap: float = 5.0,
        flush_grace: float = 6.0,
        socket_timeout: float = 5.0,
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
        self._redis: Any = redis
        self._client_options: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": socket_timeout,
            "retry": Retry(NoBackoff(), 0),
        }
        self._errors: tuple[type[BaseException], ...] = (redis.RedisError, OSError)
        self._url = url
        #: channel is the one Redis channel that carries every envelope of the deployment.
        self.channel = channel_prefix + "bus"
        self._answers_prefix = channel_prefix + "answers:"
        #: user_key is the key of str user ids, the same on every node of the deployment.
        self.user_key = deployment_key(channel_prefix, user_key)
        self._block_timeout = block_timeout
        self._query_seqs: dict[int, int] = {}  # sequence number of a query -> its query id
        self._answer_client: Any = None
        self._answer_lock = threading.Lock()
        self._data_subscriber = True
        #: node_id identifies this node's envelopes on the channel.
        self.node_id = os.urandom(16)
        self._max_buffered = max_buffered
        self._max_bytes = max_buffered_bytes
        self._sharded = sharded
        self._backoff = (backoff_base, backoff_cap)
        self._flush_grace = flush_grace
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._seq = 0
        self._cond = threading.Condition()
        self._mode_lock = threading.Lock()
        self._closing = threading.Event()
        self._pub_ready = threading.Event()
        self._sub_ready = threading.Event()
        self._peers = 0
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()
        self._threads: list[threading.Thread] = []

    @property
    def sharded(self) -> bool | None:
        """sharded is True when the bus uses SPUBLISH/SSUBSCRIBE; None until first connected."""
        return self._sharded

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

    def _start_threads(self) -> None:
        if self._threads:
            raise RuntimeError("RedisBus.start: already started")
        # A node is the process that starts the bus: a bus made before a fork and started
        # in each worker must give every worker its own id, or they skip each other's
        # envelopes as their own echo.
        self.node_id = os.urandom(16)
        for name, target in (("pub", self._writer_loop), ("sub", self._subscriber_loop)):
            thread = threading.Thread(target=target, name=f"lowmemws-redis-{name}", daemon=True)
            self._threads.append(thread)
            thread.start()

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
        data = envelope.encode()
        if len(data) + _HEADER.size > self._max_bytes:
            raise ValueError(f"RedisBus.publish: {len(data)} bytes > max_buffered_bytes")
        with self._cond:
            refusal = self._refusal(len(data))
            if refusal is not None and self._block_timeout > 0:
                refusal = self._wait_for_room(len(data))
            if refusal is None:
                self._seq += 1
                message = _HEADER.pack(self.node_id, self._seq) + data
                self._queue.append(message)
                self._queued_bytes += len(message)
                if envelope.kind in QUERY_KINDS:
                    self._query_seqs[self._seq] = Query.parse(envelope).query_id
                self._cond.notify_all()
        if refusal is not None:
            self.stats.add("refused")
            raise BusUnavailable(refusal)
        self.stats.add("published")
        self.stats.add("buffered")
        self.stats.add("buffered_bytes", len(message))
        return self._deliver_safely(envelope)

    def node_count(self) -> int:
        """node_count is the number of nodes subscribed to the channel (this one included) as
        last seen: by every batch sent, and once a second while idle."""
        return max(1, self._peers)

    def close(self, timeout: float = 2.0) -> None:
        """close stops taking publishes, gives the writer up to ``timeout`` seconds to send
        what is buffered (the rest is counted in ``dropped``) and stops both threads."""
        self._closing.set()
        with self._cond:
            self._cond.notify_all()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._answer_lock:
            if self._answer_client is not None:
                _quietly(self._answer_client.close)
                self._answer_client = None

    # -- publishing --------------------------------------------------------------------------

    def _wait_for_room(self, size: int) -> str | None:
        """Wait (holding _cond) up to block_timeout for the writer to make room; None once
        there is room, else why there is none."""
        deadline = time.monotonic() + self._block_timeout
        while True:
            refusal = self._refusal(size)
            if refusal is None:
                return None
            left = deadline - time.monotonic()
            if left <= 0 or self._closing.is_set():
                return f"{refusal} (waited {self._block_timeout:g} s for room)"
            self._cond.wait(left)

    def _refusal(self, size: int) -> str | None:
        if not self._threads or self._closing.is_set():
            return "RedisBus is not started or is closed"
        if len(self._queue) >= self._max_buffered:
            return f"RedisBus buffer full ({len(self._queue)} envelopes): Redis unreachable?"
        if self._queued_bytes + size + _HEADER.size > self._max_bytes:
            return f"RedisBus buffer full ({self._queued_bytes} bytes): Redis unreachable?"
        return None

    def _writer_loop(self) -> None:
        client = self._client()
        connected_before = peers_known = False
        while self._connect(client, not connected_before):
            connected_before = True
            try:  # the link may break again at once: a restarting server, a reset
                if peers_known:
                    self._await_peers(client)
                else:  # ready only once known: a flush after an outage waits for them
                    self._learn_peers(client)
                    peers_known = True
                self._pub_ready.set()
                self._drain(client)
                break
            except self._errors as exc:
                self._link_lost("publish", exc)
                self._pub_ready.clear()
        self._pub_ready.clear()
        self._drop_leftovers()
        client.close()

    def _drain(self, client: Any) -> None:
        """Send the queue in batches until closing; raises when the link breaks."""
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            if not batch:
                # idle: learn how many subscribers the channel has (also a liveness check),
                # so a flush after an outage waits for them even if this node sent nothing
                self._learn_peers(client)
                continue
            self._send(client, batch)

    def _next_batch(self) -> list[bytes] | None:
        with self._cond:
            if not self._queue and not self._closing.is_set():
                self._cond.wait(_IDLE_PING)
            if not self._queue:
                return None if self._closing.is_set() else []
            batch: list[bytes] = []
            size = 0
            for message in itertools.islice(self._queue, _BATCH_MESSAGES):
                if batch and size + len(message) > _BATCH_BYTES:
                    break
                batch.append(message)
                size += len(message)
            return batch

    def _send(self, client: Any, batch: list[bytes]) -> None:
        command = "SPUBLISH" if self._sharded else "PUBLISH"
        pipe = client.pipeline(transaction=False)
        for message in batch:
            pipe.execute_command(command, self.channel, message)
        receivers = pipe.execute()
        size = 0
        with self._cond:
            for _ in batch:
                size += len(self._queue.popleft())
            self._queued_bytes -= size
            self._cond.notify_all()  # a publish may wait for room (block_timeout)
        if self._query_seqs:
            self._note_receivers(batch, receivers)
        self.stats.add("buffered", -len(batch))
        self.stats.add("buffered_bytes", -size)
        self._peers = max(int(n) for n in receivers)
        self.stats.set("peers", self._peers)

    def _note_receivers(self, batch: list[bytes], receivers: list[Any]) -> None:
        """The receivers of a query's PUBLISH are the nodes that will answer it."""
        for message, count in zip(batch, receivers, strict=True):
            query_id = self._query_seqs.pop(_SEQ.unpack_from(message, 16)[0], None)
            if query_id is not None:
                self.queries.expect(query_id, int(count))

    def _learn_peers(self, client: Any) -> None:
        self._peers = self._subscribers(client)
        self.stats.set("peers", self._peers)

    def _await_peers(self, client: Any) -> None:
        """After an outage, give the other nodes time to resubscribe before flushing."""
        deadline = time.monotonic() + self._flush_grace
        while time.monotonic() < deadline and not self._closing.is_set():
            if self._subscribers(client) >= self._peers:
                return
            time.sleep(0.05)

    def _subscribers(self, client: Any) -> int:
        sub = "SHARDNUMSUB" if self._sharded else "NUMSUB"
        reply = client.execute_command("PUBSUB", sub, self.channel)
        flat = (
            list(itertools.chain.from_iterable(reply))
            if reply and isinstance(reply[0], tuple)
            else reply
        )
        return int(flat[1]) if len(flat) > 1 else 0

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
        while not self._closing.is_set():
            client = self._client(health_check_interval=5)
            if not self._connect(client, first):
                client.close()
                break
            first = False
            pubsub = client.pubsub()
            try:
                self._listen(pubsub)
            except self._errors as exc:
                self._link_lost("subscribe", exc)
            finally:
                self._sub_ready.clear()
                _quietly(pubsub.close)
                _quietly(client.close)

    def _listen(self, pubsub: Any) -> None:
        channels = [self._answer_channel(self.node_id)]
        if self._data_subscriber:
            channels.insert(0, self.channel)
        for channel in channels:  # one by one: in a cluster they live on different shards
            if self._sharded:
                pubsub.ssubscribe(channel)
            else:
                pubsub.subscribe(channel)
        answers = channels[-1].encode()
        confirmed = 0
        while not self._closing.is_set():
            message = pubsub.get_message(timeout=0.25)
            if message is None:
                continue
            kind = message["type"]
            if kind in ("subscribe", "ssubscribe"):
                confirmed += 1
                if confirmed == len(channels):  # ready once every subscription holds
                    self._sub_ready.set()
            elif kind in ("message", "smessage"):
                if message["channel"] == answers:
                    self._receive_answer(message["data"])
                else:
                    self._receive(message["data"])

    def _receive(self, data: bytes) -> None:
        if len(data) < _HEADER.size:
            self.stats.add("malformed")
            return
        origin, seq = _HEADER.unpack_from(data)
        if origin == self.node_id or not self._in_sequence(origin, seq):
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

    def _in_sequence(self, origin: bytes, seq: int) -> bool:
        """Skip re-sent envelopes; count the gaps left by envelopes this node never saw."""
        last = self._last_seq.get(origin)
        if last is not None:
            if seq <= last:
                self.stats.add("duplicates")
                return False
            if seq > last + 1:
                self.stats.add("missed", seq - last - 1)
        self._last_seq[origin] = seq
        self._last_seq.move_to_end(origin)
        if len(self._last_seq) > _MAX_ORIGINS:
            self._last_seq.popitem(last=False)
        return True

    # -- links -------------------------------------------------------------------------------

    def _client(self, **extra: Any) -> Any:
        return self._redis.Redis.from_url(self._url, **self._client_options, **extra)

    def _connect(self, client: Any, first: bool) -> bool:
        """Ping until the server answers (backoff with jitter); False once closing."""
        for attempt in itertools.count():
            if self._closing.is_set():
                return False
            try:
                client.ping()
                self._detect_mode(client)
            except self._errors:
                base, cap = self._backoff
                delay = min(cap, base * 2**attempt)
                self._closing.wait(random.uniform(delay / 2, delay))
                continue
            if not first:
                self.stats.add("reconnects")
                log.info("lowmemws RedisBus: reconnected (%d attempts)", attempt + 1)
            return True
        return False  # pragma: no cover - the loop above never ends by itself

    def _detect_mode(self, client: Any) -> None:
        with self._mode_lock:
            if self._sharded is None:
                version = str(client.info("server").get("redis_version", "0"))
                self._sharded = int(version.split(".")[0]) >= 7

    def _link_lost(self, link: str, exc: BaseException) -> None:
        if self._closing.is_set():
            return
        self.stats.add("disconnects")
        log.warning("lowmemws RedisBus: %s link lost: %s", link, exc)


def _quietly(action: Any) -> None:
    try:
        action()
    except Exception:
        pass
