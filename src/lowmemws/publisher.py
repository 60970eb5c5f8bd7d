"""Publisher: the handle of a process that holds no connections (a Django view, a Celery
task, a FastAPI app) on a deployment of gateways that share a redis-server.

It is a `RedisBus` that publishes and never subscribes to the deployment's envelopes: the
envelopes, their order (one publisher's envelopes reach every node in the order it published
them) and the user ids (the deployment's key, from ``channel_prefix`` and ``user_key``) are
exactly a gateway's. Unlike a gateway's bus, a full buffer makes ``publish`` wait for Redis
(back-pressure), so a tight loop is slowed down to the pace Redis takes, never refused.
"""

from __future__ import annotations

import asyncio
import os
import weakref
from collections.abc import Iterable
from types import TracebackType
from typing import Any

from ._bus_base import log
from ._bus_redis import RedisBus
from ._history import History
from ._presence import ask_kick, ask_online
from ._routing import user_partition
from ._user_ids import UserId, UserIds
from .bus import Envelope, Policy
from .close_codes import CloseCode
from .errors import BusUnavailable
from .server import pace_number, paced_envelope

__all__ = ["Publisher"]

_MiB = 1024 * 1024
#: PUBLISHER_BLOCK_TIMEOUT is how long a publish waits for room in a full buffer (seconds).
PUBLISHER_BLOCK_TIMEOUT = 10.0
#: PUBLISHER_CLOSE_TIMEOUT is how long close() waits for the buffer to reach Redis (seconds).
PUBLISHER_CLOSE_TIMEOUT = 10.0
#: PUBLISHER_QUERY_TIMEOUT is how long online() and disconnect_user() wait for the nodes.
PUBLISHER_QUERY_TIMEOUT = 2.0


class Publisher:
    """Publisher publishes to the gateways of a deployment through the redis-server at url.

    ``publish``, ``send_to_user``, ``send_to_users`` and ``broadcast`` queue the message and
    return; a writer thread sends the queue to Redis in pipelined batches. While Redis is up a
    tight loop is never refused: once ``max_buffered`` envelopes (or ``max_buffered_bytes``)
    wait, a publish waits for room, up to ``block_timeout`` seconds. While Redis is down
    the buffer fills, and then a publish raises `lowmemws.BusUnavailable` after waiting
    ``block_timeout`` (nothing of that message is sent); what was buffered before is sent when
    Redis is back. ``close()`` (or leaving the ``with`` block) waits for the buffer to reach
    Redis and raises BusUnavailable if some of it could not be sent: no message is lost
    without an error. Every method may be called from any thread.

    ``history``: give the gateways' `lowmemws.History` when they have history on: then every
    topic and user message is stored in its Redis stream and published in one script
    (`_history_redis.store_and_publish`), so their clients can resume it; such a publish
    waits for Redis and raises BusUnavailable when it cannot be stored (nothing was sent).

    ``channel_prefix`` and ``user_key`` must be the ones the gateways' RedisBus got (str user
    ids are tags derived from them). Connecting happens in the background:
    `wait_ready` tells when Redis answered. A Publisher made before a fork (Celery's prefork
    pool, gunicorn ``--preload``) connects again in each child on first use there.

    Raises:
        ImportError: redis-py is not installed (``pip install 'lowmemws[redis]'``).
    """

    def __init__(
        self,
        url: str,
        *,
        channel_prefix: str = "lowmemws:",
        user_key: bytes | str | None = None,
        max_buffered: int = 10000,
        max_buffered_bytes: int = 16 * _MiB,
        block_timeout: float = PUBLISHER_BLOCK_TIMEOUT,
        socket_timeout: float = 5.0,
        history: History | None = None,
    ) -> None:
        self._settings: dict[str, Any] = {
            "channel_prefix": channel_prefix,
            "user_key": user_key,
            "max_buffered": max_buffered,
            "max_buffered_bytes": max_buffered_bytes,
            "block_timeout": block_timeout,
            "socket_timeout": socket_timeout,
        }
        self._url = url
        self._history = history
        self._closed = False
        self._start_bus()
        self._user_ids = UserIds(self._bus.user_key)

    def _start_bus(self) -> None:
        self._pid = os.getpid()
        self._bus = RedisBus(self._url, **self._settings)
        if self._history is not None:
            self._bus.enable_history(self._history)
        self._bus.start_publisher()
        # a process that ends (or drops the Publisher) without close(): still try to send,
        # and log what was lost (weakref.finalize also runs at interpreter exit)
        self._finalizer = weakref.finalize(self, _close_at_exit, self._bus)

    def _live_bus(self) -> RedisBus:
        """_live_bus is this process's bus. A Publisher made before a fork (Celery's
        prefork pool, gunicorn --preload) gets a bus of its own in the child on first use:
        threads and sockets do not survive a fork, and what the parent had buffered is the
        parent's to send."""
        if self._pid != os.getpid():
            self._finalizer.detach()
            self._start_bus()
        return self._bus

    @property
    def bus(self) -> RedisBus:
        """bus is the RedisBus underneath (its ``stats`` count what was sent and refused)."""
        return self._live_bus()

    def wait_ready(self, timeout: float | None = None) -> bool:
        """wait_ready waits until both Redis links are up; False on timeout."""
        return self._live_bus().wait_ready(timeout)

    # -- publishing -------------------------------------------------------------------------

    def publish(
        self,
        topic: str,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> None:
        """publish sends data (str as text, bytes as binary) to every member of topic on every
        gateway; policy is what happens to a member over its write limit, and spread, rate
        and pace_id pace the send, as for Gateway.publish (a rate is shared by the gateways
        subscribed to the bus).

        Raises:
            BusUnavailable: closed, or the buffer stayed full for block_timeout (Redis down).
            ValueError: an unknown policy, a topic over 65535 UTF-8 bytes, or a bad pacing.
        """
        envelope = Envelope.for_topic(topic, data, policy=policy)
        self._publish(self._paced(envelope, spread, rate, pace_id))

    def send_to_user(
        self,
        user: UserId,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> None:
        """send_to_user sends data to every connection of user (an int or str id, as the
        gateways' Accept gave it) on every gateway (pacing as for publish).

        Raises:
            BusUnavailable: closed, or the buffer stayed full for block_timeout (Redis down).
            ValueError: an unknown policy, a bad user id (see Gateway.send_to_user), or a
                bad pacing.
            TypeError: a user that is neither an int, a str nor a UserTag.
        """
        tag = self._user_ids.tag(user)
        if spread is None and rate is None and pace_id is None:
            self._publish(Envelope.for_user(tag, data, policy=policy))
            return
        envelope = Envelope.for_users((tag,), data, policy=policy)
        self._publish(self._paced(envelope, spread, rate, pace_id))

    def send_to_users(
        self,
        users: Iterable[UserId],
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> None:
        """send_to_users sends data to every connection of any of users, in one envelope (a
        user listed twice gets it once; pacing as for publish). With history, one message
        per user instead, each stored in its user's stream (as Gateway.send_to_users).

        Raises:
            BusUnavailable: closed, or the buffer stayed full for block_timeout (Redis down).
            ValueError: an unknown policy, a bad user id, or a bad pacing (with history,
                any pacing of several users).
            TypeError: a user that is neither an int, a str nor a UserTag.
        """
        tags = tuple(map(self._user_ids.tag, users))
        envelope = self._paced(Envelope.for_users(tags, data, policy=policy), spread, rate,
                               pace_id)  # fmt: skip
        if self._history is None or envelope.paced:
            self._publish(envelope)
            return
        for single in envelope.per_user():  # each user's stream and position
            self._publish(single)

    def broadcast(
        self,
        data: str | bytes,
        policy: Policy = "drop",
        *,
        spread: float | None = None,
        rate: float | None = None,
        pace_id: str | None = None,
    ) -> None:
        """broadcast sends data to every open connection of every gateway (pacing as for
        publish).

        Raises:
            BusUnavailable: closed, or the buffer stayed full for block_timeout (Redis down).
            ValueError: an unknown policy, or a bad pacing.
        """
        envelope = Envelope.for_all(data, policy=policy)
        self._publish(self._paced(envelope, spread, rate, pace_id))

    def cancel_paced(self, pace_id: str) -> None:
        """cancel_paced ends every paced send named pace_id on every gateway (see
        Gateway.cancel_paced).

        Raises:
            BusUnavailable: closed, or the buffer stayed full for block_timeout (Redis down).
        """
        self._publish(Envelope.for_cancel(pace_number(pace_id)))

    def _paced(
        self, envelope: Envelope, spread: float | None, rate: float | None, pace_id: str | None
    ) -> Envelope:
        node_count = self._live_bus().node_count
        history = self._history is not None
        return paced_envelope(envelope, spread, rate, pace_id, node_count, history=history)

    def _publish(self, envelope: Envelope) -> None:
        if self._closed:
            raise BusUnavailable("Publisher is closed")
        self._live_bus().publish(envelope)

    # -- presence and kick ------------------------------------------------------------------

    def online(self, user: UserId, *, timeout: float = PUBLISHER_QUERY_TIMEOUT) -> int:
        """online is the number of open connections of user on every gateway, asked of
        the gateways now (see Gateway.online).

        Raises:
            PresenceTimeout: not every gateway answered within timeout seconds.
            BusUnavailable: closed, or Redis did not answer within timeout.
            ValueError: a bad user id.
        """
        tag = self._user_ids.tag(user)
        self._ready_for_answers(timeout)
        return ask_online(self._live_bus(), tag, timeout) if tag else 0

    def disconnect_user(
        self,
        user: UserId,
        code: int = CloseCode.NORMAL_CLOSURE,
        reason: str = "",
        *,
        timeout: float = PUBLISHER_QUERY_TIMEOUT,
    ) -> int:
        """disconnect_user closes every connection of user on every gateway with close code
        and reason, after what this Publisher published before; returns how many it closed
        (see Gateway.disconnect_user).

        Raises:
            ValueError: a code that may not be sent, a reason over 123 bytes of UTF-8, or a
                bad user id.
            PresenceTimeout: not every gateway confirmed within timeout seconds (those the
                kick reached close the connections all the same).
            BusUnavailable: closed, or Redis did not answer within timeout.
        """
        tag = self._user_ids.tag(user)
        self._ready_for_answers(timeout)
        return ask_kick(self._live_bus(), tag, code, reason, timeout) if tag else 0

    def _ready_for_answers(self, timeout: float) -> None:
        if self._closed:
            raise BusUnavailable("Publisher is closed")
        if not self._live_bus().wait_ready(timeout):
            raise BusUnavailable(f"Publisher: Redis did not answer within {timeout:g} s")

    # -- asyncio ----------------------------------------------------------------------------

    async def apublish(self, topic: str, data: str | bytes, policy: Policy = "drop") -> None:
        """apublish is publish for asyncio code: it runs in a thread (it may wait for room)."""
        await asyncio.to_thread(self.publish, topic, data, policy)

    async def asend_to_user(self, user: UserId, data: str | bytes, policy: Policy = "drop") -> None:
        """asend_to_user is send_to_user for asyncio code (in a thread)."""
        await asyncio.to_thread(self.send_to_user, user, data, policy)

    async def asend_to_users(
        self, users: Iterable[UserId], data: str | bytes, policy: Policy = "drop"
    ) -> None:
        """asend_to_users is send_to_users for asyncio code (in a thread)."""
        await asyncio.to_thread(self.send_to_users, tuple(users), data, policy)

    async def abroadcast(self, data: str | bytes, policy: Policy = "drop") -> None:
        """abroadcast is broadcast for asyncio code (in a thread)."""
        await asyncio.to_thread(self.broadcast, data, policy)

    async def aonline(self, user: UserId, *, timeout: float = PUBLISHER_QUERY_TIMEOUT) -> int:
        """aonline is online for asyncio code (in a thread)."""
        return await asyncio.to_thread(self.online, user, timeout=timeout)

    async def adisconnect_user(
        self,
        user: UserId,
        code: int = CloseCode.NORMAL_CLOSURE,
        reason: str = "",
        *,
        timeout: float = PUBLISHER_QUERY_TIMEOUT,
    ) -> int:
        """adisconnect_user is disconnect_user for asyncio code (in a thread)."""
        return await asyncio.to_thread(self.disconnect_user, user, code, reason, timeout=timeout)

    def positions(self, topics: Iterable[str] = (), user: UserId = 0) -> dict[str, tuple[str, int]]:
        """positions is where the history of each stream of topics and of user stands now:
        {stream: (epoch, offset)}, ("", 0) for a stream with no history yet, as
        `lowmemws.Gateway.positions` gives it, for a backend process (a Django view) that
        reads a user's state and hands both to the page (lowmemws.js option ``positions``,
        `lowmemws.client.Client` ``positions=``): the client's first connection is then a
        resume, so it gets every message stored after these positions were read, also one
        published before it connects or while a connection drops before ``synced``.

        Read the positions just before the state: a message stored in between is then in
        the state and replayed too (the application tells it by its own id), never missing
        from both. One read of Redis per stream; nothing is subscribed.

        Raises:
            ValueError: the Publisher has no history (``history=None``), a bad user id, or a
                topic that is not a str.
            BusUnavailable: Redis cannot be reached.
        """
        if self._history is None:
            raise ValueError("positions: this Publisher has no history (history=None)")
        topics = tuple(topics)
        if not all(isinstance(topic, str) for topic in topics):
            raise ValueError("positions: every topic must be a str")
        tag = self._user_ids.tag(user)
        streams = [f"t:{topic}" for topic in topics] + ([f"u:{tag}"] if tag else [])
        bus = self._live_bus()
        return {stream: bus.history_position(stream) for stream in streams}

    async def apositions(
        self, topics: Iterable[str] = (), user: UserId = 0
    ) -> dict[str, tuple[str, int]]:
        """apositions is positions for asyncio code (in a thread)."""
        return await asyncio.to_thread(self.positions, tuple(topics), user)

    def partition_of(self, user: UserId) -> int:
        """partition_of is user's routing partition on RedisBus (0..lowmemws.bus.PARTITIONS-1),
        the same on every node and Publisher of the deployment. Hand it to the client (e.g.
        ``?p=N`` in its WebSocket URL) so a load balancer hashing it (nginx ``hash $arg_p
        consistent``) places each partition on one node: docs/scaling.md.

        Raises:
            ValueError: user is not a valid user id (an int outside 0..2**63-1, an empty str).
        """
        return user_partition(self._user_ids.tag(user))

    async def aclose(self, timeout: float = PUBLISHER_CLOSE_TIMEOUT) -> None:
        """aclose is close for asyncio code (in a thread)."""
        await asyncio.to_thread(self.close, timeout)

    # -- life -------------------------------------------------------------------------------

    def flush(self, timeout: float = PUBLISHER_CLOSE_TIMEOUT) -> None:
        """flush waits until everything published so far has been handed to Redis.

        Raises:
            BusUnavailable: some of it is still waiting after timeout seconds (Redis down);
                it stays buffered.
        """
        left = self._live_bus().flush(timeout)
        if left:
            raise BusUnavailable(f"Publisher: {left} messages not sent to Redis in {timeout:g} s")

    def close(self, timeout: float = PUBLISHER_CLOSE_TIMEOUT) -> None:
        """close sends what is buffered (waiting up to timeout seconds), then stops the
        threads. Calling it again does nothing.

        Raises:
            BusUnavailable: messages could not be sent to Redis before timeout: they are
                lost, and the error says how many.
        """
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        if self._pid != os.getpid():
            return  # forked and never used here: nothing of this process's to send
        lost = _close(self._bus, timeout)
        if lost:
            raise BusUnavailable(f"Publisher closed with {lost} messages not sent to Redis")

    def __enter__(self) -> Publisher:
        """A Publisher is a context manager: leaving the block closes it (see close)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    async def __aenter__(self) -> Publisher:
        """``async with Publisher(...)`` closes it in a thread when the block ends."""
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()


def _close(bus: RedisBus, timeout: float) -> int:
    """_close flushes and stops bus; returns how many envelopes were given up."""
    before = bus.stats.snapshot()["dropped"]
    bus.flush(timeout)
    bus.close(timeout=1.0)
    return bus.stats.snapshot()["dropped"] - before


def _close_at_exit(bus: RedisBus) -> None:
    lost = _close(bus, PUBLISHER_CLOSE_TIMEOUT)
    if lost:
        log.error("lowmemws Publisher: the process ended with %d messages not sent", lost)
