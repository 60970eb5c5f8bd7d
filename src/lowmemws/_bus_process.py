"""ProcessBus: the relay between the SO_REUSEPORT worker processes of one machine.

Theory of operation. The parent creates the bus before forking: one AF_UNIX SOCK_SEQPACKET
socketpair per worker. Each worker keeps its end of its own pair and nothing else; the parent
keeps the other end of every pair. A worker publishes by writing the encoded envelope to the
parent; a reader thread in the parent takes every message from every worker (and the parent's
own publishes) and queues it for every live worker, the publisher included, so each worker gets
each envelope exactly once and all workers see one order. One writer thread per worker drains
that worker's queue, so a slow worker delays nobody else. In each worker a reader thread calls
``deliver``, so delivery never runs on the worker's event loop.

Messages are cut into records of at most 64 KiB (a record must fit the socket buffer, and the
kernel's default is about 208 KiB): the first byte of a record says whether it opens and/or
closes a message. A record that opens a message while another is unfinished discards the
unfinished one (counted as malformed): that is what a publisher's send timeout leaves behind.

Life cycle, in the parent::

    bus = ProcessBus(workers=n)
    for i in range(n):
        if os.fork() == 0:
            bus.attach_worker(i)        # child: keep pair i only
            bus.start(gateway_deliver)  # child: reader thread calls deliver
            ...                         # serve; bus.publish(...) from any thread
    bus.attach_parent()                 # parent: close the children's ends, start relaying

and when worker i has died and is forked again::

    bus.respawn_pair(i)                 # parent: a fresh pair for slot i
    if os.fork() == 0:
        bus.attach_worker(i)
        ...
    bus.attach_parent()                 # parent: close the new child end

Only fork is supported (a spawned process has no copy of the sockets).

History (issue 12): with `enable_history`, the parent owns the machine's `MemoryStore`. Every
topic or user envelope passes through the parent's relay, which stores it and stamps its
position before queueing it for the workers, under the lock that orders the queues: every
worker sees each stream in offset order. A worker reads history by sending a read request
(`_READ_REQUEST`) on its own pair; the parent answers (`_READ_REPLY`) through that worker's
queue, behind every envelope queued before it.
"""

from __future__ import annotations

import itertools
import json
import os
import selectors
import socket
import struct
import threading
from collections import deque

from ._bus_base import (
    QUERY_KINDS,
    BusBase,
    BusStats,
    Deliver,
    Envelope,
    Query,
    ReadWaiter,
    answer_envelope,
    is_encoded_query,
    log,
    read_holding,
)
from ._history import History, MemoryStore, ReadResult, stored_entry
from .errors import BusUnavailable

__all__ = ["ProcessBus"]

_FIRST = 1
_LAST = 2
_RECORD = 64 * 1024
_MiB = 1024 * 1024
# The first byte of a message that is not an envelope (envelope versions are 1 to 3).
_READ_REQUEST = 0x10  # worker to parent: request id, JSON {s, a, n, b}
_READ_REPLY = 0x11  # parent to worker: request id, JSON head, newline, the entries
_REQUEST_ID = struct.Struct(">Q")


def _send_message(sock: socket.socket, data: bytes) -> None:
    """Write one message as records of at most _RECORD bytes, each prefixed by its flags."""
    view = memoryview(data)
    for start in range(0, len(view), _RECORD):
        end = start + _RECORD
        flags = (_FIRST if start == 0 else 0) | (_LAST if end >= len(view) else 0)
        sock.sendmsg([bytes((flags,)), view[start:end]])


class _Reassembler:
    """Joins the records of one peer into messages; bounded by ``limit`` bytes."""

    __slots__ = ("parts", "size", "limit", "active")

    def __init__(self, limit: int) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.limit = limit
        self.active = False

    def feed(self, record: bytes, stats: BusStats) -> bytes | None:
        """feed takes one record and returns a whole message once its last record arrived."""
        flags, body = record[0], record[1:]
        if flags & _FIRST:
            if self.active:
                stats.add("malformed")
            self.parts, self.size, self.active = [], 0, True
        elif not self.active:
            stats.add("malformed")
            return None
        self.size += len(body)
        if self.size > self.limit:
            stats.add("malformed")
            self.parts, self.size, self.active = [], 0, False
            return None
        self.parts.append(body)
        if not flags & _LAST:
            return None
        message = self.parts[0] if len(self.parts) == 1 else b"".join(self.parts)
        self.parts, self.size, self.active = [], 0, False
        return message


class _Slot:
    """The parent's side of one worker: its socket, outgoing queue and writer thread."""

    __slots__ = ("index", "sock", "child", "queue", "queued_bytes", "alive", "reasm", "thread")

    def __init__(self, index: int, limit: int) -> None:
        self.index = index
        pair = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock: socket.socket = pair[0]
        self.child: socket.socket | None = pair[1]
        self.queue: deque[bytes] = deque()
        self.queued_bytes = 0
        self.alive = True
        self.reasm = _Reassembler(limit)
        self.thread: threading.Thread | None = None


class ProcessBus(BusBase):
    """ProcessBus carries envelopes between the worker processes of one machine (``processes=N``).

    ``workers`` is the number of worker slots. ``max_message`` bounds one encoded envelope
    (publish raises ValueError above it). ``max_queued_bytes`` bounds what the parent holds for
    one worker that does not read: past it that worker misses the envelope and ``dropped`` is
    counted. ``send_timeout`` bounds how long a publish may wait for a busy parent before it
    raises BusUnavailable. If the parent dies, each worker's reader sees end-of-file: it counts
    a disconnect, sets `parent_gone`, and later publishes raise BusUnavailable.

    Raises:
        ValueError: workers is less than 1.
    """

    def __init__(
        self,
        workers: int,
        *,
        max_message: int = 16 * _MiB,
        max_queued_bytes: int = 16 * _MiB,
        send_timeout: float = 5.0,
    ) -> None:
        if workers < 1:
            raise ValueError("ProcessBus: workers must be at least 1")
        super().__init__()
        self._workers = workers
        self._max_message = max_message
        self._max_queued = max_queued_bytes
        self._send_timeout = send_timeout
        self._owner_pid = os.getpid()
        self._role = "created"
        self._slots = [_Slot(i, max_message) for i in range(workers)]
        self._lock = threading.Condition()
        self._closing = False
        self._changed = True
        self._wake_r, self._wake_w = socket.socketpair()
        self._reader: threading.Thread | None = None
        self._selector: selectors.BaseSelector | None = None
        self._retired: list[socket.socket] = []
        self._sock: socket.socket | None = None
        self._send_lock = threading.Lock()
        #: parent_gone is set in a worker once the parent's end of its pair has closed.
        self.parent_gone = threading.Event()
        self._store: MemoryStore | None = None
        self._reads: dict[int, ReadWaiter] = {}  # worker: its history reads under way
        self._read_ids = itertools.count(1)

    # -- roles -------------------------------------------------------------------------------

    def attach_worker(self, index: int) -> None:
        """attach_worker makes this forked child worker ``index``: it closes every socket but its
        own end of pair ``index`` and forgets the parent's state. Call it first thing after fork.

        Raises:
            RuntimeError: called in the process that made the bus, or twice for one pair.
        """
        if os.getpid() == self._owner_pid:
            raise RuntimeError("ProcessBus.attach_worker: call it in the forked child")
        own = self._slots[index].child
        if own is None:
            raise RuntimeError(f"ProcessBus.attach_worker: pair {index} has no child end")
        for slot in self._slots:
            slot.sock.close()
            if slot.child is not None and slot.child is not own:
                slot.child.close()
        for sock in (*self._retired, self._wake_r, self._wake_w):
            sock.close()
        if self._selector is not None:
            self._selector.close()
        self._slots, self._reader, self._role = [], None, "worker"
        self._lock, self._send_lock = threading.Condition(), threading.Lock()
        self.stats, self.parent_gone = BusStats(), threading.Event()
        self._store, self._reads = None, {}  # the parent's store answers for this worker
        own.settimeout(self._send_timeout)
        self._sock = own

    def attach_parent(self) -> None:
        """attach_parent closes, in the parent, the children's ends of the pairs forked since the
        last call, and starts the relay threads on the first call. Call it after every round of
        forks: the first one and each respawn.

        Raises:
            RuntimeError: called in a process other than the one that made the bus.
        """
        if os.getpid() != self._owner_pid:
            raise RuntimeError("ProcessBus.attach_parent: call it in the process that made the bus")
        with self._lock:
            for slot in self._slots:
                if slot.child is not None:
                    slot.child.close()
                    slot.child = None
                self._start_writer(slot)
            if self._role == "created":
                self._role = "parent"
                self._reader = threading.Thread(
                    target=self._relay_loop, name="lowmemws-procbus-relay", daemon=True
                )
                self._reader.start()

    def respawn_pair(self, index: int) -> None:
        """respawn_pair gives slot ``index`` a fresh socketpair in the parent, before the parent
        forks a replacement worker for it; the old worker must have exited (its end is closed).

        Raises:
            RuntimeError: attach_parent() has not been called yet.
        """
        if self._role != "parent":
            raise RuntimeError("ProcessBus.respawn_pair: call attach_parent() first")
        with self._lock:
            old = self._slots[index]
            old.alive = False
            self._lock.notify_all()
            fresh = _Slot(index, self._max_message)
            fresh.sock.settimeout(self._send_timeout)
            self._slots[index] = fresh
            self._retired.append(old.sock)
            self._changed = True
        _shutdown(old.sock)
        self.stats.add("reconnects")
        self._wake()

    # -- the Bus protocol --------------------------------------------------------------------

    def start(self, deliver: Deliver) -> None:
        """start begins delivering to this process: in a worker, a reader thread calls
        ``deliver`` for each envelope; in the parent (optional) the relay thread does."""
        self._deliver = deliver
        if self._role == "worker" and self._reader is None:
            self._reader = threading.Thread(
                target=self._worker_loop, name="lowmemws-procbus-reader", daemon=True
            )
            self._reader.start()

    def publish(self, envelope: Envelope) -> int:
        """publish sends ``envelope`` to every worker, this one included, exactly once.

        In a worker it blocks at most ``send_timeout`` while the parent is busy. Returns 0:
        every worker, this one too, gets the envelope later, on its reader thread.

        Raises:
            BusUnavailable: the bus is not attached, closed, the parent is gone or the
                timeout passed (the parent then drops the partial message, so nothing is
                delivered).
            ValueError: the envelope is longer than ``max_message``.
        """
        data = envelope.encode()
        if len(data) > self._max_message:
            raise ValueError(f"ProcessBus.publish: {len(data)} bytes > max_message")
        if self._closing or self._role == "created" or self.parent_gone.is_set():
            self.stats.add("refused")
            raise BusUnavailable(f"ProcessBus is not available (role {self._role})")
        if self._role == "parent":
            self.stats.add("published")
            self._relay(data)
            return 0
        self._publish_to_parent(data)
        return 0

    def node_count(self) -> int:
        """node_count is the number of worker processes a publish reaches."""
        return self._workers

    def enable_history(self, history: History) -> None:
        """enable_history makes the parent keep the machine's history (call it before the
        workers are forked)."""
        self._store = MemoryStore(history)

    def history_read(
        self,
        stream: str,
        after: int,
        max_count: int,
        max_bytes: int,
        lock: threading.Lock | None = None,
    ) -> ReadResult:
        """history_read asks the parent's store (see BusBase.history_read); in a worker it
        waits at most ``send_timeout`` for the answer. The answer comes behind every envelope
        stored before the read, so the reader thread takes ``lock`` when it meets the
        answer, before it delivers anything stored after.

        Raises:
            BusUnavailable: the parent cannot be reached or did not answer in time.
        """
        store = self._store
        if store is not None:
            result: ReadResult = read_holding(
                lock, lambda: store.read(stream, after, max_count, max_bytes)
            )
            return result
        if self._role != "worker" or self.parent_gone.is_set():
            raise BusUnavailable("ProcessBus.history_read: no history here")
        request_id = next(self._read_ids)
        waiter = ReadWaiter(lock)
        self._reads[request_id] = waiter
        query = {"s": stream, "a": after, "n": max_count, "b": max_bytes}
        try:
            self._publish_to_parent(
                bytes((_READ_REQUEST,)) + _REQUEST_ID.pack(request_id) + json.dumps(query).encode()
            )
            reply = waiter.wait(self._send_timeout)
        finally:
            self._reads.pop(request_id, None)
        if reply is None:
            raise BusUnavailable("ProcessBus.history_read: the parent did not answer")
        return _decode_read(reply)

    def answer(self, query: Query, count: int) -> None:
        """answer sends this worker's count to every process (through the parent, like a
        publish); the asker is the one waiting for that query id, the others ignore it."""
        if not query.query_id:
            return
        try:
            self.publish(answer_envelope(query.query_id, count))
        except BusUnavailable as exc:
            log.warning("lowmemws ProcessBus: could not answer a presence query: %s", exc)

    def close(self) -> None:
        """close stops the threads and closes the sockets; workers of a closed parent see EOF."""
        with self._lock:
            self._closing = True
            self._lock.notify_all()
        if self._role == "worker" and self._sock is not None:
            _shutdown(self._sock)
        else:
            self._wake()
        for thread in [self._reader, *(s.thread for s in self._slots)]:
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=2.0)
        for slot in self._slots:
            slot.sock.close()
            if slot.child is not None:
                slot.child.close()
        if self._sock is not None:
            self._sock.close()

    # -- worker side -------------------------------------------------------------------------

    def _publish_to_parent(self, data: bytes) -> None:
        assert self._sock is not None
        try:
            with self._send_lock:
                _send_message(self._sock, data)
        except OSError as exc:
            self.stats.add("refused")
            raise BusUnavailable(f"ProcessBus: cannot reach the parent: {exc}") from exc
        self.stats.add("published")

    def _worker_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        reasm = _Reassembler(self._max_message)
        while not self._closing:
            try:
                record = sock.recv(_RECORD + 1)
            except TimeoutError:
                continue
            except OSError:
                record = b""
            if not record:
                break
            message = reasm.feed(record, self.stats)
            if message is not None:
                self._deliver_encoded(message)
        if not self._closing:
            log.warning("lowmemws ProcessBus: the parent process is gone")
            self.stats.add("disconnects")
        self.parent_gone.set()

    def _deliver_encoded(self, message: bytes) -> None:
        if message[:1] == bytes((_READ_REPLY,)):
            (request_id,) = _REQUEST_ID.unpack_from(message, 1)
            waiter = self._reads.get(request_id)
            if waiter is not None:
                waiter.answer(message[1 + _REQUEST_ID.size :])
            return
        try:
            envelope = Envelope.decode(message)
        except ValueError:
            self.stats.add("malformed")
            return
        self._deliver_safely(envelope)

    # -- parent side -------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass

    def _start_writer(self, slot: _Slot) -> None:
        if slot.thread is None and slot.alive:
            slot.sock.settimeout(self._send_timeout)
            slot.thread = threading.Thread(
                target=self._writer_loop,
                args=(slot,),
                name=f"lowmemws-procbus-writer-{slot.index}",
                daemon=True,
            )
            slot.thread.start()

    def _relay(self, data: bytes, origin: _Slot | None = None) -> None:
        """Queue one message for every live worker; a full queue drops it for that worker.
        With history, a topic or user envelope is stored first and goes out with its
        position; a read request from worker ``origin`` is answered to it alone."""
        if data[:1] == bytes((_READ_REQUEST,)):
            if origin is not None:
                self._answer_read(origin, data)
            return
        dead = 0
        with self._lock:
            if self._store is not None:
                data = self._stamp(data)
            for slot in self._slots:
                if not slot.alive:
                    dead += 1
                    continue
                if slot.queued_bytes + len(data) > self._max_queued:
                    self.stats.add("dropped")
                    continue
                slot.queue.append(data)
                slot.queued_bytes += len(data)
                self.stats.add("buffered")
                self.stats.add("buffered_bytes", len(data))
            self._lock.notify_all()
        self.stats.add("relayed")
        if self._deliver is not None or self.queries.waiting:  # answers to the parent's queries
            self._deliver_encoded(data)
        if dead and is_encoded_query(data):
            self._answer_for_the_dead(data, dead)

    def _answer_for_the_dead(self, data: bytes, dead: int) -> None:
        """A presence query reaches no worker that is dead (until it is forked again), and
        a dead worker holds no connection: the parent answers 0 for each, so the asker does
        not wait for them until its timeout."""
        try:
            envelope = Envelope.decode(data)
        except ValueError:
            return
        if envelope.kind not in QUERY_KINDS:
            return
        query = Query.parse(envelope)
        if query.query_id:
            answer = answer_envelope(query.query_id, 0).encode()
            for _ in range(dead):
                self._relay(answer)

    def _stamp(self, data: bytes) -> bytes:
        """The envelope in data stored in its stream, with its position (as it was when it
        has no stream or is malformed: the workers count that)."""
        assert self._store is not None
        try:
            envelope = Envelope.decode(data)
        except ValueError:
            return data
        stream = envelope.stream
        if stream is None or envelope.epoch:  # paced too: stored first, then paced
            return data
        epoch, offset = self._store.append(stream, stored_entry(envelope))
        return envelope.with_position(epoch, offset).encode()

    def _answer_read(self, slot: _Slot, data: bytes) -> None:
        request_id = data[1 : 1 + _REQUEST_ID.size]
        try:
            query = json.loads(data[1 + _REQUEST_ID.size :])
            stream, after = str(query["s"]), int(query["a"])
            max_count, max_bytes = int(query["n"]), int(query["b"])
        except (ValueError, KeyError, TypeError):
            self.stats.add("malformed")
            return
        if self._store is None:
            result = ReadResult("", 0, 1)
        else:
            result = self._store.read(stream, after, max_count, max_bytes)
        reply = bytes((_READ_REPLY,)) + request_id + _encode_read(result)
        with self._lock:
            if slot.alive:
                slot.queue.append(reply)
                slot.queued_bytes += len(reply)
                self.stats.add("buffered")
                self.stats.add("buffered_bytes", len(reply))
                self._lock.notify_all()

    def _writer_loop(self, slot: _Slot) -> None:
        while True:
            with self._lock:
                while not slot.queue and slot.alive and not self._closing:
                    self._lock.wait()
                if self._closing or not slot.alive:
                    self._forget_queue(slot)
                    return
                data = slot.queue.popleft()
                slot.queued_bytes -= len(data)
                self.stats.add("buffered", -1)
                self.stats.add("buffered_bytes", -len(data))
            try:
                _send_message(slot.sock, data)
            except OSError:
                # The worker died (EPIPE) or stopped reading (timeout): the reader thread sees
                # the EOF of a death; a stalled worker only misses this message.
                self.stats.add("dropped")

    def _forget_queue(self, slot: _Slot) -> None:
        self.stats.add("buffered", -len(slot.queue))
        self.stats.add("buffered_bytes", -slot.queued_bytes)
        slot.queue.clear()
        slot.queued_bytes = 0

    def _relay_loop(self) -> None:
        selector = self._selector = selectors.DefaultSelector()
        try:
            while not self._closing:
                if self._changed:
                    self._register(selector)
                for key, _ in selector.select():
                    if key.data is None:
                        self._wake_r.recv(4096)
                    else:
                        self._read_worker(key.data)
        finally:
            selector.close()

    def _register(self, selector: selectors.BaseSelector) -> None:
        for key in list(selector.get_map().values()):
            selector.unregister(key.fileobj)
        selector.register(self._wake_r, selectors.EVENT_READ, None)
        with self._lock:
            self._changed = False
            retired, self._retired = self._retired, []
            for slot in self._slots:
                if slot.alive:
                    selector.register(slot.sock, selectors.EVENT_READ, slot)
        for sock in retired:
            sock.close()

    def _read_worker(self, slot: _Slot) -> None:
        try:
            record = slot.sock.recv(_RECORD + 1)
        except (TimeoutError, BlockingIOError):
            return
        except OSError:
            record = b""
        if not record:
            self._worker_gone(slot)
            return
        message = slot.reasm.feed(record, self.stats)
        if message is not None:
            self._relay(message, slot)

    def _worker_gone(self, slot: _Slot) -> None:
        with self._lock:
            if not slot.alive:
                return
            slot.alive = False
            self._changed = True
            self._lock.notify_all()
        if not self._closing:
            log.info("lowmemws ProcessBus: worker %d is gone", slot.index)
            self.stats.add("disconnects")


def _encode_read(result: ReadResult) -> bytes:
    head = {
        "e": result.epoch, "l": result.last, "f": result.first, "t": result.truncated,
        "o": [offset for offset, _ in result.entries],
        "n": [len(entry) for _, entry in result.entries],
    }  # fmt: skip
    return b"".join([json.dumps(head).encode(), b"\n", *(entry for _, entry in result.entries)])


def _decode_read(reply: bytes) -> ReadResult:
    head_end = reply.index(b"\n")
    head = json.loads(reply[:head_end])
    result = ReadResult(head["e"], head["l"], head["f"], truncated=head["t"])
    at = head_end + 1
    for offset, size in zip(head["o"], head["n"], strict=True):
        result.entries.append((offset, reply[at : at + size]))
        at += size
    return result


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
