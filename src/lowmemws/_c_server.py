"""CServer: the one owner of an lmw_server, and the one place its C results become Python ones.

lmw.h answers in several conventions: lmw_send gives 1 (sent or queued), 0 (dropped by the
write policy) or LMW_ERROR (gone); lmw_subscribe 1 (joined), 0 (already a member) or
LMW_ERROR; lmw_unsubscribe 1 (left), 0 (not a member) or LMW_ERROR; lmw_close and
lmw_upgrade_accept 0 or LMW_ERROR; the fan-outs a count. Every caller in Python goes
through this class, so each convention is read in exactly one place, and a CServer that is
not open yet (or any more) answers like a connection that is gone.
"""

from __future__ import annotations

import hashlib
import os
from typing import Any

from ._constants import POLICIES
from ._native import ffi, lib
from ._routing import PARTITIONS, topic_partition
from ._user_ids import USER_NAME_MAX, UserIds
from .config import Config
from .connection import SendResult
from .errors import TLSError

PaceTarget = str | tuple[int, ...] | None
"""PaceTarget: who a paced send reaches: a topic name, a tuple of user tags, or everyone."""
Pace = tuple[int, float, float]
"""Pace: (pace id, spread seconds, rate per second) of a paced send."""

_TOPIC_CACHE = 4096  # topic ids remembered (per topic, bounded; not per connection)
_PARTITION_MASK = PARTITIONS - 1


class TopicIds:
    """TopicIds names topics for the C hub: a 64-bit keyed BLAKE2b hash of the topic name
    whose low bits are replaced by the topic's routing partition (issue 15), which the hub
    counts members by.

    The key is random per gateway (and shared by its forked worker processes), so a client
    cannot choose topic names that collide in the hub's table (54 keyed bits stay).
    """

    def __init__(self) -> None:
        self._key = os.urandom(16)
        self._known: dict[str, int] = {}

    def __call__(self, topic: str) -> int:
        known = self._known.get(topic)
        if known is not None:
            return known
        digest = hashlib.blake2b(topic.encode("utf-8"), digest_size=8, key=self._key)
        keyed = int.from_bytes(digest.digest(), "little") & ~_PARTITION_MASK
        topic_id = keyed | topic_partition(topic) or PARTITIONS  # 0 is not a topic
        if len(self._known) >= _TOPIC_CACHE:
            self._known.clear()
        self._known[topic] = topic_id
        return topic_id


class CServer:
    """CServer owns one lmw_server (none until open()) and translates its calls.

    Every method is thread-safe (the C runtime holds one lock); a handle (fd, gen) that is
    stale never touches a reused file descriptor.
    """

    __slots__ = ("_ptr", "topic_id", "user_ids", "envelopes")

    def __init__(self) -> None:
        self._ptr: Any = None
        self.topic_id = TopicIds()
        #: user_ids maps user ids to the slots' tags and back (the Gateway sets the key a
        #: deployment shares).
        self.user_ids = UserIds()
        #: envelopes: clients may choose the envelope subprotocol (Config.history is on).
        self.envelopes = False

    # -- life -------------------------------------------------------------------------------

    def open(self, config: Any, stats: Any = None) -> None:
        """open makes the lmw_server from an lmw_config; stats may point into shared memory.

        Raises:
            OSError: the C runtime could not allocate its tables or descriptors.
        """
        ptr = lib.lmw_server_new(config, stats if stats is not None else ffi.NULL)
        if ptr == ffi.NULL:
            raise OSError("lowmemws: could not create the server (out of memory or fds)")
        self._ptr = ffi.gc(ptr, lib.lmw_server_free)
        self.stats().pid = os.getpid()  # live counters: /metrics and the supervisor look

    @property
    def is_open(self) -> bool:
        """is_open reports whether open() made a server."""
        return self._ptr is not None

    def stats(self) -> Any:
        """stats is this server's lmw_stats struct (in shared memory for worker processes)."""
        return lib.lmw_server_stats(self._ptr)

    def listen_add(self, fd: int) -> None:
        """listen_add hands a bound, listening, non-blocking socket to the server."""
        lib.lmw_listen_add(self._ptr, fd)

    def listen_stop(self) -> None:
        """listen_stop stops accepting for good (shutdown)."""
        lib.lmw_listen_stop(self._ptr)

    def poll(self, timeout_ms: int, out: Any, max_events: int) -> int:
        """poll runs one loop turn in C and returns the number of events stored at out[0]."""
        return int(lib.lmw_poll(self._ptr, timeout_ms, out, max_events))

    def wake(self) -> None:
        """wake makes the loop's current or next poll return at once; a no-op before open()."""
        if self._ptr is not None:
            lib.lmw_wake(self._ptr)

    def close_all(self, code: int) -> None:
        """close_all sends close code to every open connection (shutdown: 1001)."""
        lib.lmw_close_all(self._ptr, code)

    @property
    def connection_count(self) -> int:
        """connection_count is the number of open connections (0 before open())."""
        return int(lib.lmw_connection_count(self._ptr)) if self._ptr is not None else 0

    # -- one connection ---------------------------------------------------------------------

    def send(self, fd: int, gen: int, opcode: int, payload: Any) -> SendResult:
        """send frames payload (bytes, or a cffi buffer over the caller's memory: never
        copied unless queued) as one message with opcode to connection (fd, gen)."""
        if self._ptr is None:
            return SendResult.GONE
        result = lib.lmw_send(self._ptr, fd, gen, opcode, payload, len(payload))
        if result > 0:
            return SendResult.SENT
        return SendResult.DROPPED if result == 0 else SendResult.GONE

    def close(self, fd: int, gen: int, code: int, reason: bytes) -> bool:
        """close starts the closing handshake; False when the connection is not open."""
        if self._ptr is None:
            return False
        return bool(lib.lmw_close(self._ptr, fd, gen, code, reason, len(reason)) == 0)

    def connection_is_open(self, fd: int, gen: int) -> bool:
        """connection_is_open reports whether (fd, gen) is open (not closing, not gone)."""
        return self._ptr is not None and bool(lib.lmw_is_open(self._ptr, fd, gen))

    def subscribe(self, fd: int, gen: int, topic: str) -> bool:
        """subscribe adds (fd, gen) to topic; True when it is a member afterwards."""
        if self._ptr is None:
            return False
        return bool(lib.lmw_subscribe(self._ptr, fd, gen, self.topic_id(topic)) >= 0)

    def unsubscribe(self, fd: int, gen: int, topic: str) -> bool:
        """unsubscribe removes (fd, gen) from topic; True when it was a member."""
        if self._ptr is None:
            return False
        return bool(lib.lmw_unsubscribe(self._ptr, fd, gen, self.topic_id(topic)) > 0)

    def pause_reading(self, fd: int, gen: int) -> None:
        """pause_reading stops reading (fd, gen) until resume_reading (back-pressure)."""
        if self._ptr is None:
            return
        lib.lmw_pause_reading(self._ptr, fd, gen)

    def resume_reading(self, fd: int, gen: int) -> None:
        """resume_reading undoes pause_reading."""
        if self._ptr is None:
            return
        lib.lmw_resume_reading(self._ptr, fd, gen)

    def accept_hold(self, hold: bool) -> None:
        """accept_hold stops (True) or allows again (False) accepting: hooks at their cap."""
        lib.lmw_accept_hold(self._ptr, 1 if hold else 0)

    # -- answers to events ------------------------------------------------------------------

    def park_waiting(self) -> int:
        """park_waiting parks every upgrade and HTTP request of this loop turn still waiting
        for its answer (one C call for all of them); returns how many."""
        return int(lib.lmw_park_waiting(self._ptr))

    def accept_upgrade(self, fd: int, gen: int, subprotocol: bytes, user: int) -> bool:
        """accept_upgrade sends the 101; False when the client went away meanwhile (or the
        handshake was answered already: its deadline, or shutdown)."""
        if self._ptr is None:
            return False
        result = lib.lmw_upgrade_accept(self._ptr, fd, gen, subprotocol, len(subprotocol), user)
        return bool(result == 0)

    def reject(self, fd: int, gen: int, status: int) -> None:
        """reject answers a waiting request with a prebuilt HTTP error and closes it."""
        if self._ptr is None:
            return
        lib.lmw_reject(self._ptr, fd, gen, status)

    def respond(self, fd: int, gen: int, response: bytes) -> None:
        """respond sends a complete HTTP response to a waiting request and closes it."""
        if self._ptr is None:
            return
        lib.lmw_respond(self._ptr, fd, gen, response, len(response))

    # -- fan-out ----------------------------------------------------------------------------

    def topic_size(self, topic: str) -> int:
        """topic_size is the number of members of topic (0 before open())."""
        if self._ptr is None:
            return 0
        return int(lib.lmw_topic_size(self._ptr, self.topic_id(topic)))

    def publish(self, topic: str, opcode: int, payload: bytes, policy: int) -> int:
        """publish sends to every member of topic; returns how many took the message."""
        if self._ptr is None:
            return 0
        n = lib.lmw_publish(self._ptr, self.topic_id(topic), opcode, payload, len(payload), policy)
        return max(0, int(n))  # LMW_ERROR: the frame could not be built, nobody took it

    def send_user(self, user: int, opcode: int, payload: bytes, policy: int) -> int:
        """send_user sends to every connection tagged user; returns how many took it."""
        if self._ptr is None:
            return 0
        return max(
            0, int(lib.lmw_send_user(self._ptr, user, opcode, payload, len(payload), policy))
        )

    def broadcast(self, opcode: int, payload: bytes, policy: int) -> int:
        """broadcast sends to every open connection; returns how many took it."""
        if self._ptr is None:
            return 0
        return max(0, int(lib.lmw_broadcast(self._ptr, opcode, payload, len(payload), policy)))

    # -- presence and kick (issue 12) ---------------------------------------------------------

    def user_count(self, user_tag: int) -> int:
        """user_count is the number of open connections tagged user_tag (0 before open())."""
        if self._ptr is None:
            return 0
        return int(lib.lmw_user_count(self._ptr, user_tag))

    def close_user(self, user_tag: int, code: int, reason: bytes) -> int:
        """close_user starts the closing handshake with code and reason on every open
        connection tagged user_tag; returns how many (code and reason checked by the caller)."""
        if self._ptr is None:
            return 0
        return max(0, int(lib.lmw_close_user(self._ptr, user_tag, code, reason, len(reason))))

    def hold_user_name(self, tag: int, name: bytes) -> bool:
        """hold_user_name keeps the name (UTF-8) of the long str id tagged tag in this process
        until release_user_name; held from before the upgrade that tags a connection with
        it, it then lives as long as a connection of the user here (_user_names.c). False
        when it could not be kept (no memory): hooks then see a UserTag."""
        return (
            self._ptr is not None and lib.lmw_user_name_hold(self._ptr, tag, name, len(name)) == 0
        )

    def release_user_name(self, tag: int) -> None:
        """release_user_name ends one hold_user_name (or a closed event's hold) of tag."""
        if self._ptr is not None:
            lib.lmw_user_name_release(self._ptr, tag)

    def user_name(self, tag: int) -> str | None:
        """user_name is the str of the long str id tagged tag, None when it is not known
        here (no connection of that user in this process)."""
        if self._ptr is None:
            return None
        out = ffi.new("uint8_t[]", USER_NAME_MAX)
        n = lib.lmw_user_name(self._ptr, tag, out, USER_NAME_MAX)
        return None if n < 0 else bytes(ffi.buffer(out, n)).decode("utf-8")

    # -- the envelope subprotocol and resume (issue 12) --------------------------------------

    def publish_env(self, topic: str, opcode: int, payload: bytes, env: bytes, policy: int) -> int:
        """publish_env is publish with env (an envelope text) for the envelope clients."""
        if self._ptr is None:
            return 0
        n = lib.lmw_publish_env(
            self._ptr, self.topic_id(topic), opcode, payload, len(payload), env, len(env), policy
        )
        return max(0, int(n))

    def send_user_env(self, user: int, opcode: int, payload: bytes, env: bytes, policy: int) -> int:
        """send_user_env is send_user with env for the envelope clients."""
        if self._ptr is None:
            return 0
        n = lib.lmw_send_user_env(self._ptr, user, opcode, payload, len(payload), env, len(env),
                                  policy)  # fmt: skip
        return max(0, int(n))

    def broadcast_env(self, opcode: int, payload: bytes, env: bytes, policy: int) -> int:
        """broadcast_env is broadcast with env for the envelope clients."""
        if self._ptr is None:
            return 0
        n = lib.lmw_broadcast_env(self._ptr, opcode, payload, len(payload), env, len(env), policy)
        return max(0, int(n))

    def notify_envelope_clients(self, env: bytes) -> int:
        """notify_envelope_clients sends env to every envelope client, and nothing to others."""
        if self._ptr is None:
            return 0
        n = lib.lmw_broadcast_env(self._ptr, 1, ffi.NULL, 0, env, len(env), 0)
        return max(0, int(n))

    def is_envelope(self, fd: int, gen: int) -> bool:
        """is_envelope reports whether (fd, gen) is open and chose the envelope subprotocol."""
        return self._ptr is not None and bool(lib.lmw_is_envelope(self._ptr, fd, gen))

    def is_member(self, fd: int, gen: int, topic: str) -> bool:
        """is_member reports whether (fd, gen) is a member of topic."""
        if self._ptr is None:
            return False
        return bool(lib.lmw_is_member(self._ptr, fd, gen, self.topic_id(topic)))

    def set_user(self, fd: int, gen: int, user: int) -> bool:
        """set_user retags (fd, gen) with user (0: none); False when it is not open."""
        return self._ptr is not None and lib.lmw_set_user(self._ptr, fd, gen, user) == 0

    # -- paced fan-out (issue 18) -----------------------------------------------------------

    def paced_start(
        self,
        to: PaceTarget,
        opcode: int,
        payload: bytes,
        policy: int,
        pace: Pace,
        env: bytes | None = None,
    ) -> int:
        """paced_start sends payload to a topic's members (to: the topic name), the
        connections of a set of users (a tuple of tags) or everyone (None), over time
        (pace: id, spread seconds, rate per second; neither spread nor rate: now); with env
        (an envelope text), the envelope clients get env instead (issue 12).
        Returns the members found now (paced) or the number that took it (not paced)."""
        if self._ptr is None:
            return 0
        pace_id, spread, rate = pace
        topic, users, nusers, kind = 0, ffi.NULL, 0, int(lib.LMW_PACE_ALL)
        if isinstance(to, str):
            topic, kind = self.topic_id(to), int(lib.LMW_PACE_TOPIC)
        elif to is not None:
            users, nusers, kind = ffi.new("uint64_t[]", to), len(to), int(lib.LMW_PACE_USERS)
        n = lib.lmw_paced_start_env(
            self._ptr, pace_id, kind, topic, users, nusers, opcode, payload, len(payload),
            ffi.NULL if env is None else env, 0 if env is None else len(env), policy, spread,
            rate,
        )  # fmt: skip
        return max(0, int(n))  # LMW_ERROR: no memory for it; nobody gets it

    def tls_configure(self, certfile: str, keyfile: str) -> None:
        """tls_configure makes the server's connections TLS ones, or replaces the certificate.

        Raises:
            TLSError: built without OpenSSL, or the files cannot be used (the reason).
        """
        err = ffi.new("char[]", 512)
        if self._ptr is None:
            raise TLSError("the server is not open")
        r = lib.lmw_tls_configure(
            self._ptr, os.fsencode(certfile), os.fsencode(keyfile), err, len(err)
        )
        if r != 0:
            raise TLSError(ffi.string(err).decode("utf-8", "replace"))

    def paced_cancel(self, pace_id: int) -> int:
        """paced_cancel ends every paced send named pace_id; returns the members not reached."""
        if self._ptr is None:
            return 0
        return int(lib.lmw_paced_cancel(self._ptr, pace_id))

    # -- interest routing (issue 15) --------------------------------------------------------

    def watch_interest(self, fd: int) -> None:
        """watch_interest makes the hub write a byte to fd whenever a routing partition gains
        its first local member or loses its last (-1 stops it)."""
        if self._ptr is not None:
            lib.lmw_interest_watch(self._ptr, fd)

    def interest(self) -> tuple[bytes, bytes]:
        """interest is (user partitions, topic partitions) with local members now, each a
        bitmap of PARTITIONS bits (bit p of byte p // 8); empty before open()."""
        size = PARTITIONS // 8
        if self._ptr is None:
            return bytes(size), bytes(size)
        users, topics = ffi.new("uint8_t[]", size), ffi.new("uint8_t[]", size)
        lib.lmw_interest(self._ptr, users, topics)
        return bytes(ffi.buffer(users)), bytes(ffi.buffer(topics))

    def user_held(self, user: int) -> bool:
        """user_held tells whether a connection tagged user is open here."""
        return self._ptr is not None and bool(lib.lmw_user_held(self._ptr, user))

    def topic_held(self, topic: str) -> bool:
        """topic_held tells whether topic has a member here."""
        return self.topic_size(topic) > 0

    def native_hub(self) -> Any:
        """native_hub is the lmw_server (a cffi pointer) for C callers of lmw_user_held that
        run beside it (RedisBus's filter), ffi.NULL before open() and after close()."""
        return ffi.NULL if self._ptr is None else self._ptr


def tls_available() -> bool:
    """tls_available tells whether this build of lowmemws can serve TLS (it found OpenSSL)."""
    return bool(lib.lmw_tls_available())


def c_config(config: Config, auto_upgrade: bool) -> Any:
    """c_config returns a filled lmw_config for config: the one place a Config reaches C.

    auto_upgrade: complete upgrades in C (no on_connect, on_open, origins or subprotocols
    to consult), so an upgrade never waits for Python.
    """
    c = ffi.new("lmw_config *")
    c.max_connections = config.resolved_max_connections()
    c.max_handshakes = config.max_handshakes
    c.max_head = config.max_head
    c.max_http_body = config.max_http_body
    c.max_message = config.max_message_size
    c.read_buffer_size = config.read_buffer_size
    c.read_buffers = config.read_buffers
    c.spill_budget = config.resolved_spill_budget()
    c.write_limit = config.write_limit
    c.write_budget = config.write_budget
    c.handshake_timeout_ms = int(config.handshake_timeout * 1000)
    c.ping_interval_ms = int(config.ping_interval * 1000)
    c.ping_timeout_ms = int(config.ping_timeout * 1000)
    c.close_timeout_ms = int(config.close_timeout * 1000)
    c.message_timeout_ms = int(config.message_timeout * 1000)
    c.accept_batch = config.accept_batch
    c.max_per_ip = config.max_per_ip
    c.write_policy = POLICIES[config.write_policy]
    c.auto_upgrade = 1 if auto_upgrade else 0
    c.deflate = 1 if config.compression else 0
    c.deflate_level = config.compression_level
    c.deflate_min_size = config.compression_min_size
    return c
