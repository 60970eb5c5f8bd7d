"""The shared vocabulary of the message buses: envelopes, counters and the Bus protocol.

Theory of operation: a gateway never fans out a publish itself. It wraps the message in an
`Envelope` and hands it to its bus; the bus brings the envelope to every node (process) of the
deployment, the publishing node included, by calling that node's ``deliver`` callback, which
runs the C fan-out over the node's own connections. The buses differ only in how far they
reach: one process (`LocalBus`), the worker processes of one machine (`ProcessBus`), or several
machines through a redis-server (`RedisBus`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

from ._constants import OP_BINARY, OP_TEXT, POLICIES, Policy
from ._queries import Queries, Tally

__all__ = [
    "QUERY_KINDS",
    "Bus",
    "Query",
    "answer_envelope",
    "query_envelope",
    "BusStats",
    "Deliver",
    "Envelope",
    "Kind",
    "Policy",
    "OPCODE_TEXT",
    "OPCODE_BINARY",
]

log = logging.getLogger("lowmemws.bus")

Kind = Literal["topic", "user", "broadcast", "users", "cancel", "online", "kick", "answer"]

#: OPCODE_TEXT is the RFC 6455 section 5.2 opcode of a text frame.
OPCODE_TEXT = OP_TEXT
#: OPCODE_BINARY is the RFC 6455 section 5.2 opcode of a binary frame.
OPCODE_BINARY = OP_BINARY

_KINDS: tuple[Kind, ...] = (
    "topic", "user", "broadcast", "users", "cancel", "online", "kick", "answer"
)  # fmt: skip
_V1_KINDS = ("topic", "user", "broadcast")  # version 1 has 2 bits for the kind
#: QUERY_KINDS are the presence queries (issue 12): every node answers them (see _presence).
QUERY_KINDS = ("online", "kick")
_QUERY = struct.Struct(">Q16s")  # query id, the asking node's address
_KICK = struct.Struct(">H")  # close code; the reason's UTF-8 follows
_COUNT = struct.Struct(">Q")
_POLICY_BY_VALUE: dict[int, Policy] = {value: name for name, value in POLICIES.items()}
_WIRE_VERSION = 1  # an unpaced topic, user or broadcast envelope: what every node reads
_WIRE_VERSION_PACED = 2  # any other: a batch of users, a paced send, a cancel (issue 18)
_WIRE_VERSION_POSITION = 3  # a stored message: its stream position, then a v1 form (issue 12)
_MAX_EPOCH = 64  # ASCII characters of an epoch
_HEAD = struct.Struct(">BBB")  # version, kind | policy << 2, opcode
_HEAD2 = struct.Struct(">BBBB")  # version 2, kind, policy, opcode
_PACE = struct.Struct(">QddH")  # pace id, spread seconds, rate per second, nodes
_TOPIC_LEN = struct.Struct(">H")
_USER_TAG = struct.Struct(">Q")
_USER_COUNT = struct.Struct(">I")
_MAX_TOPIC_BYTES = 0xFFFF
_MAX_USER_TAG = 2**64 - 1
_MAX_USERS = 2**32 - 1
_MAX_NODES = 0xFFFF
_TAG_KINDS = ("user", "cancel", "online", "kick", "answer")  # keyed by one 64-bit number


@dataclass(frozen=True, slots=True)
class Envelope:
    """Envelope is one published message on its way to every node of a deployment.

    ``kind`` says who receives it on each node: the members of topic ``key`` (a str), the
    connections tagged with user ``key`` (an int in 0..2**64-1, the C slot's 64-bit user tag),
    the connections tagged with any of the users ``key`` (a tuple of such ints, "users"),
    or every connection (``key`` is None). ``opcode`` is the RFC 6455 section 5.2 data opcode
    (1 text, 2 binary); ``policy`` is the slow-consumer policy of issue 4 ("drop", "close" or
    "latest"). The payload is owned by the envelope (bytes, never a borrowed view).

    Pacing (issue 18): ``spread`` > 0 spreads each node's deliveries over that many seconds;
    else ``rate`` > 0 caps the deployment's deliveries per second, each node taking
    ``rate / nodes`` (``nodes``: how many nodes the publisher's bus reached).
    ``pace_id`` names the send; a "cancel" envelope (``key`` the pace id, no payload) ends
    every paced send of that id on every node.

    History (issue 12): a message stored in its stream's history carries its position,
    ``epoch`` (the stream history's id, ASCII) and ``offset`` (1, 2, ... within the stream);
    ``epoch`` is "" for a message that was not stored.

    Presence (issue 12): an "online" or "kick" envelope (``key`` a user tag) asks every node
    to count (or close) that user's connections and answer with an "answer" envelope (``key``
    the query id); their payloads are built by `query_envelope` and `answer_envelope`.

    Raises:
        ValueError: an unknown kind or policy, an opcode other than 1 or 2, a bad key.
        TypeError: a payload that is not bytes.
    """

    kind: Kind
    key: str | int | tuple[int, ...] | None
    opcode: int
    payload: bytes
    policy: Policy = "drop"
    spread: float = 0.0
    rate: float = 0.0
    nodes: int = 1
    pace_id: int = 0
    epoch: str = ""
    offset: int = 0

    @property
    def stream(self) -> str | None:
        """stream names the history stream of the envelope: "t:" + topic for a topic,
        "u:" + the decimal user tag for a user; None for the others (not stored)."""
        if self.kind == "topic":
            return f"t:{self.key}"
        if self.kind == "user":
            return f"u:{self.key}"
        return None

    def with_position(self, epoch: str, offset: int) -> Envelope:
        """with_position returns this envelope stored at (epoch, offset) of its stream."""
        return Envelope(
            self.kind, self.key, self.opcode, self.payload, self.policy, self.spread, self.rate,
            self.nodes, self.pace_id, epoch, offset,
        )  # fmt: skip

    @property
    def paced(self) -> bool:
        """paced is True when the envelope is delivered over time (spread or rate)."""
        return self.spread > 0 or self.rate > 0

    @property
    def node_rate(self) -> float:
        """node_rate is the rate each node paces at: its share of ``rate``."""
        return self.rate / self.nodes

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"Envelope: unknown kind {self.kind!r}")
        if self.policy not in POLICIES:
            raise ValueError(f"Envelope: unknown policy {self.policy!r}")
        if self.opcode not in (OPCODE_TEXT, OPCODE_BINARY):
            raise ValueError(f"Envelope: opcode must be 1 or 2, not {self.opcode!r}")
        if not isinstance(self.payload, bytes):
            raise TypeError("Envelope: payload must be bytes")
        _check_key(self.kind, self.key)
        _check_pace(self.spread, self.rate, self.nodes, self.pace_id)
        _check_position(self.epoch, self.offset)

    @classmethod
    def for_topic(cls, topic: str, data: str | bytes, *, policy: Policy = "drop") -> Envelope:
        """for_topic builds the envelope of ``publish(topic, data)``: text for str, else binary.

        Raises:
            ValueError: an unknown policy, or a topic longer than 65535 UTF-8 bytes.
        """
        opcode, payload = frame_data(data)
        return cls("topic", topic, opcode, payload, policy)

    @classmethod
    def for_user(cls, user_tag: int, data: str | bytes, *, policy: Policy = "drop") -> Envelope:
        """for_user builds the envelope of ``send_to_user(user_tag, data)``.

        Raises:
            ValueError: an unknown policy, or user_tag outside 0..2**64-1.
        """
        opcode, payload = frame_data(data)
        return cls("user", user_tag, opcode, payload, policy)

    @classmethod
    def for_all(cls, data: str | bytes, *, policy: Policy = "drop") -> Envelope:
        """for_all builds the envelope of ``broadcast(data)``.

        Raises:
            ValueError: an unknown policy.
        """
        opcode, payload = frame_data(data)
        return cls("broadcast", None, opcode, payload, policy)

    @classmethod
    def for_users(
        cls, user_tags: Iterable[int], data: str | bytes, *, policy: Policy = "drop"
    ) -> Envelope:
        """for_users builds the envelope of ``send_to_users(user_tags, data)``.

        Raises:
            ValueError: an unknown policy, or a user tag outside 0..2**64-1.
        """
        opcode, payload = frame_data(data)
        return cls("users", tuple(user_tags), opcode, payload, policy)

    def per_user(self) -> tuple[Envelope, ...]:
        """per_user returns an unpaced batch ("users") as one "user" envelope per distinct
        user, in order, without user 0 (no user: nobody to store it for): with history each
        user's copy is stored in that user's stream and carries that stream's position,
        which one shared frame cannot (issue 12).

        Raises:
            ValueError: not an unpaced "users" envelope.
        """
        if self.kind != "users" or self.paced:
            raise ValueError("per_user splits an unpaced batch of users")
        assert isinstance(self.key, tuple)
        return tuple(
            Envelope("user", tag, self.opcode, self.payload, self.policy)
            for tag in dict.fromkeys(self.key)
            if tag
        )

    @classmethod
    def for_cancel(cls, pace_id: int) -> Envelope:
        """for_cancel builds the envelope that cancels every paced send named pace_id."""
        return cls("cancel", pace_id, OPCODE_BINARY, b"")

    def with_pace(self, spread: float, rate: float, nodes: int, pace_id: int) -> Envelope:
        """with_pace returns this envelope delivered over time (see the class docstring)."""
        return Envelope(
            self.kind, self.key, self.opcode, self.payload, self.policy, spread, rate, nodes,
            pace_id,
        )  # fmt: skip

    def encode(self) -> bytes:
        """encode returns the compact wire form: 3 header bytes, the key, then the payload.

        The key is a 2-byte length and UTF-8 for a topic, 8 bytes big-endian for a user tag,
        and absent for a broadcast; the payload runs to the end, so it needs no length.
        A batch of users, a paced send or a cancel is version 2 (see `_encode_v2`): a node
        that only knows version 1 refuses it as malformed instead of sending it unpaced.
        """
        if self.epoch:
            return self.position_prefix() + self._encode_unpositioned()
        return self._encode_unpositioned()

    def position_prefix(self) -> bytes:
        """position_prefix is the head of the version 3 form: the byte 3, a length byte, then
        "epoch:offset" in ASCII; the envelope's version 1 or 2 form follows it. (A Redis
        script writes the same head once it knows the offset: see _history_redis.)"""
        return position_head(self.epoch, self.offset)

    def _encode_unpositioned(self) -> bytes:
        if self.kind not in _V1_KINDS or self.paced or self.pace_id or self.nodes != 1:
            return self._encode_v2()
        flags = _KINDS.index(self.kind) | POLICIES[self.policy] << 2
        head = _HEAD.pack(_WIRE_VERSION, flags, self.opcode)
        return b"".join((head, self._encode_key(), self.payload))

    def _encode_key(self) -> bytes:
        if self.kind == "topic":
            assert isinstance(self.key, str)
            name = self.key.encode()
            return _TOPIC_LEN.pack(len(name)) + name
        if self.kind in _TAG_KINDS:
            assert isinstance(self.key, int)
            return _USER_TAG.pack(self.key)
        if self.kind == "users":
            assert isinstance(self.key, tuple)
            return _USER_COUNT.pack(len(self.key)) + struct.pack(f">{len(self.key)}Q", *self.key)
        return b""

    def _encode_v2(self) -> bytes:
        """_encode_v2: 4 header bytes (version 2, kind, policy, opcode), the key, the pacing
        (pace id, spread, rate, nodes), then the payload."""
        head = _HEAD2.pack(
            _WIRE_VERSION_PACED, _KINDS.index(self.kind), POLICIES[self.policy], self.opcode
        )
        pace = _PACE.pack(self.pace_id, self.spread, self.rate, self.nodes)
        return b"".join((head, self._encode_key(), pace, self.payload))

    @classmethod
    def decode(cls, data: bytes | bytearray | memoryview) -> Envelope:
        """decode parses the output of `encode`.

        Raises:
            ValueError: malformed input (and never anything else).
        """
        view = memoryview(data)
        if len(view) < _HEAD.size:
            raise ValueError("Envelope.decode: truncated header")
        if view[0] == _WIRE_VERSION_POSITION:
            return cls._decode_v3(view)
        if view[0] == _WIRE_VERSION_PACED:
            return cls._decode_v2(view)
        version, flags, opcode = _HEAD.unpack_from(view)
        if version != _WIRE_VERSION or flags & 3 == 3 or flags >> 2 not in _POLICY_BY_VALUE:
            raise ValueError("Envelope.decode: unknown version or flags")
        kind, policy = _KINDS[flags & 3], _POLICY_BY_VALUE[flags >> 2]
        key, offset = _decode_key(kind, view, _HEAD.size)
        return cls(kind, key, opcode, bytes(view[offset:]), policy)

    @classmethod
    def _decode_v3(cls, view: memoryview) -> Envelope:
        size = view[1]
        try:
            epoch, _, offset = str(view[2 : 2 + size], "ascii").rpartition(":")
            number = int(offset)
        except (UnicodeDecodeError, ValueError):
            raise ValueError("Envelope.decode: bad position") from None
        if len(view) < 2 + size + 1 or view[2 + size] == _WIRE_VERSION_POSITION:
            raise ValueError("Envelope.decode: truncated or nested position")
        inner = cls.decode(view[2 + size :])
        if not epoch or inner.stream is None:
            raise ValueError("Envelope.decode: a position needs an epoch and a stream")
        return inner.with_position(epoch, number)

    @classmethod
    def _decode_v2(cls, view: memoryview) -> Envelope:
        if len(view) < _HEAD2.size:
            raise ValueError("Envelope.decode: truncated header")
        _, kind_index, policy_value, opcode = _HEAD2.unpack_from(view)
        if kind_index >= len(_KINDS) or policy_value not in _POLICY_BY_VALUE:
            raise ValueError("Envelope.decode: unknown kind or policy")
        kind = _KINDS[kind_index]
        key, offset = _decode_key(kind, view, _HEAD2.size)
        try:
            pace_id, spread, rate, nodes = _PACE.unpack_from(view, offset)
        except struct.error:
            raise ValueError("Envelope.decode: truncated pacing") from None
        payload = bytes(view[offset + _PACE.size :])
        policy = _POLICY_BY_VALUE[policy_value]
        return cls(kind, key, opcode, payload, policy, spread, rate, nodes, pace_id)


def frame_data(data: str | bytes | bytearray | memoryview) -> tuple[int, bytes]:
    """frame_data returns (opcode, payload): str is sent as text, bytes-like as binary."""
    if isinstance(data, str):
        return OPCODE_TEXT, data.encode("utf-8")
    return OPCODE_BINARY, bytes(data)


def _check_key(kind: Kind, key: object) -> None:
    if kind == "topic":
        if not isinstance(key, str) or len(key.encode()) > _MAX_TOPIC_BYTES:
            raise ValueError("Envelope: a topic key is a str of at most 65535 UTF-8 bytes")
    elif kind in _TAG_KINDS:
        if not _is_tag(key):
            raise ValueError("Envelope: a user key, pace id or query id is an int in 0..2**64-1")
    elif kind == "users":
        if not isinstance(key, tuple) or len(key) > _MAX_USERS or not all(map(_is_tag, key)):
            raise ValueError("Envelope: a users key is a tuple of ints in 0..2**64-1")
    elif key is not None:
        raise ValueError("Envelope: a broadcast has no key")


def _is_tag(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= _MAX_USER_TAG


def _check_pace(spread: float, rate: float, nodes: int, pace_id: int) -> None:
    if not (0 <= spread < math.inf and 0 <= rate < math.inf):  # NaN fails too
        raise ValueError("Envelope: spread and rate are finite numbers >= 0")
    if spread and rate:
        raise ValueError("Envelope: give spread or rate, not both")
    if not (isinstance(nodes, int) and 1 <= nodes <= _MAX_NODES) or not _is_tag(pace_id):
        raise ValueError("Envelope: nodes is in 1..65535 and pace_id in 0..2**64-1")


class ReadWaiter:
    """ReadWaiter is a history read waiting for its answer in delivery order (a ProcessBus
    worker's read answered by the parent, a RedisBus read's marker coming back).

    The bus's delivering thread answers it, taking the caller's lock first (see
    BusBase.history_read); the caller may give up at its deadline instead (wait returns
    None). Exactly one of the two happens.
    """

    __slots__ = ("lock", "reply", "done", "abandoned", "mutex")

    def __init__(self, lock: threading.Lock | None) -> None:
        self.lock = lock
        self.reply: bytes | None = None
        self.done = threading.Event()
        self.abandoned = False
        self.mutex = threading.Lock()

    def answer(self, reply: bytes) -> None:
        """answer hands reply over (on the delivering thread), after taking the lock."""
        with self.mutex:
            if self.abandoned:
                return
            if self.lock is not None:
                self.lock.acquire()  # released by the caller, after its replay
            self.reply = reply
            self.done.set()

    def wait(self, timeout: float) -> bytes | None:
        """wait returns the reply, or None when none came within timeout (given up)."""
        self.done.wait(timeout)
        with self.mutex:
            if not self.done.is_set():
                self.abandoned = True
            return self.reply


def read_holding(lock: threading.Lock | None, read: Callable[[], Any]) -> Any:
    """read_holding takes lock (if any), then reads: on success the caller holds the lock,
    on failure it is released again and the error goes on."""
    if lock is None:
        return read()
    lock.acquire()
    try:
        return read()
    except BaseException:
        lock.release()
        raise


def position_head(epoch: str, offset: int) -> bytes:
    """position_head is the version 3 head for a stream position (see Envelope.encode)."""
    text = f"{epoch}:{offset}".encode("ascii")
    return bytes((_WIRE_VERSION_POSITION, len(text))) + text


def _check_position(epoch: str, offset: int) -> None:
    if not isinstance(epoch, str) or len(epoch) > _MAX_EPOCH or not epoch.isascii():
        raise ValueError("Envelope: an epoch is an ASCII str of at most 64 characters")
    if ":" in epoch or not (isinstance(offset, int) and 0 <= offset < 2**63):
        raise ValueError("Envelope: an epoch has no ':' and an offset is in 0..2**63-1")
    if bool(epoch) != bool(offset):
        raise ValueError("Envelope: a position has both an epoch and an offset >= 1")


def _decode_key(
    kind: Kind, view: memoryview, offset: int
) -> tuple[str | int | tuple[int, ...] | None, int]:
    try:
        if kind == "topic":
            (length,) = _TOPIC_LEN.unpack_from(view, offset)
            start = offset + _TOPIC_LEN.size
            if start + length > len(view):
                raise ValueError("Envelope.decode: truncated topic")
            return str(view[start : start + length], "utf-8"), start + length
        if kind in _TAG_KINDS:
            (tag,) = _USER_TAG.unpack_from(view, offset)
            return int(tag), offset + _USER_TAG.size
        if kind == "users":
            (count,) = _USER_COUNT.unpack_from(view, offset)
            start = offset + _USER_COUNT.size
            if start + 8 * count > len(view):
                raise ValueError("Envelope.decode: truncated users")
            return struct.unpack_from(f">{count}Q", view, start), start + 8 * count
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"Envelope.decode: bad key: {exc}") from None
    return None, offset


#: Deliver is a node's delivery callback: it fans one envelope out to the node's connections
#: and returns how many took it (None: not counted). It must be thread-safe; buses call it
#: from their own threads.
Deliver = Callable[[Envelope], "int | None"]


@dataclass
class BusStats:
    """BusStats holds the counters of one bus in one process, for the metrics endpoint.

    Counters only grow; ``buffered`` and ``buffered_bytes`` are gauges. ``published``: envelopes
    accepted by publish(); ``refused``: publish() calls that raised BusUnavailable;
    ``delivered``: envelopes handed to this node's deliver; ``deliver_errors``: deliver raised
    (logged, delivery goes on); ``relayed``: envelopes a ProcessBus parent passed on;
    ``dropped``: envelopes given up after being accepted (a ProcessBus worker queue overflow,
    a RedisBus buffer still full at close); ``missed``: envelopes of other nodes known lost
    (a RedisBus sequence gap); ``duplicates``: re-sent envelopes recognised and skipped;
    ``malformed``: undecodable input; ``disconnects``/``reconnects``: links lost and regained;
    ``peers`` (a gauge): subscribers a RedisBus last saw on its channel, itself included;
    ``unserved``: envelopes for a user with no connection on this node, or a topic with no
    member here, dropped undecoded.
    """

    published: int = 0
    refused: int = 0
    delivered: int = 0
    deliver_errors: int = 0
    relayed: int = 0
    dropped: int = 0
    missed: int = 0
    duplicates: int = 0
    malformed: int = 0
    disconnects: int = 0
    reconnects: int = 0
    buffered: int = 0
    buffered_bytes: int = 0
    peers: int = 0
    unserved: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, amount: int = 1) -> None:
        """add increments counter ``name`` by ``amount`` (negative for the gauges only)."""
        with self._lock:
            setattr(self, name, getattr(self, name) + amount)

    def set(self, name: str, value: int) -> None:
        """set sets gauge ``name`` to ``value``."""
        with self._lock:
            setattr(self, name, value)

    def snapshot(self) -> dict[str, int]:
        """snapshot returns a consistent copy of every counter, keyed by name."""
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name[0] != "_"}

    def _reset_lock(self) -> None:
        # After fork() the lock may have been held by a thread that no longer exists.
        self._lock = threading.Lock()


@runtime_checkable
class Bus(Protocol):
    """Bus is what a gateway needs from a message bus.

    ``start(deliver)`` begins delivering every envelope of the deployment to this node;
    ``publish(envelope)`` is callable from any thread and raises
    `lowmemws.errors.BusUnavailable` when the bus cannot take the envelope (nothing was
    delivered anywhere then, so a retry never duplicates); it returns what this node's
    deliver returned if the bus delivered to this node before publish returned, else 0;
    ``close()`` stops the bus. An optional ``may_block = False`` attribute says publish
    never waits, so Gateway.apublish calls it directly instead of in a thread. An optional
    ``node_count()`` says how many nodes a publish reaches (1 when absent): a paced send
    with a rate gives each node that share of it.
    """

    stats: BusStats

    def start(self, deliver: Deliver) -> None:
        """start begins delivering to this node through ``deliver``."""

    def publish(self, envelope: Envelope) -> int:
        """publish sends ``envelope`` to every node, this one included; returns the count
        this node's deliver gave if it ran before publish returned, else 0."""

    def close(self) -> None:
        """close stops delivery and releases the bus's threads and sockets."""


class BusBase:
    """BusBase is the common part of the buses: the stats and the asyncio helper."""

    stats: BusStats
    may_block: bool = True
    """may_block: publish may wait (for a peer process or the network); Gateway.apublish
    then calls it in a thread. False for a bus whose publish only queues or fans out."""

    read_settles: bool = False
    """read_settles: when history_read returns, every message its result holds has been
    delivered here or never will be (RedisBus: the read's marker comes behind them on the
    channel, and a node not subscribed then never gets them), so a resume replays the whole
    result. False: a message may be stored and not yet delivered here (LocalBus stores,
    then delivers), so a resume replays only up to what this node delivered."""

    #: presence_address is where answers to this node's queries go (its node id on Redis).
    presence_address: bytes = bytes(16)

    def __init__(self) -> None:
        self.stats = BusStats()
        self._deliver: Deliver | None = None
        #: queries holds the presence queries this node asked and still waits for.
        self.queries = Queries()

    def ask(self, envelope: Envelope, timeout: float) -> Tally:
        """ask publishes a query envelope (see `query_envelope`) and waits up to timeout
        seconds for the answers of every node it reached.

        Raises:
            BusUnavailable: the bus cannot take the query.
        """
        query = Query.parse(envelope)
        self.queries.open(query.query_id, self._answers_expected())
        try:
            self.publish(envelope)
        except BaseException:
            self.queries.wait(query.query_id, 0)  # forget it
            raise
        return self.queries.wait(query.query_id, timeout)

    def answer(self, query: Query, count: int) -> None:
        """answer gives this node's count to the node that asked query (here: this node; the
        buses that reach other nodes route it to the asker)."""
        if query.query_id:
            self.queries.answer(query.query_id, count)

    def _take_answer(self, envelope: Envelope) -> None:
        """_take_answer counts an "answer" envelope for the query it answers (a malformed
        one is counted as such)."""
        if envelope.kind != "answer" or len(envelope.payload) != _COUNT.size:
            self.stats.add("malformed")
            return
        assert isinstance(envelope.key, int)
        self.queries.answer(envelope.key, _COUNT.unpack(envelope.payload)[0])

    def _answers_expected(self) -> int | None:
        """_answers_expected: how many nodes answer a query (None: learned once it is sent)."""
        return self.node_count()

    def publish(self, envelope: Envelope) -> int:  # pragma: no cover - overridden
        """publish sends ``envelope`` to every node; each bus overrides it."""
        raise NotImplementedError

    def node_count(self) -> int:
        """node_count is how many nodes a publish reaches, this one included (at least 1)."""
        return 1

    def enable_history(self, history: Any) -> None:
        """enable_history makes every later publish of a topic or user message store it in
        its stream's history before delivering it with its position (issue 12). A Gateway
        calls it with its Config.history before start (before forking workers).

        Raises:
            NotImplementedError: this bus keeps no history.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no history")

    def history_read(
        self,
        stream: str,
        after: int,
        max_count: int,
        max_bytes: int,
        lock: threading.Lock | None = None,
    ) -> Any:
        """history_read returns the `_history.ReadResult` of stream after offset ``after``:
        at most max_count messages and max_bytes of entries.

        ``lock`` (the lock this node's deliveries of the stream hold, see _resume) is held
        when it returns: taken at a moment when this node has delivered exactly what the
        result holds or less, so nothing is delivered between the read and its release. It
        is not held when history_read raises.

        Raises:
            BusUnavailable: the history cannot be reached now.
            NotImplementedError: this bus keeps no history.
        """
        raise NotImplementedError(f"{type(self).__name__} keeps no history")

    async def apublish(self, envelope: Envelope) -> int:
        """apublish is `publish` for asyncio callers: it runs in the loop's default executor,
        so a slow local fan-out never stalls the caller's event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self.publish, envelope)

    def _deliver_safely(self, envelope: Envelope) -> int:
        """Deliver from a bus thread: a failing callback is logged and counted, not fatal.
        Returns the callback's count (0 when it failed or did not count). An answer to a
        presence query goes to `queries` instead (also in a process without connections)."""
        if envelope.kind == "answer":
            self._take_answer(envelope)
            return 0
        deliver = self._deliver
        if deliver is None:
            return 0
        try:
            count = deliver(envelope)
        except Exception:
            self.stats.add("deliver_errors")
            log.exception("lowmemws bus: deliver callback failed")
            return 0
        self.stats.add("delivered")
        return count or 0


@dataclass(frozen=True, slots=True)
class Query:
    """Query is a decoded "online" or "kick" envelope: the user tag asked about, the query id
    (0: no answer wanted), the asking node's address, and a kick's close code and reason."""

    kind: Kind
    tag: int
    query_id: int
    asker: bytes
    code: int = 0
    reason: bytes = b""

    @classmethod
    def parse(cls, envelope: Envelope) -> Query:
        """parse decodes a query envelope.

        Raises:
            ValueError: not a query, or a payload too short for one.
        """
        payload, key = envelope.payload, envelope.key
        if envelope.kind not in QUERY_KINDS or not isinstance(key, int):
            raise ValueError(f"Query.parse: a {envelope.kind!r} envelope is not a query")
        if len(payload) < _QUERY.size + (_KICK.size if envelope.kind == "kick" else 0):
            raise ValueError("Query.parse: truncated payload")
        query_id, asker = _QUERY.unpack_from(payload)
        if envelope.kind != "kick":
            return cls(envelope.kind, key, query_id, asker)
        (code,) = _KICK.unpack_from(payload, _QUERY.size)
        return cls("kick", key, query_id, asker, code, payload[_QUERY.size + _KICK.size :])


def query_envelope(
    kind: Kind, tag: int, query_id: int, asker: bytes, code: int = 0, reason: bytes = b""
) -> Envelope:
    """query_envelope builds an "online" or "kick" envelope (code and reason: kick only);
    asker is a 16-byte address the bus routes the answers by."""
    payload = _QUERY.pack(query_id, asker)
    if kind == "kick":
        payload += _KICK.pack(code) + reason
    return Envelope(kind, tag, OPCODE_BINARY, payload)


def is_encoded_query(data: bytes) -> bool:
    """is_encoded_query tells from its first two bytes whether an encoded envelope is a
    presence query (so a relay need not decode every envelope to find them)."""
    kinds = {_KINDS.index(kind) for kind in QUERY_KINDS}
    return len(data) > 1 and data[0] == _WIRE_VERSION_PACED and data[1] in kinds


def answer_envelope(query_id: int, count: int) -> Envelope:
    """answer_envelope is one node's answer to query_id: its count."""
    return Envelope("answer", query_id, OPCODE_BINARY, _COUNT.pack(count))
