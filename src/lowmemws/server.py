"""Gateway: hooks, the loop that hands C events to them, publishing, worker processes.

The loop thread owns the sockets: it calls lmw_poll, which does all per-frame work in C
and returns only events that need the application. Every other method may be called from
any thread; the C runtime serialises access with one lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import mmap
import os
import signal
import socket
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from typing import Any

from . import metrics
from ._hooks import CloseHook, ConnectHook, Hooks, HttpHook, MessageHook, OpenHook
from ._native import ffi, lib
from .bus import Bus, Envelope, LocalBus, Policy, ProcessBus
from .config import POLICIES, Config
from .connection import Connection
from .handshake import Accept, Reject, Request, Response

log = logging.getLogger("lowmemws")


_POLL_MS = 250
_TOPIC_CACHE = 4096  # topic ids remembered (per topic, bounded; not per connection)
_EV_MESSAGE = int(lib.LMW_EV_MESSAGE)
_EV_UPGRADE = int(lib.LMW_EV_UPGRADE)
_EV_HTTP = int(lib.LMW_EV_HTTP)
_EV_CLOSED = int(lib.LMW_EV_CLOSED)
_ACCEPT = Accept()


class Gateway:
    """Gateway is a WebSocket server for many mostly idle connections.

    Hooks (set with the decorator methods, e.g. ``@gateway.on_message``):
      on_connect(request) -> Accept | Reject | None: authorise an upgrade (None accepts);
          the request is a borrowed view, valid only during the call.
      on_open(conn): the connection is open (the 101 is sent): send a greeting here.
      on_message(conn, message): a complete message, str for text, bytes for binary.
      on_close(conn, code): a connection ended (1006 when no close frame was received).
      on_http(request) -> Response | None: a plain HTTP request on the same port; None
          falls back to the built-in /healthz and /metrics, else 404.

    ``host`` may be one address or several (IPv4 and IPv6); ``processes`` > 1 forks
    SO_REUSEPORT worker processes under a supervising parent (Linux).
    """

    def __init__(
        self,
        host: str | Sequence[str] = "127.0.0.1",
        port: int = 8080,
        *,
        processes: int = 1,
        config: Config | None = None,
        bus: Bus | None = None,
        backlog: int = 4096,
    ) -> None:
        self.hosts: tuple[str, ...] = (host,) if isinstance(host, str) else tuple(host)
        self.port = port
        self.processes = processes
        self.config = config or Config()
        self.backlog = backlog
        self._hooks = Hooks()
        self._bus: Bus | None = bus
        self._topic_key = os.urandom(16)
        self._topic_ids: dict[str, int] = {}
        self._server: Any = None
        self._stats_views: list[Any] = []
        self._stats_map: mmap.mmap | None = None
        self._listeners: list[socket.socket] = []
        self._stopping = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: Any = None
        self._held: deque[tuple[Connection, str | bytes]] = deque()
        self._paused: set[tuple[int, int]] = set()
        self._children: dict[int, int] = {}
        self.worker_index = 0

    # ------------------------------------------------------------------ hooks

    def on_connect(self, fn: ConnectHook) -> ConnectHook:
        """on_connect registers the upgrade hook (decorator)."""
        self._hooks.connect = fn
        return fn

    def on_message(self, fn: MessageHook) -> MessageHook:
        """on_message registers the message hook (decorator)."""
        self._hooks.message = fn
        return fn

    def on_open(self, fn: OpenHook) -> OpenHook:
        """on_open registers the hook called once a connection is open (decorator)."""
        self._hooks.open = fn
        return fn

    def on_close(self, fn: CloseHook) -> CloseHook:
        """on_close registers the close hook (decorator)."""
        self._hooks.close = fn
        return fn

    def on_http(self, fn: HttpHook) -> HttpHook:
        """on_http registers the plain HTTP hook (decorator)."""
        self._hooks.http = fn
        return fn

    # ------------------------------------------------------------------ publishing

    def topic_id(self, topic: str) -> int:
        """topic_id is the 64-bit id the C hub knows topic by (a keyed BLAKE2b hash)."""
        known = self._topic_ids.get(topic)
        if known is not None:
            return known
        digest = hashlib.blake2b(topic.encode("utf-8"), digest_size=8, key=self._topic_key)
        topic_id = int.from_bytes(digest.digest(), "little") or 1
        if len(self._topic_ids) >= _TOPIC_CACHE:
            self._topic_ids.clear()
        self._topic_ids[topic] = topic_id
        return topic_id

    def subscribe(self, conn: Connection, topic: str) -> bool:
        """subscribe adds conn to topic (no Python object is kept per member)."""
        if self._server is None:
            return False
        return bool(lib.lmw_subscribe(self._server, conn.fd, conn.gen, self.topic_id(topic)) >= 0)

    def unsubscribe(self, conn: Connection, topic: str) -> bool:
        """unsubscribe removes conn from topic; True if it was a member."""
        if self._server is None:
            return False
        return bool(lib.lmw_unsubscribe(self._server, conn.fd, conn.gen, self.topic_id(topic)) > 0)

    def topic_size(self, topic: str) -> int:
        """topic_size is the number of members of topic in this process."""
        if self._server is None:
            return 0
        return int(lib.lmw_topic_size(self._server, self.topic_id(topic)))

    def publish(self, topic: str, data: str | bytes, policy: Policy = "drop") -> int:
        """publish sends data to every member of topic, on every node of the bus.

        Thread-safe. Returns the number of connections of this process reached (0 when the
        bus delivers asynchronously). Raises lowmemws.errors.BusUnavailable when the bus
        cannot take the message. policy: "drop", "close" (1008) or "latest".
        """
        return self._publish(Envelope.for_topic(topic, data, policy=policy))

    def send_to_user(self, user: int, data: str | bytes, policy: Policy = "drop") -> int:
        """send_to_user sends data to every connection tagged with user, on every node."""
        return self._publish(Envelope.for_user(user, data, policy=policy))

    def broadcast(self, data: str | bytes, policy: Policy = "drop") -> int:
        """broadcast sends data to every open connection, on every node."""
        return self._publish(Envelope.for_all(data, policy=policy))

    async def apublish(self, topic: str, data: str | bytes, policy: Policy = "drop") -> int:
        """apublish is publish for asyncio code: the bus may block, so it runs in a thread."""
        return await asyncio.to_thread(self.publish, topic, data, policy)

    async def asend_to_user(self, user: int, data: str | bytes, policy: Policy = "drop") -> int:
        """asend_to_user is send_to_user for asyncio code (run in a thread, like apublish)."""
        return await asyncio.to_thread(self.send_to_user, user, data, policy)

    async def abroadcast(self, data: str | bytes, policy: Policy = "drop") -> int:
        """abroadcast is broadcast for asyncio code (run in a thread, like apublish)."""
        return await asyncio.to_thread(self.broadcast, data, policy)

    def _publish(self, envelope: Envelope) -> int:
        bus = self._bus
        if bus is None or isinstance(bus, LocalBus):
            return self.deliver(envelope)
        bus.publish(envelope)
        return 0

    def _deliver_from_bus(self, envelope: Envelope) -> None:
        self.deliver(envelope)

    def deliver(self, envelope: Envelope) -> int:
        """deliver fans an envelope out to this process's connections (the bus callback)."""
        server = self._server
        if server is None:
            return 0
        policy = POLICIES[envelope.policy]
        payload = envelope.payload
        if envelope.kind == "topic":
            assert isinstance(envelope.key, str)
            n = lib.lmw_publish(
                server, self.topic_id(envelope.key), envelope.opcode, payload, len(payload), policy
            )
        elif envelope.kind == "user":
            assert isinstance(envelope.key, int)
            n = lib.lmw_send_user(
                server, envelope.key, envelope.opcode, payload, len(payload), policy
            )
        else:
            n = lib.lmw_broadcast(server, envelope.opcode, payload, len(payload), policy)
        return max(0, int(n))

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
        return metrics.render(self._stats_views, counters, gauges)

    @property
    def connection_count(self) -> int:
        """connection_count is the number of open connections in this process."""
        return int(lib.lmw_connection_count(self._server)) if self._server is not None else 0

    # ------------------------------------------------------------------ running

    def run(self) -> None:
        """run serves until SIGTERM or SIGINT (or stop()), then closes clients with 1001."""
        if self.processes > 1:
            self._supervise()
            return
        self._prepare_single()
        previous = self._install_signals()
        try:
            self._serve()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start(self) -> Gateway:
        """start serves in a background thread of this process and returns once listening."""
        if self.processes != 1:
            raise ValueError("start() runs one process; use run() for processes > 1")
        self._prepare_single()
        self._thread = threading.Thread(target=self._serve, name="lowmemws-loop", daemon=True)
        self._thread.start()
        self._ready.wait(10)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """stop closes every client with 1001 and ends the loop (and worker processes)."""
        self._stopping.set()
        if self._server is not None:
            lib.lmw_wake(self._server)
        for pid in list(self._children):
            _kill(pid, signal.SIGTERM)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout if timeout is not None else self.config.shutdown_timeout + 5)

    def wait_ready(self, timeout: float = 10.0) -> bool:
        """wait_ready blocks until the gateway listens; False on timeout."""
        return self._ready.wait(timeout)

    # ------------------------------------------------------------------ single process

    def _prepare_single(self) -> None:
        self._stats_map = None
        self._listeners = self._bind(reuse_port=False)
        self._make_server(None)
        if self._bus is None:
            self._bus = LocalBus()
        self._bus.start(self._deliver_from_bus)

    def _bind(self, reuse_port: bool) -> list[socket.socket]:
        socks = []
        for host in self.hosts:
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if family == socket.AF_INET6 and host in ("::", ""):
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, self.port))
            sock.listen(self.backlog)
            sock.setblocking(False)
            if self.port == 0:
                self.port = sock.getsockname()[1]
            socks.append(sock)
        return socks

    def _make_server(self, stats: Any) -> None:
        auto = (
            self._hooks.connect is None
            and self._hooks.open is None
            and self.config.origins is None
            and not self.config.subprotocols
        )
        cfg = self.config.to_c(auto_upgrade=auto)
        server = lib.lmw_server_new(cfg, stats if stats is not None else ffi.NULL)
        if server == ffi.NULL:
            raise OSError("lowmemws: could not create the server (out of memory or fds)")
        self._server = ffi.gc(server, lib.lmw_server_free)
        own = lib.lmw_server_stats(self._server)
        own.pid = os.getpid()
        if not self._stats_views:
            self._stats_views = [own]
        for sock in self._listeners:
            lib.lmw_listen_add(self._server, sock.fileno())
        if self.config.workers > 0:
            from .workers import WorkerPool

            self._pool = WorkerPool(self.config.workers, self.config.worker_queue, self._wake)

    def _wake(self) -> None:
        if self._server is not None:
            lib.lmw_wake(self._server)

    def _install_signals(self) -> dict[int, Any]:
        previous: dict[int, Any] = {}
        if threading.current_thread() is not threading.main_thread():
            return previous

        def handler(signum: int, frame: Any) -> None:
            self._stopping.set()
            self._wake()

        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _serve(self) -> None:
        server = self._server
        events = ffi.new("lmw_event **")
        max_events = self.config.max_events
        self._ready.set()
        try:
            while not self._stopping.is_set():
                n = lib.lmw_poll(server, _POLL_MS, events, max_events)
                if n > 0:
                    self._dispatch(events[0], n)
                if self._held:
                    self._release_held()
                if self._pool is not None:  # the gauge falls as workers catch up, too
                    depth = self._pool.depth + len(self._held)
                    lib.lmw_server_stats(server).worker_queue_depth = depth
            self._shutdown(events)
        finally:
            if self._pool is not None:
                self._pool.stop()
            for sock in self._listeners:
                sock.close()
            if self._bus is not None:  # the gateway's bus ends with it (buffered: counted)
                self._bus.close()

    def _shutdown(self, events: Any) -> None:
        """_shutdown: stop accepting, close every client with 1001, wait a bounded time."""
        server = self._server
        lib.lmw_listen_stop(server)
        lib.lmw_close_all(server, 1001)
        deadline = time.monotonic() + self.config.shutdown_timeout
        while lib.lmw_connection_count(server) and time.monotonic() < deadline:
            n = lib.lmw_poll(server, 50, events, self.config.max_events)
            if n > 0:
                self._dispatch(events[0], n, closing=True)

    # ------------------------------------------------------------------ events

    def _dispatch(self, ev: Any, n: int, closing: bool = False) -> None:
        for i in range(n):
            e = ev[i]
            kind = e.type
            try:
                if kind == _EV_MESSAGE:
                    if not closing:
                        self._on_message_event(e)
                elif kind == _EV_UPGRADE:
                    self._on_upgrade_event(e)
                elif kind == _EV_HTTP:
                    self._on_http_event(e)
                elif kind == _EV_CLOSED:
                    if self._hooks.close is not None:
                        self._hooks.close(Connection(self, e.fd, e.gen, e.user_tag), e.code)
            except Exception:
                log.exception("lowmemws: a hook raised")

    def _on_message_event(self, e: Any) -> None:
        hook = self._hooks.message
        if hook is None:
            return
        raw = ffi.unpack(ffi.cast("char *", e.data), e.len)
        message: str | bytes = raw.decode("utf-8") if e.opcode == 1 else raw
        conn = Connection(self, e.fd, e.gen, e.user_tag)
        if self._pool is None:
            hook(conn, message)
            return
        if self._held or not self._pool.submit(hook, conn, message):
            # back-pressure: keep the message, stop reading this socket until room returns
            self._held.append((conn, message))
            key = (conn.fd, conn.gen)
            if key not in self._paused:
                self._paused.add(key)
                lib.lmw_pause_reading(self._server, conn.fd, conn.gen)
        stats = lib.lmw_server_stats(self._server)
        stats.worker_queue_depth = self._pool.depth + len(self._held)

    def _release_held(self) -> None:
        hook = self._hooks.message
        while self._held and hook is not None:
            conn, message = self._held[0]
            if not self._pool.submit(hook, conn, message):
                return
            self._held.popleft()
        for fd, gen in self._paused:
            lib.lmw_resume_reading(self._server, fd, gen)
        self._paused.clear()

    def _on_upgrade_event(self, e: Any) -> None:
        request = Request(e.data, e.len, e.request)
        decision: Accept | Reject | None
        try:
            decision = self._decide(request)
        except Exception:
            log.exception("lowmemws: on_connect raised; answering 500")
            decision = Reject(500)
        finally:
            request._invalidate()
        if isinstance(decision, Reject):
            lib.lmw_reject(self._server, e.fd, e.gen, decision.status)
            return
        accept = decision if decision is not None else _ACCEPT
        proto = accept.subprotocol.encode("latin-1") if accept.subprotocol else b""
        if lib.lmw_upgrade_accept(self._server, e.fd, e.gen, proto, len(proto), accept.user):
            return
        for topic in accept.topics:
            lib.lmw_subscribe(self._server, e.fd, e.gen, self.topic_id(topic))
        if self._hooks.open is not None:
            self._hooks.open(Connection(self, e.fd, e.gen, accept.user))

    def _decide(self, request: Request) -> Accept | Reject | None:
        origins = self.config.origins
        if origins is not None and request.header("origin") not in origins:
            return Reject(403)
        decision = self._hooks.connect(request) if self._hooks.connect is not None else None
        if decision is None:
            accept = _ACCEPT
        elif isinstance(decision, Reject):
            return decision
        elif isinstance(decision, Accept):
            accept = decision
        else:
            raise TypeError("on_connect must return Accept, Reject or None")
        if accept.subprotocol is None and not self.config.subprotocols:
            return accept
        offered = request.subprotocols
        if accept.subprotocol is not None:
            if accept.subprotocol not in offered:
                raise ValueError("Accept.subprotocol must be one the client offered")
            return accept
        for proto in self.config.subprotocols:
            if proto in offered:
                return Accept(accept.user, accept.topics, proto)
        return accept

    def _on_http_event(self, e: Any) -> None:
        head_len = e.request.head_len
        request = Request(e.data, head_len, e.request, body_len=int(e.len) - head_len)
        try:
            response = self._hooks.http(request) if self._hooks.http is not None else None
            if response is None:
                response = self._builtin_http(request)
            payload = response.encode()
        except Exception:
            log.exception("lowmemws: on_http raised; answering 500")
            payload = Response(500, b"internal error\n").encode()
        finally:
            request._invalidate()
        lib.lmw_respond(self._server, e.fd, e.gen, payload, len(payload))

    def _builtin_http(self, request: Request) -> Response:
        if request.method == "GET" and request.path == "/healthz":
            return Response(200, b"ok")
        if request.method == "GET" and request.path == "/metrics":
            return Response(200, self.metrics_text(), content_type="text/plain; version=0.0.4")
        return Response(404, b"not found\n")

    # ------------------------------------------------------------------ processes

    def _supervise(self) -> None:
        """_supervise forks SO_REUSEPORT workers, restarts any that dies, and on
        SIGTERM/SIGINT stops them all (each closes its clients with 1001)."""
        count = self.processes
        reserve = self._bind(reuse_port=True)  # holds the port (and learns it for port 0)
        for sock in reserve:
            sock.close()
        size = metrics.STATS_SIZE
        self._stats_map = mmap.mmap(-1, size * count)
        base = ffi.from_buffer(self._stats_map)
        self._stats_views = [ffi.cast("lmw_stats *", base + i * size) for i in range(count)]
        if self._bus is None:
            self._bus = ProcessBus(workers=count)
        for index in range(count):
            self._spawn(index)
        if isinstance(self._bus, ProcessBus):
            self._bus.attach_parent()
        stop = threading.Event()

        def handler(signum: int, frame: Any) -> None:
            stop.set()

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            self._wait_workers_ready(count)
            self._ready.set()
            while not stop.is_set() and not self._stopping.is_set():
                self._reap(restart=True)
                stop.wait(0.2)
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
            self._stop_children()

    def _wait_workers_ready(self, count: int) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if sum(1 for view in self._stats_views if view.pid) >= count:
                return
            time.sleep(0.01)

    def _spawn(self, index: int) -> None:
        self._stats_views[index].pid = 0
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                self._run_worker(index)
            except BaseException:
                log.exception("lowmemws: worker %d failed", index)
                code = 1
            finally:
                os._exit(code)
        self._children[pid] = index

    def _run_worker(self, index: int) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, signal.SIG_DFL)
        self.worker_index = index
        self._children = {}
        if isinstance(self._bus, ProcessBus):
            self._bus.attach_worker(index)
        self._listeners = self._bind(reuse_port=True)
        self._make_server(self._stats_views[index])
        assert self._bus is not None
        self._bus.start(self._deliver_from_bus)
        self._install_signals()
        lib.lmw_server_stats(self._server).pid = os.getpid()
        self._serve()

    def _reap(self, restart: bool) -> None:
        while self._children:
            try:
                pid, _status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            index = self._children.pop(pid, None)
            if index is None:
                continue
            self._stats_views[index].pid = 0
            if restart:
                log.warning("lowmemws: worker %d (pid %d) died; restarting it", index, pid)
                if isinstance(self._bus, ProcessBus):
                    self._bus.respawn_pair(index)
                self._spawn(index)
                if isinstance(self._bus, ProcessBus):
                    self._bus.attach_parent()

    def _stop_children(self) -> None:
        for pid in list(self._children):
            _kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout + 2
        while self._children and time.monotonic() < deadline:
            self._reap(restart=False)
            time.sleep(0.05)
        for pid in list(self._children):
            _kill(pid, signal.SIGKILL)
        while self._children:
            self._reap(restart=False)
            time.sleep(0.01)
        if self._bus is not None:
            self._bus.close()


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def serve(
    on_message: MessageHook | None = None,
    *,
    host: str | Iterable[str] = "127.0.0.1",
    port: int = 8080,
    **kwargs: Any,
) -> None:
    """serve is the shortest way to run: a Gateway with one on_message hook, until SIGTERM."""
    gateway = Gateway(host if isinstance(host, str) else tuple(host), port, **kwargs)
    if on_message is not None:
        gateway.on_message(on_message)
    gateway.run()


__all__ = ["Gateway", "serve"]
