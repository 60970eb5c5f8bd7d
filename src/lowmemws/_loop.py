"""EventLoop: the thread that owns the sockets and hands C events to the hooks.

Each turn calls lmw_poll, which does all per-frame work in C and returns only what needs
the application: an upgrade to decide, a plain HTTP request, a message, a close.

A plain hook runs inline, on this thread, when Config.hook_threads is 0: the fastest way
for hooks that never block (one that blocks stalls every connection of the process).
Coroutine hooks, and plain hooks when there are hook threads, run off this thread through
the Dispatcher (one connection's hooks in order, never overlapping). An upgrade or HTTP
request whose hook runs off the thread is parked in C (lmw_park: still a handshake, under
its deadline, its socket unread); the hook's answer comes back to this thread, which
writes it at its next turn (the thread that owns the sockets writes to them).

Back-pressure: while the Dispatcher is at Config.hook_queue jobs, new jobs are held here in
arrival order: the socket of a held message is paused (the rest waits in the kernel), a held
upgrade stays parked, and accepting stops until room returns. Nothing is dropped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from ._aio import AsyncioHost
from ._c_server import CServer
from ._constants import OP_TEXT
from ._dispatch import Dispatcher, Job, Key, check_result
from ._hooks import Hooks
from ._native import ffi, lib
from ._resume import ResumeJob, Resumer, joined_streams
from ._user_ids import is_long_tag
from ._wire_envelope import PING_PREFIX, PONG_FRAME, RESUME_PREFIX, resume_message
from .close_codes import CloseCode
from .config import Config
from .connection import Connection
from .handshake import (
    Accept,
    Reject,
    Request,
    Response,
    check_origin,
    check_response,
    conclude,
    negotiate,
)

log = logging.getLogger("lowmemws")

#: lmw_poll's timeout between events: none. The C loop wakes by itself for what is due (a
#: deadline's sweep, a paced step); everything else reaches this thread as an event or
#: through lmw_wake (stop(), hook answers, asyncio and hook-thread calls, room in the hook
#: queue), and a stop signal interrupts the wait on the main thread, so an idle gateway
#: sleeps until something happens.
_WAIT_FOREVER = -1
_SHUTDOWN_POLL_MS = 50
_EV_MESSAGE = int(lib.LMW_EV_MESSAGE)
_EV_UPGRADE = int(lib.LMW_EV_UPGRADE)
_EV_HTTP = int(lib.LMW_EV_HTTP)
_EV_CLOSED = int(lib.LMW_EV_CLOSED)
_INTERNAL_ERROR = Response(500, b"internal error\n")


class EventLoop:
    """EventLoop runs one CServer's loop and dispatches its events to hooks.

    ``fallback_http`` answers a plain HTTP request that on_http left unanswered (None);
    ``aio`` is where coroutine hooks run.
    """

    def __init__(
        self,
        server: CServer,
        hooks: Hooks,
        config: Config,
        fallback_http: Callable[[Request], Response],
        aio: AsyncioHost,
    ) -> None:
        self._server = server
        self._hooks = hooks
        self._config = config
        self._fallback_http = fallback_http
        #: resumer replays history to resuming envelope clients (Config.history on), else None.
        self.resumer: Resumer | None = None
        self._threads = config.hook_threads > 0
        self._aio = aio
        self._dispatcher = Dispatcher(
            config.hook_threads,
            config.hook_queue,
            aio,
            on_room=server.wake,
            pause=server.pause_reading,
            resume=server.resume_reading,
            run_inline=self.run_inline,
            on_count=self._count_in_flight,
        )
        self._held: deque[tuple[Key, Job]] = deque()
        self._held_keys: set[Key] = set()
        self._paused: set[Key] = set()
        self._accept_held = False
        self._park = False  # an event of this batch waits for an off-loop hook
        # calls other threads hand to this one: hook answers, inline hooks (see _call_here)
        self._calls: deque[tuple[Callable[..., Any], tuple[Any, ...], Future[Any] | None]] = deque()
        self._calls_woken = False

    def run(self, stopping: threading.Event, ready: threading.Event) -> None:
        """run serves until stopping is set, then closes every client with 1001."""
        events = ffi.new("lmw_event **")
        max_events = self._config.max_events
        ready.set()
        try:
            while not stopping.is_set():
                n = self._server.poll(_WAIT_FOREVER, events, max_events)
                if n > 0:
                    self._dispatch(events[0], n)
                if self._calls or self._calls_woken:  # see _run_calls
                    self._run_calls()
                self._after_turn()
            self._shutdown(events)
        finally:
            abandoned = self._dispatcher.close() + len(self._held)
            if abandoned:
                log.warning("lowmemws: %d hook calls abandoned at shutdown", abandoned)

    def _after_turn(self) -> None:
        """_after_turn releases held jobs when there is room, and keeps accepting stopped
        while jobs are held or the dispatcher is at its bound."""
        dispatcher = self._dispatcher
        if self._held and dispatcher.has_room:
            self._release_held()
        self._aio.kick()
        hold = bool(self._held) or not dispatcher.has_room
        if hold != self._accept_held:
            self._accept_held = hold
            self._server.accept_hold(hold)
        dispatcher.set_held(len(self._held))

    def _count_in_flight(self, in_flight: int) -> None:
        """_count_in_flight keeps the hooks_in_flight gauge (the dispatcher calls it, from
        whichever thread changed the count)."""
        self._server.stats().hooks_in_flight = in_flight

    def _shutdown(self, events: Any) -> None:
        """_shutdown: stop accepting, close every client with 1001 (a parked handshake gets
        503), let the hooks in flight finish, all within shutdown_timeout."""
        server = self._server
        server.listen_stop()
        server.close_all(CloseCode.GOING_AWAY)
        deadline = time.monotonic() + self._config.shutdown_timeout
        while time.monotonic() < deadline and (
            server.connection_count or self._held or self._dispatcher.count
        ):
            n = server.poll(_SHUTDOWN_POLL_MS, events, self._config.max_events)
            if n > 0:
                self._dispatch(events[0], n, closing=True)
            if self._calls or self._calls_woken:
                self._run_calls()
            self._after_turn()

    def _dispatch(self, ev: Any, n: int, closing: bool = False) -> None:
        try:
            self._dispatch_events(ev, n, closing)
        finally:
            if self._park:
                # the requests whose hooks run elsewhere wait past this batch; their
                # answers are applied by this thread, after this (see _call_here). A
                # request that could not be parked (no memory) was answered 503 by C.
                self._park = False
                self._server.park_waiting()

    def _dispatch_events(self, ev: Any, n: int, closing: bool) -> None:
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

    # -- running hooks ----------------------------------------------------------------------

    def _inline(self, name: str) -> bool:
        """_inline: hook name runs on this thread (a plain hook and no hook threads)."""
        return not self._threads and name not in self._hooks.coroutine

    def _free_to_run_inline(self, key: Key) -> bool:
        """_free_to_run_inline: nothing of key runs elsewhere or is held, so a hook for it
        may run here now without overtaking one."""
        return not self._dispatcher.busy(key) and key not in self._held_keys

    def _submit(self, key: Key, job: Job, message: bool = False) -> None:
        """_submit gives job to the dispatcher, or holds it while the dispatcher is full."""
        if not self._held and self._dispatcher.has_room:
            self._dispatcher.submit(key, job)
            return
        self._held.append((key, job))
        self._held_keys.add(key)
        if message and key not in self._paused:
            self._paused.add(key)
            self._dispatcher.hold_reading(key)

    def _release_held(self) -> None:
        dispatcher = self._dispatcher
        while self._held and dispatcher.has_room:
            key, job = self._held.popleft()
            dispatcher.submit(key, job)
        if self._held:
            return
        self._held_keys.clear()
        self._dispatcher.release_reading(self._paused)
        self._paused.clear()

    def _job(self, name: str, fn: Callable[..., Any], *args: Any) -> Job:
        return Job(fn, args, name in self._hooks.coroutine, name)

    # -- messages and closes ----------------------------------------------------------------

    def _on_message_event(self, e: Any) -> None:
        hook = self._hooks.message
        if self.resumer is not None and e.opcode == OP_TEXT and self._resume_message(e):
            return
        if hook is None:
            return
        raw = ffi.unpack(ffi.cast("char *", e.data), e.len)  # a copy: e.data is borrowed
        message: str | bytes = raw.decode("utf-8") if e.opcode == OP_TEXT else raw
        conn = Connection(self._server, e.fd, e.gen, self._user_tag(e))
        key = (e.fd, e.gen)
        if self._inline("message") and self._free_to_run_inline(key):
            result = hook(conn, message)
            if result is not None:
                check_result("message", result)
            return
        self._submit(key, self._job("message", hook, conn, message), message=True)

    def _resume_message(self, e: Any) -> bool:
        """An envelope client's in-band resume request (a gap it saw) goes to the resumer,
        not to on_message (a malformed one closes the connection with 1008), and its
        heartbeat ping is answered here."""
        head = ffi.unpack(ffi.cast("char *", e.data), min(e.len, len(RESUME_PREFIX)))
        is_ping = head.startswith(PING_PREFIX)
        if not (is_ping or head == RESUME_PREFIX) or not self._server.is_envelope(e.fd, e.gen):
            return False
        if is_ping:  # a browser's heartbeat: answered here
            self._server.send(e.fd, e.gen, OP_TEXT, PONG_FRAME)
            return True
        assert self.resumer is not None
        text = ffi.unpack(ffi.cast("char *", e.data), e.len).decode("utf-8")
        try:
            positions = resume_message(text) or {}
        except ValueError:
            self._server.close(e.fd, e.gen, CloseCode.POLICY_VIOLATION, b"bad lmw_resume")
            return True
        named: dict[str, tuple[str, int] | None] = dict(positions)
        job = ResumeJob(e.fd, e.gen, named, frozenset(), self._user_tag(e), False)
        self.resumer.submit(job)
        return True

    def _user_tag(self, e: Any) -> int:
        """_user_tag is the user tag of an event's connection as its hooks see it: the
        one it was accepted with, also while its user stream is replayed (see _resume)."""
        if self.resumer is None:
            return int(e.user_tag)
        return self.resumer.user_of(e.fd, e.gen, int(e.user_tag))

    def _on_closed_event(self, e: Any) -> None:
        hook = self._hooks.close
        user_tag = self._user_tag(e)
        user: int | str = user_tag
        if is_long_tag(user_tag):  # its name is held for this event (_user_names.c)
            user = self._server.user_name(user_tag) or user_tag
        if self.resumer is not None:
            self.resumer.closed(e.fd, e.gen)
        if e.len:  # the event holds the name (lmw.h: LMW_EV_CLOSED)
            self._server.release_user_name(int(e.user_tag))
        if hook is None:
            return
        conn = Connection(self._server, e.fd, e.gen, user)
        key = (e.fd, e.gen)
        if self._inline("close") and self._free_to_run_inline(key):
            check_result("close", hook(conn, e.code))
            return
        self._submit(key, self._job("close", hook, conn, int(e.code)))

    # -- upgrades ---------------------------------------------------------------------------

    def _on_upgrade_event(self, e: Any) -> None:
        hook = self._hooks.connect
        fd, gen = e.fd, e.gen
        if hook is not None and not self._inline("connect"):
            self._park = True  # parked at the end of this batch (_dispatch), all in one call
            request = Request._copy(e.data, e.len, e.request)
            if "connect" in self._hooks.coroutine:
                job = Job(self._connect_async, (request, fd, gen, hook), True, "connect")
            else:
                job = Job(self._connect_in_thread, (request, fd, gen, hook), False, "connect")
            self._submit((fd, gen), job)
            return
        self._answer_upgrade(fd, gen, self._decide(Request(e.data, e.len, e.request), hook))

    def _decide(self, request: Request, hook: Any) -> Accept | Reject:
        """_decide runs a plain on_connect (here or on a hook thread): its decision, or 500
        when it raised. The request is dead afterwards."""
        try:
            return negotiate(request, hook, self._config.origins, self._config.subprotocols)
        except Exception:
            log.exception("lowmemws: on_connect raised; answering 500")
            return Reject(500)
        finally:
            request._invalidate()

    def _watch_handshake(self) -> None:
        """_watch_handshake: a handshake hook still running after handshake_timeout (its
        request answered 408 by then, since the deadline counts from accept) is cancelled,
        so a hook that never returns cannot keep its place in hook_queue for ever."""
        self._aio.watch(self._aio.loop.time() + self._config.handshake_timeout)

    async def _connect_async(self, request: Request, fd: int, gen: int, hook: Any) -> None:
        self._watch_handshake()
        try:
            refused = check_origin(request, self._config.origins)
            decision = refused or conclude(request, await hook(request), self._config.subprotocols)
        except Exception:
            log.exception("lowmemws: on_connect raised; answering 500")
            decision = Reject(500)
        finally:
            self._aio.unwatch()
            request._invalidate()
        self._post_answer(fd, gen, decision)

    def _connect_in_thread(self, request: Request, fd: int, gen: int, hook: Any) -> None:
        self._post_answer(fd, gen, self._decide(request, hook))

    def _answer_upgrade(
        self, fd: int, gen: int, decision: Accept | Reject, subscribed: bool = False
    ) -> None:
        """_answer_upgrade applies on_connect's decision. A client that left meanwhile, or a
        handshake already answered (408 at its deadline, 503 at shutdown), makes the C calls
        fail: the decision is dropped, nothing is kept. ``subscribed``: the node was made to
        receive the streams the connection joins at once (`_wait_subscribed`)."""
        server = self._server
        if isinstance(decision, Reject):
            server.reject(fd, gen, decision.status)
            return
        if not subscribed and self._wait_subscribed(fd, gen, decision):
            return  # answered once this node receives its streams (see _resume)
        proto = decision.subprotocol.encode("latin-1") if decision.subprotocol else b""
        resume = decision.resume if self.resumer is not None else None
        later = resume or {}  # streams joined once replayed (see _resume)
        try:  # before the 101: a publish the client sees it for reaches it
            tag = server.user_ids.tag(decision.user)
            for topic in decision.topics:  # (nothing is sent to it before the 101)
                if "t:" + topic not in later:
                    server.subscribe(fd, gen, topic)
        except Exception:  # a topic that is not a str: answered like a hook that raised
            server.reject(fd, gen, 500)
            raise
        user_deferred = tag != 0 and f"u:{tag}" in later
        # a long str id's name is held across the accept, so the hub's join finds it
        named = is_long_tag(tag) and server.hold_user_name(tag, str(decision.user).encode())
        accepted = server.accept_upgrade(fd, gen, proto, 0 if user_deferred else tag)
        if named and not (accepted and user_deferred):
            server.release_user_name(tag)  # the hub holds it now (or the upgrade failed)
        if not accepted:
            return
        if resume is not None and self.resumer is not None:
            streams = joined_streams(decision.topics, tag, resume)
            topics = frozenset(decision.topics)
            job = ResumeJob(fd, gen, streams, topics, tag, user_deferred, named)
            self.resumer.submit(job)  # releases the name once the user is joined
        hook = self._hooks.open
        if hook is None:
            return
        conn = Connection(server, fd, gen, decision.user)
        key = (fd, gen)
        if self._inline("open") and self._free_to_run_inline(key):
            check_result("open", hook(conn))
        else:  # no message of the connection can be queued yet: its 101 was just sent
            self._submit(key, self._job("open", hook, conn))

    def _wait_subscribed(self, fd: int, gen: int, decision: Accept) -> bool:
        """True when the upgrade of an envelope client waits for this node to receive the
        streams it joins at once (see _resume): it is answered later, by `_answer_subscribed`."""
        if self.resumer is None or decision.resume is None:
            return False
        try:
            tag = self._server.user_ids.tag(decision.user)
        except Exception:
            return False  # answered 500 by _answer_upgrade
        if not all(isinstance(topic, str) for topic in decision.topics):
            return False  # the same
        streams = [f"t:{topic}" for topic in decision.topics]
        if tag:
            streams.append(f"u:{tag}")
        streams = [stream for stream in streams if stream not in decision.resume]
        if not streams:
            return False
        answer = (fd, gen, decision, streams)
        ready = lambda: self._call_here(self._answer_subscribed, answer, None)  # noqa: E731
        if self.resumer.wait_subscribed(streams, ready):
            return False
        self._park = True  # (a no-op for one parked already: its hook ran off the loop)
        return True

    def _answer_subscribed(self, fd: int, gen: int, decision: Accept, streams: list[str]) -> None:
        try:
            self._answer_upgrade(fd, gen, decision, subscribed=True)
        finally:
            assert self.resumer is not None
            self.resumer.release_streams(streams)  # the connection's topics hold them now

    # -- calls from other threads -----------------------------------------------------------

    def _post_answer(self, fd: int, gen: int, answer: Accept | Reject | bytes) -> None:
        """_post_answer hands an off-loop hook's answer (a decision, or an HTTP response) to
        this loop thread, which applies it at its next turn: the thread that owns the
        sockets writes the 101, and the hook's thread makes no C call (each one would
        contend with the loop for the server lock and the GIL)."""
        if isinstance(answer, bytes):
            self._call_here(self._server.respond, (fd, gen, answer), None)
        else:
            self._call_here(self._answer_upgrade, (fd, gen, answer), None)

    def run_inline(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> Future[Any]:
        """run_inline runs a plain hook on this loop thread at its next turn (a plain hook
        that follows a coroutine hook of the same connection, with hook_threads=0: plain
        hooks then never run on two threads at once)."""
        future: Future[Any] = Future()
        self._call_here(fn, args, future)
        return future

    def _call_here(
        self, fn: Callable[..., Any], args: tuple[Any, ...], future: Future[Any] | None
    ) -> None:
        """_call_here queues fn(*args) for this thread's next turn; one wake-up per batch
        (from the asyncio thread, after the other tasks ready now)."""
        self._calls.append((fn, args, future))
        if not self._calls_woken:  # cleared by _run_calls before it drains
            self._calls_woken = True
            if self._aio.on_loop_thread():
                self._aio.call_soon(self._server.wake)
            else:
                self._server.wake()

    def _run_calls(self) -> None:
        """_run_calls runs the calls queued for this thread. A call queued while it drains
        is run by it too, but its wake-up is then spent on an empty queue: the flag stays
        set with nothing queued, so run() calls this again on the turn that wake-up causes
        (to clear it), or a later call would not wake a loop that sleeps until an event."""
        self._calls_woken = False
        calls = self._calls
        while calls:
            fn, args, future = calls.popleft()
            if future is not None:
                if future.set_running_or_notify_cancel():
                    try:
                        future.set_result(fn(*args))
                    except BaseException as exc:  # the waiting drain logs it, naming the hook
                        future.set_exception(exc)
                continue
            try:
                fn(*args)  # a hook's answer, then maybe an inline on_open
            except Exception:
                log.exception("lowmemws: applying a hook's answer raised")

    # -- plain HTTP -------------------------------------------------------------------------

    def _on_http_event(self, e: Any) -> None:
        head_len = e.request.head_len
        body_len = int(e.len) - head_len
        hook = self._hooks.http
        fd, gen = e.fd, e.gen
        if hook is not None and not self._inline("http"):
            self._park = True
            request = Request._copy(e.data, head_len, e.request, body_len)
            if "http" in self._hooks.coroutine:
                job = Job(self._http_async, (request, fd, gen, hook), True, "http")
            else:
                job = Job(self._http_in_thread, (request, fd, gen, hook), False, "http")
            self._submit((fd, gen), job)
            return
        request = Request(e.data, head_len, e.request, body_len=body_len)
        self._server.respond(fd, gen, self._http_payload(request, hook))

    def _http_payload(self, request: Request, hook: Any) -> bytes:
        """_http_payload runs a plain on_http (here or on a hook thread): the response's
        bytes, or a 500 when it raised. The request is dead afterwards."""
        try:
            return self._http_answer(request, hook(request) if hook is not None else None)
        except Exception:
            log.exception("lowmemws: on_http raised; answering 500")
            return _INTERNAL_ERROR.encode()
        finally:
            request._invalidate()

    def _http_answer(self, request: Request, result: object) -> bytes:
        response = check_response(result)
        if response is None:
            response = self._fallback_http(request)
        return response.encode()

    async def _http_async(self, request: Request, fd: int, gen: int, hook: Any) -> None:
        self._watch_handshake()
        try:
            payload = self._http_answer(request, await hook(request))
        except Exception:
            log.exception("lowmemws: on_http raised; answering 500")
            payload = _INTERNAL_ERROR.encode()
        finally:
            self._aio.unwatch()
            request._invalidate()
        self._post_answer(fd, gen, payload)

    def _http_in_thread(self, request: Request, fd: int, gen: int, hook: Any) -> None:
        self._post_answer(fd, gen, self._http_payload(request, hook))
