"""Gateway: the application's entry point; it wires the roles together.

The roles live in their own modules: the C server and its return conventions
(_c_server), the loop that hands C events to the hooks (_loop), the upgrade decision
(handshake), the listening sockets (_listen) and the worker-process supervisor
(_supervisor). The Gateway keeps the hooks, publishing and the figures.

The loop thread owns the sockets. Every other method may be called from any thread; the
C runtime serialises access with one lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import hashlib
import math
import secrets
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

from . import metrics
from ._aio import AsyncioHost
from ._c_server import CServer, c_config
from ._constants import POLICIES
from ._history import History
from ._hooks import CloseHook, ConnectHook, Hooks, HttpHook, MessageHook, OpenHook
from ._listen import bind_listeners
from ._loop import EventLoop
from ._presence import answer_query, ask_kick, ask_online
from ._resume import Resumer
from ._routes import builtin_response
from ._routing import user_partition
from ._signals import STOP_SIGNALS, stop_signals_call
from ._supervisor import Supervisor
from ._user_ids import UserId, UserIds
from ._wire_envelope import ENVELOPE_PROTOCOL, RESYNC_FRAME, message_frame
from .bus import QUERY_KINDS, Bus, BusBase, Envelope, LocalBus, Policy, ProcessBus
from .close_codes import CloseCode, close_reason_bytes
from .config import Config
from .connection import Connection
from .errors import BusUnavailable, TLSError

ConnectHookT = TypeVar("ConnectHookT", bound=ConnectHook)
MessageHookT = TypeVar("MessageHookT", bound=MessageHook)
OpenHookT = TypeVar("OpenHookT", bound=OpenHook)
CloseHookT = TypeVar("CloseHookT", bound=CloseHook)
HttpHookT = TypeVar("HttpHookT", bound=HttpHook)

_MAX_SPREAD = 1e6  # seconds (11.6 days); the C runtime refuses more than 1e7
#: PRESENCE_TIMEOUT is how long online() and disconnect_user() wait for the nodes (seconds).
PRESENCE_TIMEOUT = 2.0


def _bus_base(bus: Bus) -> BusBase:
    """_bus_base: presence needs the query machinery every lowmemws bus has (BusBase)."""
    if not isinstance(bus, BusBase):
        raise TypeError(f"online/disconnect_user need a lowmemws bus, not {type(bus).__name__}")
    return bus


def _add_signal_handlers(
    loop: asyncio.AbstractEventLoop, callback: Callable[[], None]
) -> tuple[signal.Signals, ...]:
    """_add_signal_handlers makes SIGTERM/SIGINT call callback on loop; only in the main
    thread (elsewhere Python cannot, and the application owns signals)."""
    if threading.current_thread() is not threading.main_thread():
        return ()
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, callback)
    return STOP_SIGNALS


#: The thread switch interval run() sets (seconds): see Gateway.run.
LOOP_SWITCH_INTERVAL = 0.0005
_PYTHON_SWITCH_INTERVAL = 0.005  # CPython's default


@contextlib.contextmanager
def _loop_switch_interval() -> Iterator[None]:
    """_loop_switch_interval sets LOOP_SWITCH_INTERVAL while the block runs, if the
    interval is still CPython's default (an application's own choice is kept)."""
    previous = sys.getswitchinterval()
    if previous != _PYTHON_SWITCH_INTERVAL:
        yield
        return
    sys.setswitchinterval(LOOP_SWITCH_INTERVAL)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


class Gateway:
    """Gateway is a WebSocket server for many mostly idle connections.

    Hooks are set with the decorator methods (``@gateway.on_message``), one of each:

    - ``on_connect(request) -> Accept | Reject | None`` authorises an upgrade (None
      accepts); the request is valid only during the call.
    - ``on_open(conn)``: the connection is open (the 101 is sent): send a greeting here.
    - ``on_message(conn, message)``: a complete message, str for text, bytes for binary.
    - ``on_close(conn, code)``: a connection ended (1006 when no close frame came).
    - ``on_http(request) -> Response | None``: a plain HTTP request on the same port;
      None falls back to the built-in /healthz and /metrics, else 404.

    Any hook may be ``async def``: it runs on an asyncio loop (the gateway's own, or the
    caller's with ``await serve()``) and may await I/O (a session store, a
    database) without stalling anyone. A plain hook runs inline, on the loop thread,
    when ``Config.hook_threads`` is 0 (the fastest way for a hook that never blocks; ONE
    THAT BLOCKS STALLS EVERY CONNECTION OF THE PROCESS), else on one of that many threads.
    Either way one connection's hooks run one at a time, in order (on_connect, on_open,
    its messages, on_close), and while an upgrade or HTTP request waits for its hook it
    is parked in C, under ``handshake_timeout`` (408 when the hook is slower). Hook calls
    off the loop are bounded by ``Config.hook_queue``: at the bound reading and accepting
    wait, nothing is dropped.

    A hook that raises is logged; an upgrade or request it was deciding gets HTTP 500.
    ``host`` may be one address or several (IPv4 and IPv6); ``processes`` > 1 forks
    SO_REUSEPORT worker processes under a supervising parent (Linux). Every tunable is a
    field of ``config``; ``bus`` carries publishes between processes and machines
    (default: LocalBus for one process, ProcessBus for several).
    """

    def __init__(
        self,
        host: str | Sequence[str] = "127.0.0.1",
        port: int = 8080,
        *,
        processes: int = 1,
        config: Config | None = None,
        bus: Bus | None = None,
    ) -> None:
        self.hosts: tuple[str, ...] = (host,) if isinstance(host, str) else tuple(host)
        self.port = port
        self.processes = processes
        self.config = _with_envelope_protocol(config or Config())
        self._resumer: Resumer | None = None
        self._hooks = Hooks()
        self._bus: Bus | None = bus
        self._server = CServer()
        # str user ids: the key the deployment shares (the bus's, for RedisBus), else a
        # random one that forked worker processes inherit
        self._server.user_ids = UserIds(getattr(bus, "user_key", None))
        self._loop: EventLoop | None = None
        self._supervisor: Supervisor | None = None
        self._stats_views: list[Any] = []
        self._listeners: list[socket.socket] = []
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._aio = AsyncioHost()  # serve() swaps in the caller's loop
        self.worker_index = 0

    # ------------------------------------------------------------------ hooks

    def on_connect(self, fn: ConnectHookT) -> ConnectHookT:
        """on_connect registers the upgrade hook, plain or async def (decorator).

        Raises:
            TypeError: fn is not callable.
        """
        self._hooks.set("connect", fn)
        return fn

    def on_message(self, fn: MessageHookT) -> MessageHookT:
        """on_message registers the message hook, plain or async def (decorator).

        Raises:
            TypeError: fn is not callable.
        """
        self._hooks.set("message", fn)
        return fn

    def on_open(self, fn: OpenHookT) -> OpenHookT:
        """on_open registers the hook called once a connection is open, plain or async def
        (decorator); it runs before any of the connection's messages reach on_message.

        Raises:
            TypeError: fn is not callable.
        """
        self._hooks.set("open", fn)
        return fn

    def on_close(self, fn: CloseHookT) -> CloseHookT:
        """on_close registers the close hook, plain or async def (decorator).

        Raises:
            TypeError: fn is not callable.
        """
        self._hooks.set("close", fn)
        return fn

    def on_http(self, fn: HttpHookT) -> HttpHookT:
        """on_http registers the plain HTTP hook, plain or async def (decorator).

        Raises:
            TypeError: fn is not callable.
        """
        self._hooks.set("http", fn)
        return fn

    # ------------------------------------------------------------------ publishing

    def subscribe(self, conn: Connection, topic: str) -> bool:
        """subscribe adds conn to topic (no Python object is kept per member)."""
        return self._server.subscribe(conn.fd, conn.gen, topic)

    def unsubscribe(self, conn: Connection, topic: str) -> bool:
        """unsubscribe removes conn from topic; True if it was a member."""
        return self._server.unsubscribe(conn.fd, conn.gen, topic)

    def topic_size(self, topic: str) -> int:
        """topic_size is the number of members of topic in this process."""
        return self._server.topic_size(topic)

    def publish(
        self,
        topic: str,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """publish sends data to every member of topic, on every node of the bus.

        Thread-safe. ``policy`` says what happens to a member over its write limit:
        "drop" (it misses this message), "close" (closed with 1008) or "latest" (only the
        newest pending message of the topic is kept).

        Pacing (the call still returns at once): ``spread=SECONDS`` spreads the deliveries
        evenly over that time on every node; ``rate=PER_SECOND`` caps them, each of the bus's
        nodes taking an equal share. ``pace_id`` names the paced send for `cancel_paced`.
        See "Paced fan-out" in the README for which members get it.

        Returns, whatever the bus, the number of connections of this process that took
        the message (sent or queued) before publish returned; for a paced send, the
        members of this process it will go to. LocalBus and RedisBus deliver to this
        process in the caller's thread, so that is every member here; ProcessBus delivers
        to every worker, this one too, on its reader thread, so it is 0. Other processes
        and machines are never counted: their delivery is the bus's.

        Raises:
            BusUnavailable: the bus cannot take the message; nothing was delivered.
            ValueError: an unknown policy, a topic longer than 65535 UTF-8 bytes, spread
                and rate both given, either not > 0 (or spread over 1e6 s), pace_id
                without either, or a pacing with history on (not supported yet).
        """
        envelope = Envelope.for_topic(topic, data, policy=policy)
        return self._publish(self._paced(envelope, spread, rate, pace_id))

    def send_to_user(
        self,
        user: UserId,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """send_to_user sends data to every connection of user, on every node.

        user is an id as Accept(user=...) gave it (an int, a str) or a `UserTag` from
        ``conn.user``. Like publish (the same policies, pacing and return value); user 0
        means no user.

        Raises:
            BusUnavailable: the bus cannot take the message; nothing was delivered.
            ValueError: an unknown policy, an int user outside 0..2**63-1, an empty str,
                or a bad pacing.
            TypeError: a user that is neither an int, a str nor a UserTag.
        """
        if spread is not None or rate is not None or pace_id is not None:
            return self.send_to_users((user,), data, policy, spread=spread, rate=rate,
                                      pace_id=pace_id)  # fmt: skip
        tag = self._server.user_ids.tag(user)
        return self._publish(Envelope.for_user(tag, data, policy=policy))

    def send_to_users(
        self,
        users: Iterable[UserId],
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """send_to_users sends data to every connection tagged with any of users, on every
        node: one envelope and one frame for the whole batch (a user listed twice gets it
        once). With history on, one message per user instead: each is stored in its user's
        stream and reaches that user's envelope clients with its own position.

        Like publish (the same policies, pacing and return value).

        Raises:
            BusUnavailable: the bus cannot take the message; nothing was delivered.
            ValueError: an unknown policy, a bad user id (see send_to_user), or a bad pacing
                (with history on, any pacing of several users: docs/limits.md).
            TypeError: a user that is neither an int, a str nor a UserTag.
        """
        tags = tuple(map(self._server.user_ids.tag, users))
        envelope = self._paced(Envelope.for_users(tags, data, policy=policy), spread, rate,
                               pace_id)  # fmt: skip
        if self.config.history is None or envelope.paced:
            return self._publish(envelope)
        return sum(map(self._publish, envelope.per_user()))  # each user's stream and position

    def broadcast(
        self,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """broadcast sends data to every open connection, on every node.

        Like publish (the same policies, pacing and return value).

        Raises:
            BusUnavailable: the bus cannot take the message; nothing was delivered.
            ValueError: an unknown policy, or a bad pacing.
        """
        envelope = Envelope.for_all(data, policy=policy)
        return self._publish(self._paced(envelope, spread, rate, pace_id))

    def cancel_paced(self, pace_id: str) -> int:
        """cancel_paced ends every paced send named pace_id, on every node of the bus: the
        members they had not reached yet do not get them (counted in
        ``lowmemws_paced_cancelled_total``).

        Returns the members of this process that will not get them (with LocalBus and
        RedisBus; 0 with ProcessBus, which cancels on its reader threads).

        Raises:
            BusUnavailable: the bus cannot take the cancel.
        """
        return self._publish(Envelope.for_cancel(pace_number(pace_id)))

    def _paced(
        self, envelope: Envelope, spread: float | None, rate: float | None, pace_id: str | None
    ) -> Envelope:
        """_paced adds the pacing to envelope (unchanged when there is none)."""
        node_count = getattr(self._bus, "node_count", lambda: 1)
        history = self.config.history is not None
        return paced_envelope(envelope, spread, rate, pace_id, node_count, history=history)

    async def apublish(
        self,
        topic: str,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """apublish is publish for asyncio code (the same pacing keywords).

        With a bus that never waits (LocalBus, RedisBus) it is publish itself, called on
        the caller's loop (the local fan-out costs a few microseconds per member); with one
        that may wait (ProcessBus in a worker, a bus without ``may_block = False``) it runs
        in a thread. Calling publish directly from a coroutine is as good with the former.
        """
        envelope = Envelope.for_topic(topic, data, policy=policy)
        return await self._apublish(self._paced(envelope, spread, rate, pace_id))

    async def asend_to_user(
        self,
        user: UserId,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """asend_to_user is send_to_user for asyncio code (see apublish)."""
        tag = self._server.user_ids.tag(user)
        if spread is None and rate is None and pace_id is None:
            return await self._apublish(Envelope.for_user(tag, data, policy=policy))
        envelope = Envelope.for_users((tag,), data, policy=policy)
        return await self._apublish(self._paced(envelope, spread, rate, pace_id))

    async def abroadcast(
        self,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> int:
        """abroadcast is broadcast for asyncio code (see apublish)."""
        envelope = Envelope.for_all(data, policy=policy)
        return await self._apublish(self._paced(envelope, spread, rate, pace_id))

    async def _apublish(self, envelope: Envelope) -> int:
        if getattr(self._bus, "may_block", True):
            return await asyncio.to_thread(self._publish, envelope)
        return self._publish(envelope)

    def _publish(self, envelope: Envelope) -> int:
        if self._bus is None:
            return 0  # not started: no connection to reach, no bus to carry it yet
        return self._bus.publish(envelope)

    def _deliver(self, envelope: Envelope) -> int:
        """_deliver fans an envelope out to this process's connections (the bus callback)."""
        enveloped = envelope.kind in ("topic", "user", "broadcast") and not envelope.paced
        if self._resumer is not None and enveloped:
            return self._deliver_enveloped(envelope, self._resumer, self._fan_out_enveloped)
        policy = POLICIES[envelope.policy]
        payload = envelope.payload
        if envelope.kind == "cancel":
            assert isinstance(envelope.key, int)
            return self._server.paced_cancel(envelope.key)
        if envelope.kind in QUERY_KINDS:
            bus = self._bus if isinstance(self._bus, BusBase) else None
            return answer_query(self._server, bus, envelope)
        if envelope.paced and self._resumer is not None:
            return self._deliver_enveloped(envelope, self._resumer, self._paced_start)
        if envelope.paced or envelope.kind == "users":
            return self._paced_start(envelope, None)
        if envelope.kind == "topic":
            assert isinstance(envelope.key, str)
            return self._server.publish(envelope.key, envelope.opcode, payload, policy)
        if envelope.kind == "user":
            assert isinstance(envelope.key, int)
            return self._server.send_user(envelope.key, envelope.opcode, payload, policy)
        return self._server.broadcast(envelope.opcode, payload, policy)

    def _deliver_enveloped(
        self, envelope: Envelope, resumer: Resumer, send: Callable[[Envelope, bytes], int]
    ) -> int:
        """With history: each message also goes, as its envelope, to the clients of the
        envelope subprotocol (send: fanned out now, or paced), raw to the others, each frame
        built once. A stored one goes under its stream's stripe lock, so no resume replay of
        that stream interleaves with it, and counts as delivered from then on (see _resume):
        a paced step may still bring it to a client that resumed meanwhile, which drops it
        by its position (docs/envelope.md)."""
        stream = envelope.stream
        env = message_frame(envelope.opcode, envelope.payload, stream, envelope.epoch,
                            envelope.offset)  # fmt: skip
        if stream is None or not envelope.epoch:
            return send(envelope, env)
        with resumer.stripe(stream):
            count = send(envelope, env)
            resumer.delivered(stream, envelope.epoch, envelope.offset)
        return count

    def _paced_start(self, envelope: Envelope, env: bytes | None) -> int:
        """_paced_start hands a paced send (or a batch of users) to C: its frame, and env
        for the envelope clients when given."""
        key = envelope.key if envelope.kind != "broadcast" else None
        if isinstance(key, int):  # a paced send_to_user (with history: see paced_envelope)
            key = (key,)
        assert key is None or isinstance(key, str | tuple)
        pace = (envelope.pace_id, envelope.spread, envelope.node_rate)
        policy = POLICIES[envelope.policy]
        return self._server.paced_start(key, envelope.opcode, envelope.payload, policy, pace, env)

    def _fan_out_enveloped(self, envelope: Envelope, env: bytes) -> int:
        policy, payload, opcode = POLICIES[envelope.policy], envelope.payload, envelope.opcode
        if envelope.kind == "topic":
            assert isinstance(envelope.key, str)
            return self._server.publish_env(envelope.key, opcode, payload, env, policy)
        if envelope.kind == "user":
            assert isinstance(envelope.key, int)
            return self._server.send_user_env(envelope.key, opcode, payload, env, policy)
        return self._server.broadcast_env(opcode, payload, env, policy)

    def _start_history(self) -> None:
        """_start_history, in the process that serves (after any fork): the envelope
        subprotocol's fan-out and the resume replays."""
        history = self.config.history
        if history is None or self._loop is None:
            return
        self._server.envelopes = True
        self._resumer = Resumer(self._server, self._bus, history)
        self._loop.resumer = self._resumer
        self._resumer.start()
        if hasattr(self._bus, "on_resync"):
            self._bus.on_resync = functools.partial(  # type: ignore[union-attr]
                self._server.notify_envelope_clients, RESYNC_FRAME
            )

    # ------------------------------------------------------------------ presence and kick

    def online(self, user: UserId, *, timeout: float = PRESENCE_TIMEOUT) -> int:
        """online is the number of open connections of user on every node of the bus (every
        worker process, every machine on the redis-server), asked of the nodes now: nothing
        records presence anywhere. Blocks until every node answered (a few milliseconds over
        Redis); call it from a thread, or use aonline, not from an inline hook.

        With LocalBus the count of this process; before the gateway starts, 0.

        Raises:
            PresenceTimeout: not every node answered within timeout seconds (``count`` is
                what those that did hold).
            BusUnavailable: the bus cannot take the query.
            ValueError: a bad user id (see send_to_user).
            TypeError: the gateway's bus is not one of lowmemws's (a BusBase).
        """
        tag = self._server.user_ids.tag(user)
        bus = self._bus
        if bus is None or not tag:
            return 0
        return ask_online(_bus_base(bus), tag, timeout)

    async def aonline(self, user: UserId, *, timeout: float = PRESENCE_TIMEOUT) -> int:
        """aonline is online for asyncio code: the wait runs in a thread."""
        return await asyncio.to_thread(self.online, user, timeout=timeout)

    def disconnect_user(
        self,
        user: UserId,
        code: int = CloseCode.NORMAL_CLOSURE,
        reason: str = "",
        *,
        timeout: float = PRESENCE_TIMEOUT,
    ) -> int:
        """disconnect_user closes every connection of user on every node of the bus with
        close code and reason (the client's on_close sees them), and returns how many it
        closed. The kick travels like a publish: what the same caller published before it
        reaches the user's connections first. Blocks until every node confirmed (see
        online).

        Raises:
            ValueError: a code that may not be sent (1000-1003, 1007-1011, 3000-4999 may),
                a reason over 123 bytes of UTF-8, or a bad user id.
            PresenceTimeout: not every node confirmed within timeout seconds; the nodes the
                kick reached close the user's connections all the same (``count``: those
                that answered).
            BusUnavailable: the bus cannot take the kick; nothing was closed.
            TypeError: the gateway's bus is not one of lowmemws's (a BusBase).
        """
        tag = self._server.user_ids.tag(user)
        bus = self._bus
        if bus is None or not tag:
            close_reason_bytes(code, reason)
            return 0
        return ask_kick(_bus_base(bus), tag, code, reason, timeout)

    async def adisconnect_user(
        self,
        user: UserId,
        code: int = CloseCode.NORMAL_CLOSURE,
        reason: str = "",
        *,
        timeout: float = PRESENCE_TIMEOUT,
    ) -> int:
        """adisconnect_user is disconnect_user for asyncio code: the wait runs in a thread."""
        return await asyncio.to_thread(self.disconnect_user, user, code, reason, timeout=timeout)

    def positions(self, topics: Iterable[str] = (), user: UserId = 0) -> dict[str, tuple[str, int]]:
        """positions is where the history of each stream of topics and of user stands now:
        {stream: (epoch, offset)}, ("", 0) for a stream with no history yet (from its first
        message on), in the form lowmemws.js (option ``positions``) and `lowmemws.client`
        (``positions=``) resume from.

        Read it with the state the application hands a client (a page's mails) and pass it
        to the client: its first connection is then a resume, so it gets every message
        published after that state was read, even one published before it connects or while
        a connection drops before its first ``synced`` (docs/envelope.md).

        Raises:
            ValueError: history is off (Config.history), or a bad user id.
            BusUnavailable: the gateway is not started, or its history cannot be reached.
        """
        if self.config.history is None:
            raise ValueError("positions: history is off (Config.history is None)")
        tag = self._server.user_ids.tag(user)
        streams = [f"t:{topic}" for topic in topics] + ([f"u:{tag}"] if tag else [])
        bus = self._bus
        if not isinstance(bus, BusBase):  # not started (a custom Bus keeps no history)
            raise BusUnavailable("positions: the gateway is not started")
        found: dict[str, tuple[str, int]] = {}
        plain_read = getattr(bus, "history_position", None)
        for stream in streams:
            if plain_read is not None:  # RedisBus: no marker, nothing subscribed
                found[stream] = plain_read(stream)
                continue
            result = bus.history_read(stream, _PAST_EVERY_OFFSET, 0, 0)
            found[stream] = (result.epoch, result.last) if result.epoch else ("", 0)
        return found

    def partition_of(self, user: UserId) -> int:
        """partition_of is user's routing partition on RedisBus (0..lowmemws.bus.PARTITIONS-1),
        the same on every node and Publisher of the deployment. Hand it to the client (e.g.
        ``?p=N`` in its WebSocket URL) so a load balancer hashing it (nginx ``hash $arg_p
        consistent``) places each partition on one node: docs/scaling.md.

        Raises:
            ValueError: user is not a valid user id (an int outside 0..2**63-1, an empty str).
        """
        return user_partition(self._server.user_ids.tag(user))

    # ------------------------------------------------------------------ figures

    def stats(self) -> dict[str, Any]:
        """stats sums the runtime counters of every worker process."""
        return metrics.snapshot(self._stats_views)

    def metrics_text(self) -> str:
        """metrics_text is the Prometheus text of every worker process's counters."""
        counters: dict[str, int] = {}
        gauges: dict[str, int] = {}
        bus_stats = getattr(self._bus, "stats", None)
        if bus_stats is not None and hasattr(bus_stats, "snapshot"):
            for name, value in bus_stats.snapshot().items():
                if name in metrics.BUS_GAUGES:
                    gauges[f"bus_{name}"] = value
                else:
                    counters[f"bus_{name}_total"] = value
        if self._resumer is not None:  # streams replayed, resumed, told to refresh (issue 12)
            for name, value in self._resumer.stats().items():
                counters[f"history_{name}_total"] = value
        return metrics.render(self._stats_views, counters, gauges)

    @property
    def connection_count(self) -> int:
        """connection_count is the number of open connections in this process."""
        return self._server.connection_count

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """run serves until SIGTERM or SIGINT (or stop()), then closes clients with 1001.

        With processes > 1 it forks the worker processes and supervises them: a worker
        that dies is started again.

        The process is the gateway's, so run() also shortens Python's thread switch
        interval (sys.setswitchinterval) from the default 5 ms to LOOP_SWITCH_INTERVAL,
        unless the application set its own: the loop thread, back from a C call, then
        waits at most that long for the GIL while a hook thread or the asyncio thread
        computes (this kept the worst echo of a connected client during a storm of
        1,000 async on_connect calls at ~8-15 ms instead of ~15-35 ms here). start() and
        serve() leave the interval to the application.

        Raises:
            OSError: an address cannot be bound, or the C server cannot be made.
        """
        if self.processes > 1:
            self._supervise()
            return
        self._prepare_single()
        with stop_signals_call(self._request_stop), _loop_switch_interval():
            self._serve()

    async def serve(self, *, handle_signals: bool = True) -> None:
        """serve serves inside the running asyncio loop until stop(), a signal or
        cancellation, then closes clients with 1001 and returns.

        For an asyncio application (aiohttp, Starlette, ...) that holds a gateway: async
        hooks run on this loop, and handlers publish with ``gateway.publish`` directly.
        The sockets are still served by the gateway's own thread in C, so a busy
        application loop never delays heartbeats or fan-out. The port is bound before the
        first await (``gateway.port`` is known once the task has started).

        handle_signals: stop on SIGTERM/SIGINT as run() does (main thread only). The loop's
        own handlers for these two signals, if it had any, are replaced while serve() runs
        and removed when it returns; pass False when the application handles signals
        itself and calls stop().

        Raises:
            ValueError: processes > 1 (worker processes need run()).
            OSError: an address cannot be bound, or the C server cannot be made.
        """
        if self.processes != 1:
            raise ValueError("serve() runs one process; use run() for processes > 1")
        loop = asyncio.get_running_loop()
        self._aio = AsyncioHost(loop)
        self._prepare_single()
        finished = asyncio.Event()

        def serve_then_signal() -> None:
            try:
                self._serve()
            finally:
                loop.call_soon_threadsafe(finished.set)

        self._thread = threading.Thread(target=serve_then_signal, name="lowmemws-loop", daemon=True)
        signals = _add_signal_handlers(loop, self._request_stop) if handle_signals else ()
        self._thread.start()
        try:
            await finished.wait()
        finally:
            self._request_stop()
            for sig in signals:
                loop.remove_signal_handler(sig)
            if not finished.is_set():  # cancelled: still let the shutdown run on this loop
                await asyncio.shield(finished.wait())

    def start(self, timeout: float = 10.0) -> Gateway:
        """start serves in a background thread of this process and returns once listening.

        Raises:
            ValueError: processes > 1 (worker processes need run(): it supervises them).
            OSError: an address cannot be bound, or the C server cannot be made.
            RuntimeError: the loop did not start serving within timeout seconds (it is
                stopped again).
        """
        if self.processes != 1:
            raise ValueError("start() runs one process; use run() for processes > 1")
        self._prepare_single()
        self._thread = threading.Thread(target=self._serve, name="lowmemws-loop", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout
        while not self._ready.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop(timeout=1.0)
                raise RuntimeError("lowmemws: the gateway did not become ready")
        return self

    def __enter__(self) -> Gateway:
        """A Gateway is a context manager: ``with Gateway(...) as gw:`` is start()/stop()."""
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self, timeout: float | None = None) -> None:
        """stop closes every client with 1001 and ends the loop (and worker processes).

        It waits for the loop thread at most ``timeout`` seconds (default: the
        shutdown_timeout plus 5); calling it again, or before start, does no harm. Called
        on the loop serve() runs on, it does not wait: serve() returns once
        the shutdown is done (its on_close coroutines need that loop meanwhile).
        """
        self._request_stop()
        if self._supervisor is not None:
            self._supervisor.terminate()
        if self._aio.on_loop_thread():
            return
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.config.shutdown_timeout + 5)

    def reload_certificate(self, certfile: str | None = None, keyfile: str | None = None) -> None:
        """reload_certificate loads the TLS certificate and key again, without a restart.

        By default it rereads Config.certfile and Config.keyfile (renewed in place); other
        paths replace them. New handshakes use the new certificate; established connections
        keep theirs. One process only (``processes=1``): workers of a supervisor are
        restarted instead.

        Raises:
            TLSError: the gateway serves no TLS, runs several processes, or the files
                cannot be used (the old certificate then stays in use).
        """
        cert = certfile or self.config.certfile
        key = keyfile or self.config.keyfile
        if cert is None or key is None:
            raise TLSError("this gateway was not configured for TLS (Config.certfile)")
        if self.processes != 1:
            raise TLSError("reload_certificate works with processes=1 only")
        self._server.tls_configure(cert, key)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """wait_ready blocks until the gateway listens; False on timeout."""
        return self._ready.wait(timeout)

    def _request_stop(self) -> None:
        self._stopping.set()
        self._server.wake()

    def _prepare_single(self) -> None:
        self._bind(reuse_port=False)
        self._make_server(None)
        if self._bus is None:
            self._bus = LocalBus()
        _enable_history(self._bus, self.config.history)
        self._start_history()
        self._follow_interest()
        self._bus.start(self._deliver)

    def _follow_interest(self) -> None:
        """A bus that routes by interest (RedisBus) subscribes only where this process's hub
        has members (issue 15)."""
        follow = getattr(self._bus, "follow", None)
        if follow is not None:
            follow(self._server)

    def _bind(self, reuse_port: bool) -> None:
        self._listeners, self.port = bind_listeners(
            self.hosts, self.port, self.config.backlog, reuse_port
        )

    def _make_server(self, stats: Any) -> None:
        auto = (
            self._hooks.connect is None
            and self._hooks.open is None
            and self.config.origins is None
            and not self.config.subprotocols
        )
        self._server.open(c_config(self.config, auto_upgrade=auto), stats)
        if self.config.certfile is not None and self.config.keyfile is not None:
            self._server.tls_configure(self.config.certfile, self.config.keyfile)
        if not self._stats_views:
            self._stats_views = [self._server.stats()]
        for sock in self._listeners:
            self._server.listen_add(sock.fileno())
        fallback = functools.partial(builtin_response, metrics_text=self.metrics_text)
        self._loop = EventLoop(self._server, self._hooks, self.config, fallback, self._aio)

    def _serve(self) -> None:
        assert self._loop is not None
        try:
            self._loop.run(self._stopping, self._ready)
        finally:
            for sock in self._listeners:
                sock.close()
            if self._resumer is not None:
                self._resumer.stop()
            if self._bus is not None:  # the gateway's bus ends with it (buffered: counted)
                self._bus.close()
            self._aio.close()

    # ------------------------------------------------------------------ processes

    def _supervise(self) -> None:
        self._bind(reuse_port=True)  # holds the port (and learns it for port 0) ...
        for sock in self._listeners:
            sock.close()  # ... until the workers bind it again
        if self._bus is None:
            self._bus = ProcessBus(workers=self.processes)
        _enable_history(self._bus, self.config.history)  # before the fork: the parent keeps it
        self._supervisor = Supervisor(
            self.processes, self._run_worker, self._bus, self.config.shutdown_timeout
        )
        self._stats_views = self._supervisor.stats_views
        self._supervisor.run(self._stopping, self._ready)

    def _run_worker(self, index: int, stats: Any) -> None:
        """_run_worker serves in a forked worker process (the Supervisor calls it)."""
        self.worker_index = index
        self._supervisor = None
        self._bind(reuse_port=True)
        self._make_server(stats)
        assert self._bus is not None
        self._start_history()
        self._follow_interest()
        self._bus.start(self._deliver)
        with stop_signals_call(self._request_stop), _loop_switch_interval():
            self._serve()


def _enable_history(bus: Bus, history: History | None) -> None:
    """_enable_history has bus store the streams when history is on.

    Raises:
        TypeError: the bus keeps no history (it has no enable_history).
    """
    if history is None:
        return
    enable = getattr(bus, "enable_history", None)
    if enable is None:
        raise TypeError(f"Config.history is on but {type(bus).__name__} keeps no history")
    enable(history)


def _with_envelope_protocol(config: Config) -> Config:
    """_with_envelope_protocol offers the envelope subprotocol when history is on (after the
    application's own subprotocols, which keep their preference)."""
    if config.history is None or ENVELOPE_PROTOCOL in config.subprotocols:
        return config
    return dataclasses.replace(config, subprotocols=(*config.subprotocols, ENVELOPE_PROTOCOL))


_PAST_EVERY_OFFSET = 2**62  # a read after it holds no message, only the stream's position


def paced_envelope(
    envelope: Envelope,
    spread: float | None,
    rate: float | None,
    pace_id: str | None,
    node_count: Callable[[], int],
    *,
    history: bool = False,
) -> Envelope:
    """paced_envelope adds a pacing to envelope (unchanged when there is none): the one
    place publish keywords become a paced envelope, for the Gateway and the Publisher.
    node_count is asked only for a paced send (a rate is shared by the nodes it reaches).
    ``history``: the sender has history on: a paced send is stored first like any other
    (a publish in its topic's stream, a send_to_user in its user's), then paced; a paced
    batch of users is refused there (each user's copy would carry its own position, which
    one paced frame cannot).

    Raises:
        ValueError: spread and rate both given, either not > 0 (or spread over 1e6 s),
            pace_id without either, or with history on a paced send_to_users of more than
            one user (docs/limits.md).
    """
    if spread is None and rate is None:
        if pace_id is not None:
            raise ValueError("pace_id names a paced send: give spread or rate too")
        return envelope
    if history and envelope.kind == "users":
        envelope = _one_user(envelope)
    if spread is not None and rate is not None:
        raise ValueError("give spread or rate, not both")
    value = spread if spread is not None else rate
    if not (isinstance(value, int | float) and 0 < value < math.inf):
        raise ValueError("spread and rate are numbers > 0")
    if spread is not None and spread > _MAX_SPREAD:
        raise ValueError(f"spread is at most {_MAX_SPREAD:g} seconds")
    number = pace_number(pace_id) if pace_id is not None else secrets.randbits(64)
    nodes = node_count()
    return envelope.with_pace(float(spread or 0), float(rate or 0), max(1, nodes), number)


def _one_user(envelope: Envelope) -> Envelope:
    """_one_user is a batch of one user (a paced send_to_user) as that user's envelope, so
    history stores it in the user's stream.

    Raises:
        ValueError: a batch of several users (see paced_envelope).
    """
    assert isinstance(envelope.key, tuple)
    users = tuple(dict.fromkeys(tag for tag in envelope.key if tag))
    if len(users) > 1:
        raise ValueError(
            "a paced send_to_users (spread= or rate=) of several users is not supported with "
            "history on: each user's copy has its own stream position; pace a publish to a "
            "topic, or send to the users unpaced (docs/limits.md)"
        )
    if not users:
        return envelope
    return Envelope("user", users[0], envelope.opcode, envelope.payload, envelope.policy)


def pace_number(pace_id: str) -> int:
    """pace_number is the 64-bit id a pace_id travels as: the same on every node."""
    return int.from_bytes(hashlib.blake2b(pace_id.encode(), digest_size=8).digest(), "little")


def serve(
    on_message: MessageHook | None = None,
    *,
    host: str | Iterable[str] = "127.0.0.1",
    port: int = 8080,
    **kwargs: Any,
) -> None:
    """serve is the shortest way to run: a Gateway with one on_message hook, until SIGTERM.

    ``kwargs`` go to Gateway (processes, config, bus).

    Raises:
        OSError: an address cannot be bound, or the C server cannot be made.
    """
    gateway = Gateway(host if isinstance(host, str) else tuple(host), port, **kwargs)
    if on_message is not None:
        gateway.on_message(on_message)
    gateway.run()


__all__ = ["Gateway", "serve"]
