"""EventLoop: the thread that owns the sockets and hands C events to the hooks.

Each turn calls lmw_poll, which does all per-frame work in C and returns only what needs
the application: an upgrade to decide, a plain HTTP request, a message, a close. Messages
go to on_message inline, or to a bounded pool of hook threads; when the pool's queue is
full the loop keeps the message and stops reading that socket until room returns
(back-pressure: nothing is dropped, the rest waits in the kernel).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from ._c_server import CServer
from ._constants import OP_TEXT
from ._hook_pool import HookPool
from ._hooks import Hooks
from ._native import ffi, lib
from .close_codes import CloseCode
from .config import Config
from .connection import Connection
from .handshake import Reject, Request, Response, negotiate

log = logging.getLogger("lowmemws")

_POLL_MS = 250
_SHUTDOWN_POLL_MS = 50
_EV_MESSAGE = int(lib.LMW_EV_MESSAGE)
_EV_UPGRADE = int(lib.LMW_EV_UPGRADE)
_EV_HTTP = int(lib.LMW_EV_HTTP)
_EV_CLOSED = int(lib.LMW_EV_CLOSED)


class EventLoop:
    """EventLoop runs one CServer's loop and dispatches its events to hooks.

    ``fallback_http`` answers a plain HTTP request that on_http left unanswered (None).
    """

    def __init__(
        self,
        server: CServer,
        hooks: Hooks,
        config: Config,
        fallback_http: Callable[[Request], Response],
    ) -> None:
        self._server = server
        self._hooks = hooks
        self._config = config
        self._fallback_http = fallback_http
        self._pool: HookPool | None = None
        if config.hook_threads > 0:
            self._pool = HookPool(config.hook_threads, config.hook_queue, server.wake)
        self._held: deque[tuple[Connection, str | bytes]] = deque()
        self._paused: set[tuple[int, int]] = set()

    def run(self, stopping: threading.Event, ready: threading.Event) -> None:
        """run serves until stopping is set, then closes every client with 1001."""
        events = ffi.new("lmw_event **")
        max_events = self._config.max_events
        ready.set()
        try:
            while not stopping.is_set():
                n = self._server.poll(_POLL_MS, events, max_events)
                if n > 0:
                    self._dispatch(events[0], n)
                if self._held:
                    self._release_held()
                if self._pool is not None:  # the gauge falls as hook threads catch up, too
                    self._update_queue_gauge()
            self._shutdown(events)
        finally:
            if self._pool is not None:
                self._pool.stop()

    def _shutdown(self, events: Any) -> None:
        """_shutdown: stop accepting, close every client with 1001, wait a bounded time."""
        server = self._server
        server.listen_stop()
        server.close_all(CloseCode.GOING_AWAY)
        deadline = time.monotonic() + self._config.shutdown_timeout
        while server.connection_count and time.monotonic() < deadline:
            n = server.poll(_SHUTDOWN_POLL_MS, events, self._config.max_events)
            if n > 0:
                self._dispatch(events[0], n, closing=True)

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
                    self._on_closed_event(e)
            except Exception:
                log.exception("lowmemws: a hook raised")

    def _connection(self, e: Any, user: int) -> Connection:
        return Connection(self._server, e.fd, e.gen, user)

    def _on_closed_event(self, e: Any) -> None:
        hook = self._hooks.close
        if hook is not None:
            hook(self._connection(e, e.user_tag), e.code)

    # -- messages and back-pressure ---------------------------------------------------------

    def _on_message_event(self, e: Any) -> None:
        hook = self._hooks.message
        if hook is None:
            return
        raw = ffi.unpack(ffi.cast("char *", e.data), e.len)  # a copy: e.data is borrowed
        message: str | bytes = raw.decode("utf-8") if e.opcode == OP_TEXT else raw
        conn = self._connection(e, e.user_tag)
        if self._pool is None:
            hook(conn, message)
            return
        if self._held or not self._pool.submit(hook, conn, message):
            # keep the message in order behind those held, stop reading this socket
            self._held.append((conn, message))
            key = (conn.fd, conn.gen)
            if key not in self._paused:
                self._paused.add(key)
                self._server.pause_reading(conn.fd, conn.gen)
        self._update_queue_gauge()

    def _release_held(self) -> None:
        hook = self._hooks.message
        assert self._pool is not None  # only the pool holds messages back
        while self._held and hook is not None:
            conn, message = self._held[0]
            if not self._pool.submit(hook, conn, message):
                return
            self._held.popleft()
        for fd, gen in self._paused:
            self._server.resume_reading(fd, gen)
        self._paused.clear()

    def _update_queue_gauge(self) -> None:
        assert self._pool is not None
        self._server.stats().worker_queue_depth = self._pool.depth + len(self._held)

    # -- upgrades and plain HTTP ------------------------------------------------------------

    def _on_upgrade_event(self, e: Any) -> None:
        request = Request(e.data, e.len, e.request)
        try:
            decision = negotiate(
                request, self._hooks.connect, self._config.origins, self._config.subprotocols
            )
        except Exception:
            log.exception("lowmemws: on_connect raised; answering 500")
            decision = Reject(500)
        finally:
            request._invalidate()
        if isinstance(decision, Reject):
            self._server.reject(e.fd, e.gen, decision.status)
            return
        proto = decision.subprotocol.encode("latin-1") if decision.subprotocol else b""
        if not self._server.accept_upgrade(e.fd, e.gen, proto, decision.user):
            return  # the client left while the application decided
        for topic in decision.topics:
            self._server.subscribe(e.fd, e.gen, topic)
        if self._hooks.open is not None:
            self._hooks.open(self._connection(e, decision.user))

    def _on_http_event(self, e: Any) -> None:
        head_len = e.request.head_len
        request = Request(e.data, head_len, e.request, body_len=int(e.len) - head_len)
        try:
            hook = self._hooks.http
            response = hook(request) if hook is not None else None
            if response is None:
                response = self._fallback_http(request)
            payload = response.encode()
        except Exception:
            log.exception("lowmemws: on_http raised; answering 500")
            payload = Response(500, b"internal error\n").encode()
        finally:
            request._invalidate()
        self._server.respond(e.fd, e.gen, payload)
