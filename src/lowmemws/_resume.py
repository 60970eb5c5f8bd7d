"""Resume: the replay of what a reconnecting client missed, before its live messages.

Theory of operation (issue 12). A client of the envelope subprotocol names its last
position per stream (see _wire_envelope). Its Upgrade is accepted at once, but the streams
it resumes are not joined yet: the topics are not subscribed and the user tag is not set,
so no live message of those streams reaches it. A replay thread then, for each stream:

1. reads the history after the client's offset and takes the stream's stripe lock, which
   the delivery of a stored message also holds while it fans out and notes the stream's
   last delivered offset on this node (``D``). `Bus.history_read` takes the lock at a
   moment when the result holds everything delivered here (RedisBus: lock, then read,
   since a message is stored before it is delivered; LocalBus: the same between two
   publishes, so it holds nothing stored and not delivered yet; ProcessBus: the parent's
   answer comes behind every envelope stored before it, and the worker's reader thread
   takes the lock when it meets the answer, before delivering anything stored after);
2. sends the entries up to ``D`` (those past ``D`` are stored but not delivered here yet:
   they will arrive live), joins the stream, sends the outcome, and lets go of the lock.
   On a bus whose read settles (`BusBase.read_settles`: RedisBus, LocalBus) it sends the
   whole result instead: there an entry past ``D`` is one this node never got (it was not
   subscribed to the stream's partition then) and none of them will arrive live.

The streams a connection joins at once (those it names no position for: it learns their
baseline from the outcome) must be received by this node before its 101: on RedisBus the
partition channel of such a stream may not be subscribed yet (no member here had it), and a
message stored between the 101 and the confirmed SUBSCRIBE would reach the node neither live
nor as something to replay, while the baseline, read afterwards, would count it. So the
upgrade waits (`wait_subscribed`) until Redis confirmed those channels; busy partitions are
confirmed already and cost nothing.

So a replayed message is never also delivered live, none is skipped, and none overtakes
the replay. The work is bounded: `History.replay_threads` connections at a time per
process, at most `History.replay_queue` waiting (a tuple each, while it waits), and per
stream at most `History.replay_max_messages` and `History.replay_max_bytes`; past a bound,
and when the history does not reach back to the client's position or its epoch differs,
the outcome is "refresh". A replayed message that the write bounds refuse (Config.write_limit,
write_budget) ends that stream's replay with "refresh" too. Memory is per stream (the last
delivered offsets, bounded by `History.max_streams`) and per connection only while it is
being resumed.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._c_server import CServer
from ._constants import OP_TEXT
from ._history import History, ReadResult
from ._wire_envelope import SYNCED_FRAME, ResumeRequest, message_frame, outcome_frame
from .connection import SendResult
from .errors import BusUnavailable

__all__ = ["Resumer", "ResumeJob"]

log = logging.getLogger("lowmemws.resume")

_STRIPES = 64  # locks shared by all streams: constant memory, little contention


def joined_streams(
    topics: tuple[str, ...], user_tag: int, positions: ResumeRequest | None
) -> dict[str, tuple[str, int] | None]:
    """joined_streams: for a client that resumes, every stream its Accept joins (its
    topics, its user tag's stream) with the position it named, None for those it did not
    name, plus the other streams it named. The unnamed ones are joined at once (nothing to
    replay) and the client is told their position (a baseline for its next resume); the
    named ones are joined once replayed."""
    if positions is None:
        return {}
    streams: dict[str, tuple[str, int] | None] = {f"t:{topic}": None for topic in topics}
    if user_tag:
        streams[f"u:{user_tag}"] = None
    streams.update(positions)
    return streams


@dataclass
class ResumeJob:
    """ResumeJob is one connection waiting for its replay.

    ``topics`` are the topics it may resume and will join (those of ``positions`` are not
    subscribed yet); ``user`` its user tag (the slot's 64-bit tag, as in "u:<tag>"), set once
    its user stream is replayed when ``user_deferred``; ``name_held``: the name of that
    (long str) user is held for it (`CServer.hold_user_name`) until the tag is set or the
    connection closes, since no slot of the process may carry the tag meanwhile.
    """

    fd: int
    gen: int
    positions: dict[str, tuple[str, int] | None]
    topics: frozenset[str]
    user: int
    user_deferred: bool
    name_held: bool = False


class Resumer:
    """Resumer replays history to resuming connections and orders it against deliveries."""

    def __init__(self, server: CServer, bus: Any, history: History) -> None:
        self._server = server
        self._bus = bus
        self._history = history
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]
        self._delivered: OrderedDict[str, tuple[str, int]] = OrderedDict()
        self._delivered_lock = threading.Lock()
        self._jobs: queue.Queue[ResumeJob | None] = queue.Queue(history.replay_queue)
        self._threads: list[threading.Thread] = []
        self._stats = {"replayed": 0, "resumed": 0, "refreshed": 0}
        # (fd, gen) -> user tag of a connection whose slot has no tag yet (its user stream
        # is being replayed): what its hooks see meanwhile. Set before the upgrade's first
        # event can be read, dropped once the tag is set or at the close.
        self._deferred_users: dict[tuple[int, int], int] = {}
        # (fd, gen) -> user tag whose name is held for a deferred connection: released
        # exactly once (dict.pop is atomic), at the join or at the close, whichever is first.
        self._deferred_names: dict[tuple[int, int], int] = {}

    # -- the delivery side ------------------------------------------------------------------

    def stripe(self, stream: str) -> threading.Lock:
        """stripe is the lock that orders stream's deliveries against its replays."""
        return self._stripes[hash(stream) % _STRIPES]

    def delivered(self, stream: str, epoch: str, offset: int) -> None:
        """delivered notes stream's last delivered position on this node (under its stripe)."""
        with self._delivered_lock:
            self._delivered[stream] = (epoch, offset)
            self._delivered.move_to_end(stream)
            if len(self._delivered) > self._history.max_streams:
                self._delivered.popitem(last=False)

    # -- the replay side --------------------------------------------------------------------

    def start(self) -> None:
        """start begins the replay threads (the replay budget)."""
        for index in range(self._history.replay_threads):
            thread = threading.Thread(
                target=self._run, name=f"lowmemws-replay-{index}", daemon=True
            )
            self._threads.append(thread)
            thread.start()

    def stop(self) -> None:
        """stop ends the replay threads once the jobs queued before it are done."""
        for _ in self._threads:
            try:
                self._jobs.put_nowait(None)
            except queue.Full:
                pass

    def stats(self) -> dict[str, int]:
        """stats counts streams of resumes: ``replayed`` (messages were sent), ``resumed``
        (complete, baselines included) and ``refreshed`` (told to refresh); /metrics shows
        them as lowmemws_history_<name>_total."""
        return dict(self._stats)

    def user_of(self, fd: int, gen: int, slot_tag: int) -> int:
        """user_of is the user tag a connection's hooks see: its slot's, or while its user
        stream is being replayed (the slot's is 0 until then), the one it was accepted with."""
        return slot_tag or self._deferred_users.get((fd, gen), 0)

    def closed(self, fd: int, gen: int) -> None:
        """closed forgets a closed connection's deferred user tag (if it still had one)."""
        self._deferred_users.pop((fd, gen), None)
        self._release_name(fd, gen)

    def _release_name(self, fd: int, gen: int) -> None:
        tag = self._deferred_names.pop((fd, gen), None)
        if tag is not None:
            self._server.release_user_name(tag)

    def wait_subscribed(self, streams: list[str], ready: Callable[[], None]) -> bool:
        """wait_subscribed: True when a connection that joins ``streams`` at its upgrade may
        get its 101 now (this node receives their live messages, or its bus always does).
        False: ``ready`` runs later, on another thread, once it may; the caller answers the
        upgrade then and lets go with `release_streams`."""
        when_subscribed = getattr(self._bus, "when_subscribed", None)
        return when_subscribed is None or bool(when_subscribed(streams, ready))

    def release_streams(self, streams: list[str]) -> None:
        """release_streams ends the wait of a `wait_subscribed` that returned False."""
        self._bus.release_streams(streams)

    def submit(self, job: ResumeJob) -> None:
        """submit queues job; with the queue full, its streams are joined at once and the
        client is told to refresh them."""
        if job.user_deferred:
            self._deferred_users[(job.fd, job.gen)] = job.user
            if job.name_held:
                self._deferred_names[(job.fd, job.gen)] = job.user
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            for stream in job.positions:
                self._join(job, stream)
                self._outcome(job, False, stream, "", 0)
            self._server.send(job.fd, job.gen, OP_TEXT, SYNCED_FRAME)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                self._replay(job)
            except Exception:
                log.exception("lowmemws: a resume replay failed")

    def _replay(self, job: ResumeJob) -> None:
        for stream, position in job.positions.items():
            if not self._allowed(job, stream):
                self._outcome(job, False, stream, "", 0)
                continue
            if not self._replay_stream(job, stream, position):
                return  # the connection is gone
        self._server.send(job.fd, job.gen, OP_TEXT, SYNCED_FRAME)

    def _allowed(self, job: ResumeJob, stream: str) -> bool:
        if stream.startswith("t:"):
            topic = stream[2:]
            return topic in job.topics or self._server.is_member(job.fd, job.gen, topic)
        return stream == f"u:{job.user}" and job.user != 0

    def _replay_stream(self, job: ResumeJob, stream: str, position: tuple[str, int] | None) -> bool:
        """Replay one stream (None: no position, just tell the current one); False when the
        connection went away."""
        stripe = self.stripe(stream)
        result = self._read_holding(stripe, stream, position[1] if position else 2**62)
        try:
            settled = getattr(self._bus, "read_settles", False)
            delivered = None if settled else self._delivered_in(stream, result)
            upto = result.last if delivered is None else min(delivered, result.last)
            if position is None:
                self._join(job, stream)
                if not result.epoch and result.truncated:  # unreachable: no baseline to give
                    return True
                return self._outcome(job, True, stream, result.epoch, upto)
            epoch, offset = position
            return self._settle(job, stream, epoch, offset, result, upto)
        finally:
            stripe.release()

    def _read_holding(self, stripe: threading.Lock, stream: str, after: int) -> ReadResult:
        """Read stream's history; return holding its stripe (see Bus.history_read)."""
        history = self._history
        try:
            result: ReadResult = self._bus.history_read(
                stream, after, history.replay_max_messages, history.replay_max_bytes, stripe
            )
        except BusUnavailable as exc:
            log.warning("lowmemws: history of %s unavailable for a resume: %s", stream, exc)
            stripe.acquire()
            return ReadResult("", 0, 1, truncated=True)
        return result

    def _delivered_in(self, stream: str, result: ReadResult) -> int | None:
        with self._delivered_lock:
            known = self._delivered.get(stream)
        if known is None or known[0] != result.epoch:
            return None
        return known[1]

    def _settle(
        self,
        job: ResumeJob,
        stream: str,
        epoch: str,
        offset: int,
        result: ReadResult,
        upto: int,
    ) -> bool:
        """Under the stream's stripe: replay, join, tell the outcome. A client at ("", 0)
        knew the stream before it had any message: it resumes from the first."""
        from_start = epoch == "" and offset == 0
        if not result.epoch:  # no such stream (or, truncated, its history unreachable)
            complete = from_start and not result.truncated
        else:
            complete = (result.epoch == epoch or from_start) and offset <= result.last
        missing = [(at, entry) for at, entry in result.entries if offset < at <= upto]
        if complete and offset < upto:
            reached = missing[-1][0] if missing else offset
            complete = result.first <= offset + 1 and reached == upto
        sent = SendResult.SENT
        if complete:
            for at, entry in missing:
                frame = message_frame(entry[0], entry[1:], stream, result.epoch, at)
                sent = self._server.send(job.fd, job.gen, OP_TEXT, frame)
                if sent is not SendResult.SENT:
                    break
            if missing:
                self._stats["replayed"] += 1
        if sent is SendResult.GONE:
            return False
        self._join(job, stream)
        resumed = complete and sent is SendResult.SENT
        return self._outcome(job, resumed, stream, result.epoch, upto)

    def _join(self, job: ResumeJob, stream: str) -> None:
        if stream.startswith("t:"):
            if stream[2:] in job.topics:
                self._server.subscribe(job.fd, job.gen, stream[2:])
        elif job.user_deferred:
            self._server.set_user(job.fd, job.gen, job.user)
            self._deferred_users.pop((job.fd, job.gen), None)  # the slot tells it now
            self._release_name(job.fd, job.gen)  # the hub holds the name from now on

    def _outcome(self, job: ResumeJob, resumed: bool, stream: str, epoch: str, at: int) -> bool:
        self._stats["resumed" if resumed else "refreshed"] += 1
        frame = outcome_frame(resumed, stream, epoch, at)
        return self._server.send(job.fd, job.gen, OP_TEXT, frame) is not SendResult.GONE
