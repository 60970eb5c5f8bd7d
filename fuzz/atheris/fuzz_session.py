"""atheris target: the runtime's receive-and-parse path, through socketpairs.

Each input drives one fresh lmw_server with small buffers and caps (a 4 KiB read block,
a small spill budget, 64 KiB messages) so that every path is reached: spills, large
frames read in place, the head cap, the event cap, the write limit. One or two clients
are adopted (lmw_adopt on the server end of a socketpair); the input then decides, step
by step, what each client appends (a valid upgrade head, raw bytes, built frames), how
many bytes it writes at once, when the server polls, how UPGRADE and HTTP events are
answered, and when the application sends, closes, subscribes and publishes.

Invariants, checked after every poll and on the bytes each client receives:
  * events are well formed: known fds, an upgrade or request whose head is in bounds,
    messages no longer than max_message with text that is valid UTF-8, close codes that
    are valid on the wire or one of 1005, 1006, 1013;
  * lmw_server_stats counters never wrap below zero and agree with the events seen
    (connections = upgrades - closes, messages, HTTP requests), pooled buffers and
    spills stay within their configured bounds;
  * the server writes a 101 (with the right Sec-WebSocket-Accept) followed by well
    formed unmasked server frames, or one documented HTTP response;
  * once the clients hang up, every connection ends: connections, handshakes, spill and
    pending output all return to 0 and every server-side fd is closed.
Every outcome is thus "accepted" or a documented close code or status.

The application's operations include paced sends (issue 18): lmw_paced_start to a topic, a
set of users or everyone, spread, at a rate or at once, and lmw_paced_cancel; what they
answer stays within the clients there are, and once the clients hang up a cancel finds
no member of any paced send left.

Parking (issue 11: hooks that answer from another thread or a coroutine), when the first
byte's bit 7 is set: an UPGRADE or HTTP event may be parked (lmw_park) instead of answered
in its batch, and operation 15 then chooses among the parking operations: answer a parked
request later (accept, reject, respond), answer a stale handle, hang the client up while
parked (a full close, or a half close), move the runtime's clock (fake_clock.c in the
instrumented build, a sleep elsewhere) past handshake_timeout (0.2 s when bit 6 is set,
else 10 s that an input never reaches), lmw_accept_hold on and off with clients that
connect through a listener, lmw_close_all, lmw_pause_reading and lmw_resume_reading. Their
invariants:
  * handshakes_parked never exceeds the parked requests not known to be answered, and is 0
    when there are none; it is 0 right after lmw_close_all and once the clock has moved
    two ticks past a short handshake_timeout (no slot stays parked past its deadline);
  * a parked request whose client is still there and whose deadline is far answers with 0
    (accept, reject, respond); a parked upgrade whose client hangs up or half-closes, or a
    parked HTTP request whose client hangs up, is freed within a few polls, while a parked
    HTTP request whose client only half-closes stays parked;
  * an answer to a stale handle (answered already, timed out, closed by lmw_close_all, or
    of another generation) returns LMW_ERROR and changes no statistic;
  * while accepting is held no connection is accepted and accept_paused is 1; once allowed
    again, the next poll accepts every waiting client.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import itertools
import os
import re
import socket
import struct
import sys
import time
from dataclasses import dataclass

from _harness import native, run

ffi, lib = native()
from lowmemws import Config  # noqa: E402  (after native(): the instrumented copy)
from lowmemws._c_server import c_config  # noqa: E402

KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
ACCEPT = base64.b64encode(hashlib.sha1(KEY + GUID).digest())
HEADS = (
    b"GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n",
    b"GET /x?t=1 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: WebSocket"
    b"\r\nSec-WebSocket-Protocol: chat, x\r\nSec-WebSocket-Key: " + KEY + b"\r\n"
    b"Sec-WebSocket-Version: 13\r\nOrigin: http://a\r\n\r\n",
    b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhello",
    b"GET /metrics HTTP/1.0\r\nHost: a\r\n\r\n",
)
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
STATUSES = {400, 401, 403, 404, 405, 408, 413, 426, 431, 500, 501, 503, 505}
REJECT_WITH = (400, 403, 404, 503, 299, 0)  # 299 and 0 have no prepared response: 500
MAX_MESSAGE = 64 * 1024
SPILL_BUDGETS = (8 * 1024, 40 * 1024, 160 * 1024)
MAX_HEADS = (512, 3000, 8192)
WRITE_LIMITS = (64, 4096, 256 * 1024)
PAYLOAD_SIZES = (0, 1, 125, 126, 3000, 5000, 65535, MAX_MESSAGE, MAX_MESSAGE + 1, 70000)
CLOSE_CODES = (1000, 1001, 1002, 1003, 1005, 1006, 1007, 1011, 1015, 2999, 3000, 4999, 5000)
WRAP = 1 << 62
SHORT_HANDSHAKE = 0.2  # first byte's bit 6: two ticks of the runtime's clock
TICK_US = 100_000  # the runtime's clock tick
MAX_TICKS = 30  # the clock moves at most 3 s per input: a 10 s deadline is never reached
MAX_LISTENED = 4  # clients connected through the listener per input
MAX_HANGUP_POLLS = 300  # polls a hang-up may take to be seen (other clients read first)
NAMES = itertools.count()


class Reader:
    """Reader takes the input's bytes as decisions; past the end every decision is 0."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def pick(self, n: int) -> int:
        """pick returns a number in [0, n), n <= 65536."""
        value = self.byte() if n <= 256 else self.byte() << 8 | self.byte()
        return value % n

    def take(self, n: int) -> bytes:
        chunk = self.data[self.pos : self.pos + n]
        self.pos += len(chunk)
        return chunk


class Client:
    """Client is one socketpair: the test's end, and what it sent and received."""

    def __init__(self, server, sock: socket.socket, fd: int) -> None:  # type: ignore[no-untyped-def]
        self.server = server
        self.sock = sock
        self.fd = fd
        self.gen = 0
        self.outbox = bytearray()
        self.inbox = bytearray()
        self.parsed = 0  # bytes of inbox already checked
        self.response: int | None = None  # status of the server's HTTP response
        self.close_seen = False
        self.body = 0  # Content-Length of a response other than 101
        self.hung_up = False
        self.write_shut = False
        self.head: int | None = None  # index in HEADS of the head sent first, if any
        self.name: bytes | None = None  # its abstract address, connected through the listener
        self.gen_known = fd >= 0  # adopted into a fresh server: generation 0


@dataclass
class Parked:
    """Parked is a request parked with lmw_park and not answered yet."""

    kind: int
    fd: int
    gen: int
    client: Client
    inode: int  # of the server's socket: its fd may be reused once the server closes it
    stale: bool = False  # known to be answered by the server (408, 503) or freed


def make_frame(r: Reader) -> bytes:
    """make_frame builds a client frame from the input (mostly valid, sometimes not)."""
    b = r.byte()
    opcode = (0, 1, 2, 8, 9, 10, 1, 2, 0, 3, 11, 15)[b % 12]
    fin = 0 if b & 0x10 and opcode < 8 else 1
    rsv = (r.byte() & 7) if b & 0x20 and b & 0x40 else 0
    masked = not (b & 0x80 and b & 0x40 and b & 0x20)
    size = PAYLOAD_SIZES[r.pick(len(PAYLOAD_SIZES))] if opcode < 8 else r.pick(130)
    if opcode == 8 and size >= 2 and r.byte() & 1:
        code = CLOSE_CODES[r.pick(len(CLOSE_CODES))]
        body = struct.pack(">H", code) + r.take(min(size - 2, 8))
    else:
        seed = r.take(min(size, 16)) or b"a"
        body = (seed * (size // len(seed) + 1))[:size]
    size = len(body)
    head = bytes([fin << 7 | rsv << 4 | opcode])
    mbit = 0x80 if masked else 0
    if size < 126:
        head += bytes([mbit | size])
    elif size < 65536:
        head += bytes([mbit | 126]) + struct.pack(">H", size)
    else:
        head += bytes([mbit | 127]) + struct.pack(">Q", size)
    if not masked:
        return head + body
    mask = r.take(4).ljust(4, b"\0")
    return head + mask + bytes(x ^ mask[i & 3] for i, x in enumerate(body))


class Session:
    """Session runs one input against one server."""

    def __init__(self, data: bytes) -> None:
        self.r = Reader(data)
        r = self.r
        flags = r.byte()
        self.auto_upgrade = bool(flags & 1)
        self.max_events = 1 + (flags >> 1) % 4
        self.read_buffers = 1 + (flags >> 3) % 4
        self.short_timeout = bool(flags & 0x40)
        self.parking = bool(flags & 0x80)
        self.cfg = Config(
            max_connections=64,
            max_handshakes=64,
            max_head=MAX_HEADS[r.pick(3)],
            max_http_body=1024,
            max_message_size=MAX_MESSAGE,
            read_buffer_size=4096,
            read_buffers=self.read_buffers,
            spill_budget=SPILL_BUDGETS[r.pick(3)],
            write_limit=WRITE_LIMITS[r.pick(3)],
            write_policy="close" if flags & 0x20 else "drop",
            ping_interval=0,
            handshake_timeout=SHORT_HANDSHAKE if self.short_timeout else 10.0,
        )
        self.c_cfg = c_config(self.cfg, auto_upgrade=self.auto_upgrade)
        self.server = lib.lmw_server_new(self.c_cfg, ffi.NULL)
        assert self.server != ffi.NULL
        self.stats = lib.lmw_server_stats(self.server)
        self.events = ffi.new("lmw_event **")
        self.clients: dict[int, Client] = {}  # by the server's fd
        self.all: list[Client] = []  # every client, in order
        self.upgrades = 0
        self.closed = 0
        self.messages = 0
        self.http = 0
        self.parked: list[Parked] = []
        self.paced = 0  # paced sends started (issue 18)
        self.answered: list[tuple[int, int, int]] = []  # (kind, fd, gen) answered already
        self.ticks = 0  # how far the clock was moved
        self.held = False  # lmw_accept_hold
        self.polls = 0
        self.finishing = False
        self.polled_before_hold = False
        self.pending: dict[bytes, Client] = {}  # connected through the listener, not accepted
        self.listener: socket.socket | None = None
        self.listen_name = b""
        if self.parking:
            self.listen_name = b"\0lmw-fuzz-%d-%d" % (os.getpid(), next(NAMES))
            self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.listener.bind(self.listen_name)
            self.listener.listen(16)
            self.listener.setblocking(False)
            assert lib.lmw_listen_add(self.server, self.listener.fileno()) == 0

    # ------------------------------------------------------------------ set-up

    def adopt(self) -> Client:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        ours.setblocking(False)
        theirs.setblocking(False)
        fd = theirs.detach()  # from now on the fd belongs to the C runtime
        assert lib.lmw_adopt(self.server, fd) == 0
        c = Client(self.server, ours, fd)
        self.clients[fd] = c
        self.all.append(c)
        self.first_request(c)
        return c

    def first_request(self, c: Client) -> None:
        choice = self.r.pick(6)
        if choice < len(HEADS):
            c.outbox += HEADS[choice]
            c.head = choice
        else:
            c.outbox += self.r.take(1 + self.r.pick(200))

    def connect(self) -> Client | None:
        """connect: a new client through the listener (accepted by a later poll)."""
        if self.listener is None or len(self.all) >= 2 + MAX_LISTENED:
            return None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = b"\0lmw-fuzz-c-%d-%d" % (os.getpid(), next(NAMES))
        sock.bind(name)
        sock.setblocking(False)
        sock.connect(self.listen_name)
        c = Client(self.server, sock, -1)
        c.name = name
        self.pending[name] = c
        self.all.append(c)
        self.first_request(c)
        return c

    def resolve(self) -> list[Client]:
        """resolve finds the server's fd of each client it has accepted; returns them."""
        if not self.pending:
            return []
        ours = {c.sock.fileno() for c in self.all if not c.hung_up}
        if self.listener is not None:
            ours.add(self.listener.fileno())
        found = []
        for entry in os.listdir("/proc/self/fd"):
            fd = int(entry)
            if fd in ours:
                continue
            peer = peer_name(fd)
            c = self.pending.pop(peer, None) if isinstance(peer, bytes) and peer else None
            if c is not None:
                c.fd = fd
                self.clients[fd] = c
                found.append(c)
        return found

    # ------------------------------------------------------------------ checks

    def check_stats(self) -> None:
        st = self.stats
        for name in (
            "connections",
            "handshakes",
            "handshakes_total",
            "rejects_total",
            "http_requests_total",
            "frames_sent_total",
            "messages_received_total",
            "buffer_pool_in_use",
            "spill_bytes",
            "pending_write_bytes",
            "handshakes_parked",
        ):
            assert getattr(st, name) < WRAP, (name, getattr(st, name))
        n = len(self.all)
        assert st.connections + st.handshakes <= n, (st.connections, st.handshakes)
        assert st.buffer_pool_in_use <= self.read_buffers
        assert st.spill_bytes <= self.cfg.spill_budget, st.spill_bytes
        assert sum(st.closes) == self.closed, (list(st.closes), self.closed)
        if not self.auto_upgrade:  # an accept whose 101 hits a closed peer fails but counts
            assert st.handshakes_total >= self.upgrades, (st.handshakes_total, self.upgrades)
        assert st.connections == st.handshakes_total - sum(st.closes)
        assert st.messages_received_total == self.messages
        assert st.http_requests_total == self.http
        assert lib.lmw_connection_count(self.server) == st.connections
        assert st.hooks_in_flight == 0  # kept by Python only
        assert st.handshakes_parked <= st.handshakes, (st.handshakes_parked, st.handshakes)
        assert st.paced_in_flight <= self.paced, (st.paced_in_flight, self.paced)
        assert st.paced_deliveries_total < WRAP
        maybe_parked = sum(1 for p in self.parked if not p.stale)
        assert st.handshakes_parked <= maybe_parked, (st.handshakes_parked, maybe_parked)

    def snapshot(self) -> bytes:
        return bytes(ffi.buffer(self.stats))

    def check_event(self, e) -> None:  # type: ignore[no-untyped-def]
        assert e.type in (1, 2, 3, 4, 5), e.type
        if e.type == lib.LMW_EV_WAKE:
            return
        c = self.clients.get(e.fd)
        if c is None and self.finishing and self.pending:
            # a client that left before its accept may have no peer name any more
            c = self.pending.pop(next(iter(self.pending)))
            c.fd = e.fd
            self.clients[e.fd] = c
        assert c is not None, e.fd
        if e.type in (lib.LMW_EV_UPGRADE, lib.LMW_EV_HTTP):
            req = e.request
            assert req != ffi.NULL and e.data != ffi.NULL
            head = bytes(ffi.buffer(e.data, req.head_len))
            assert 4 <= req.head_len <= self.cfg.max_head and head.endswith(b"\r\n\r\n")
            if e.type == lib.LMW_EV_UPGRADE:
                assert req.kind == lib.LMW_KIND_UPGRADE and e.len == req.head_len
            else:
                assert req.kind == lib.LMW_KIND_HTTP
                assert e.len == req.head_len + req.content_length
                assert req.content_length <= self.cfg.max_http_body
                self.http += 1
                bytes(ffi.buffer(e.data, e.len))  # the body must be readable
            c.gen = e.gen
            c.gen_known = True
        elif e.type == lib.LMW_EV_MESSAGE:
            assert e.opcode in (lib.LMW_OP_TEXT, lib.LMW_OP_BINARY), e.opcode
            assert e.len <= MAX_MESSAGE, e.len
            data = bytes(ffi.buffer(e.data, e.len)) if e.len else b""
            if e.opcode == lib.LMW_OP_TEXT:
                check_text(data)
            assert e.gen == c.gen or c.gen == 0
            c.gen = e.gen
            c.gen_known = True
            self.messages += 1
        else:
            assert lib.lmw_close_code_valid(e.code) or e.code in (1005, 1006, 1013), e.code
            self.closed += 1

    def check_output(self, c: Client) -> None:
        """check_output follows what the server wrote to c: a response, then frames."""
        buf = bytes(c.inbox)
        while c.parsed < len(buf):
            if c.response is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    assert len(buf) < 1024, buf[:64]
                    return
                head = buf[: end + 4]
                assert head.startswith(b"HTTP/1.1 ") and head[12:13] == b" ", head[:32]
                status = int(head[9:12])
                c.response = status
                c.parsed = end + 4
                if status == 101:
                    assert b"\r\nSec-WebSocket-Accept: " in head, head
                    if c.head in (0, 1):
                        assert b"\r\nSec-WebSocket-Accept: " + ACCEPT + b"\r\n" in head, head
                    continue
                assert status in STATUSES or status == 200, head
                length = re.search(rb"\r\nContent-Length: (\d+)\r\n", head)
                c.body = int(length.group(1)) if length else 0
                continue
            if c.response != 101:
                assert len(buf) - c.parsed <= c.body, ("bytes after the response", buf)
                return
            assert not c.close_seen, "bytes after the server's close frame"
            f = ffi.new("lmw_frame *")
            rest = buf[c.parsed :]
            rc = lib.lmw_parse_frame(ffi.from_buffer(rest), len(rest), 0, 0, f)
            assert rc != lib.LMW_ERROR, rest[:16]
            if rc == lib.LMW_INCOMPLETE or rc + f.payload_len > len(rest):
                return
            assert f.fin and not f.masked and f.opcode in (1, 2, 8, 9, 10), rest[:16]
            payload = rest[rc : rc + f.payload_len]
            if f.opcode == lib.LMW_OP_CLOSE:
                check_close_payload(payload)
                c.close_seen = True
            c.parsed += rc + f.payload_len

    # ------------------------------------------------------------------ actions

    def poll(self, may_park: bool = True) -> None:
        waiting = len(self.pending)
        n = lib.lmw_poll(self.server, 0, self.events, self.max_events)
        self.polls += 1
        assert n >= 0
        accepted = self.resolve()
        if self.held:
            assert not accepted, "accepted while accepting is held"
            # (held before the first poll: the listeners were never polled, the gauge is 0)
            assert self.stats.accept_paused == 1 or not self.polled_before_hold
        elif waiting and not self.finishing:
            assert not self.pending, f"{len(self.pending)} of {waiting} clients not accepted"
        evs = self.events[0]
        upgrades = sum(1 for i in range(n) if evs[i].type == lib.LMW_EV_UPGRADE)
        work = sum(1 for i in range(n) if evs[i].type in (1, 2, 3))
        assert work <= self.max_events and upgrades <= self.max_events, (work, n)
        pending = []
        for i in range(n):
            self.check_event(evs[i])
            pending.append((evs[i].type, evs[i].fd, evs[i].gen))
        self.check_stats()  # closes made outside lmw_poll are reported by the next one
        for kind, fd, gen in pending:
            if kind in (lib.LMW_EV_UPGRADE, lib.LMW_EV_HTTP):
                self.answer(kind, fd, gen, may_park)

    def answer(self, kind: int, fd: int, gen: int, may_park: bool = True) -> None:
        r = self.r
        if self.parking and r.byte() & 1 and may_park:
            parked = self.stats.handshakes_parked
            assert lib.lmw_park(self.server, fd, gen) == 0
            assert self.stats.handshakes_parked == parked + 1
            assert lib.lmw_park(self.server, fd, gen) == lib.LMW_ERROR  # parked already
            self.parked.append(Parked(kind, fd, gen, self.clients[fd], os.fstat(fd).st_ino))
            return
        choice = r.pick(4)
        if choice == 3:
            return  # unanswered: the next poll answers 500
        if kind == lib.LMW_EV_UPGRADE and choice < 2:
            proto = b"chat" if choice == 1 else b""
            tag = r.pick(3)
            rc = lib.lmw_upgrade_accept(self.server, fd, gen, proto, len(proto), tag)
            assert rc in (0, lib.LMW_ERROR)
            if rc == 0:
                self.upgrades += 1
                assert lib.lmw_is_open(self.server, fd, gen) in (0, 1)
            self.remember(kind, fd, gen)
            return
        if kind == lib.LMW_EV_HTTP and choice < 2:
            assert lib.lmw_respond(self.server, fd, gen, RESPONSE, len(RESPONSE)) == 0
            self.remember(kind, fd, gen)
            return
        status = REJECT_WITH[r.pick(len(REJECT_WITH))]
        assert lib.lmw_reject(self.server, fd, gen, status) == 0
        # answered: a second answer is refused
        assert lib.lmw_reject(self.server, fd, gen, 400) == lib.LMW_ERROR
        self.remember(kind, fd, gen)

    def remember(self, kind: int, fd: int, gen: int) -> None:
        if self.parking:
            self.answered = [*self.answered[-15:], (kind, fd, gen)]

    # ------------------------------------------------------------------ parking

    def alive(self, p: Parked) -> bool:
        """alive: p must still be parked (its client is there, its deadline far)."""
        c = p.client
        gone = c.hung_up or (c.write_shut and p.kind == lib.LMW_EV_UPGRADE)
        return not (p.stale or gone or self.short_timeout)

    def answer_parked(self, kind: int, fd: int, gen: int, choice: int, status: int) -> int:
        """answer_parked answers (kind, fd, gen): accept or respond, reject, park again."""
        s = self.server
        if kind == lib.LMW_EV_UPGRADE and choice < 2:
            proto = b"chat" if choice == 1 else b""
            rc = lib.lmw_upgrade_accept(s, fd, gen, proto, len(proto), choice)
        elif kind == lib.LMW_EV_HTTP and choice < 2:
            rc = lib.lmw_respond(s, fd, gen, RESPONSE, len(RESPONSE))
        elif choice == 3:
            rc = lib.lmw_park(s, fd, gen)
        else:
            rc = lib.lmw_reject(s, fd, gen, status)
        assert rc in (0, lib.LMW_ERROR), rc
        return rc

    def answer_later(self) -> None:
        """answer_later answers a parked request (its client may have left meanwhile)."""
        r = self.r
        if not self.parked:
            return
        p = self.parked.pop(r.pick(len(self.parked)))
        choice = r.pick(3)
        status = REJECT_WITH[r.pick(len(REJECT_WITH))]
        before = self.snapshot()
        parked = self.stats.handshakes_parked
        alive = self.alive(p)
        rc = self.answer_parked(p.kind, p.fd, p.gen, choice, status)
        if alive:
            assert rc == 0, "a parked request could not be answered"
        if rc == 0:
            assert self.stats.handshakes_parked == parked - 1
            if p.kind == lib.LMW_EV_UPGRADE and choice < 2:
                self.upgrades += 1
            assert not p.stale, "a stale handle was answered"
        elif p.stale or not p.client.hung_up:  # an accept may fail on a gone client's 101
            assert self.snapshot() == before, "a refused answer changed the statistics"
        self.remember(p.kind, p.fd, p.gen)

    def answer_stale(self) -> None:
        """answer_stale answers a handle that no longer waits: LMW_ERROR, nothing changes."""
        r = self.r
        choice = r.pick(4)
        if self.answered and r.byte() & 1:
            kind, fd, gen = self.answered[r.pick(len(self.answered))]
        elif self.parked:
            p = self.parked[r.pick(len(self.parked))]
            kind, fd, gen = p.kind, p.fd, (p.gen + 7919) & 0xFFFFFFFF  # another generation
        else:
            return
        before = self.snapshot()
        assert self.answer_parked(kind, fd, gen, choice, 400) == lib.LMW_ERROR
        assert self.snapshot() == before, "a refused answer changed the statistics"

    def hang_up_parked(self) -> None:
        """hang_up_parked: the client of a parked request closes, or half-closes, its end."""
        r = self.r
        if not self.parked:
            return
        p = self.parked[r.pick(len(self.parked))]
        c = p.client
        full = bool(r.byte() & 1)
        if c.hung_up or (c.write_shut and not full):
            return
        if full:
            self.read(c)
            c.hung_up = True
            c.sock.close()
        else:
            c.sock.shutdown(socket.SHUT_WR)
            c.write_shut = True
        if p.stale:
            return
        ends = full or p.kind == lib.LMW_EV_UPGRADE
        for _ in range(MAX_HANGUP_POLLS if ends else 3):
            self.poll()
            if self.gone(p):
                break
        if ends:
            assert self.gone(p), "a parked request outlived its client"
            p.stale = True
        elif not self.short_timeout:  # a half-closed HTTP client still waits for its answer
            assert not self.gone(p), "a half-closed HTTP client's parked request ended"

    def gone(self, p: Parked) -> bool:
        """gone: the server closed p's connection (its fd may be another socket's by now)."""
        try:
            return os.fstat(p.fd).st_ino != p.inode
        except OSError:
            return True

    def move_clock(self) -> None:
        """move_clock moves the runtime's clock on by 1 to 3 ticks, polling after each."""
        cycles = 1 + self.r.pick(3)
        cycles = min(cycles, MAX_TICKS - self.ticks)
        for _ in range(cycles):
            self.ticks += 1
            if hasattr(lib, "lmw_fuzz_clock_advance"):
                lib.lmw_fuzz_clock_advance(TICK_US)
            else:
                time.sleep(TICK_US / 1e6)
            self.poll(may_park=False)  # a request parked now would have a later deadline
        if self.short_timeout and cycles >= 2:
            assert self.stats.handshakes_parked == 0, "parked past handshake_timeout"
            self.all_stale()

    def all_stale(self) -> None:
        """all_stale: nothing is parked any more; every parked handle is now stale."""
        for p in self.parked:
            p.stale = True
            before = self.snapshot()
            rc = self.answer_parked(p.kind, p.fd, p.gen, self.r.pick(4), 404)
            assert rc == lib.LMW_ERROR
            assert self.snapshot() == before, "a refused answer changed the statistics"

    def hold(self) -> None:
        self.held = not self.held
        self.polled_before_hold = self.polls > 0
        lib.lmw_accept_hold(self.server, int(self.held))
        self.poll()

    def close_all(self) -> None:
        lib.lmw_close_all(self.server, 1001)
        assert self.stats.handshakes_parked == 0, "parked after lmw_close_all"
        self.all_stale()

    def parking_op(self, c: Client) -> None:
        op = self.r.pick(12)
        if op in (0, 1):
            self.answer_later()
        elif op == 2:
            self.answer_stale()
        elif op == 3:
            self.hang_up_parked()
        elif op == 4:
            self.move_clock()
        elif op == 5:
            self.hold()
        elif op == 6:
            self.connect()
        elif op == 7:
            self.close_all()
        elif op == 8:  # frames sent before the 101
            c.outbox += make_frame(self.r)
            self.write(c, 1 << 20)
            self.poll()
        elif op == 9:
            for _ in range(4):
                self.poll()
        else:  # the Dispatcher pauses the socket of a held message (any handle may come)
            pause = lib.lmw_pause_reading if op == 10 else lib.lmw_resume_reading
            assert pause(self.server, c.fd, c.gen) in (0, lib.LMW_ERROR)

    def write(self, c: Client, size: int) -> None:
        if c.hung_up or c.write_shut or not c.outbox:
            return
        try:
            sent = c.sock.send(bytes(c.outbox[:size]))
        except BlockingIOError:
            return
        except OSError as exc:  # the server closed its end
            assert exc.errno in (errno.EPIPE, errno.ECONNRESET), exc
            c.outbox.clear()
            return
        del c.outbox[:sent]

    def read(self, c: Client) -> None:
        if c.hung_up:
            return
        while True:
            try:
                chunk = c.sock.recv(65536)
            except BlockingIOError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            c.inbox += chunk
        self.check_output(c)

    def app(self, c: Client, what: int) -> None:
        r = self.r
        gen = c.gen + (1 if r.byte() & 0x80 else 0)  # sometimes a stale handle
        # c.gen + 1 is stale when c.gen is its slot's generation (its fd is not another's;
        # adopted into a fresh server, or learnt from an event)
        stale = gen != c.gen and c.gen_known and self.clients.get(c.fd) is c
        s = self.server
        if what == 0:
            size = PAYLOAD_SIZES[r.pick(len(PAYLOAD_SIZES))] % 9000
            opcode = lib.LMW_OP_TEXT if r.byte() & 1 else lib.LMW_OP_BINARY
            rc = lib.lmw_send(s, c.fd, gen, opcode, b"x" * size, size)
            assert rc in (0, 1, lib.LMW_ERROR) and not (stale and rc != lib.LMW_ERROR)
        elif what == 1:
            code = CLOSE_CODES[r.pick(len(CLOSE_CODES))]
            reason = r.take(r.pick(140))
            rc = lib.lmw_close(s, c.fd, gen, code, reason, len(reason))
            assert rc in (0, lib.LMW_ERROR) and not (stale and rc == 0)
            if rc == 0:
                assert lib.lmw_close_code_valid(code)
        elif what == 2:
            rc = lib.lmw_subscribe(s, c.fd, gen, 1 + r.pick(3))
            assert rc in (0, 1, lib.LMW_ERROR) and not (stale and rc >= 0)
        elif what in (6, 7):
            self.pace(what == 7)
        else:
            size = r.pick(3) * 3000
            policy = r.pick(3)
            if what == 3:
                n = lib.lmw_publish(s, 1 + r.pick(3), 2, b"p" * size, size, policy)
            elif what == 4:
                n = lib.lmw_send_user(s, r.pick(3), 2, b"u" * size, size, policy)
            else:
                n = lib.lmw_broadcast(s, 1, b"b" * size, size, policy)
            assert 0 <= n <= len(self.clients), n

    def pace(self, cancel: bool) -> None:
        """pace starts a paced send (issue 18) to a topic, a set of users or everyone, spread
        over a fraction of a second, at a rate, or at once; or cancels the sends of one id.
        The counts it answers stay within the clients there are; once the clients hang up,
        a cancel finds no member left to count (finish)."""
        r, s = self.r, self.server
        pace_id = r.pick(3)
        if cancel:
            left = lib.lmw_paced_cancel(s, pace_id)
            assert 0 <= left <= len(self.all) * max(1, self.paced), left
            return
        to = r.pick(4)  # 3: an unknown target, refused
        users = [r.pick(3) for _ in range(r.pick(4))]
        size = r.pick(3) * 3000
        paces = ((0.0, 0.0), (0.05 * (1 + r.pick(4)), 0.0), (0.0, 1.0 + r.pick(200)))
        spread, rate = paces[r.pick(3)]  # at once, spread, or at a rate
        n = lib.lmw_paced_start(
            s, pace_id, to, 1 + r.pick(3), users, len(users), 2, b"q" * size, size, r.pick(3),
            spread, rate,
        )  # fmt: skip
        if to == 3:
            assert n == lib.LMW_ERROR
            return
        assert 0 <= n <= len(self.clients), n
        self.paced += 1

    # ------------------------------------------------------------------ run

    def run(self) -> None:
        r = self.r
        clients = self.all
        for _ in range(1 + r.pick(2)):
            self.adopt()
        steps = 0
        while r.left() and steps < 300:
            steps += 1
            op = r.pick(16)
            c = clients[r.pick(len(clients))] if len(clients) > 1 else clients[0]
            if op == 15 and self.parking:
                self.parking_op(c)
                continue
            if op == 0:
                c.outbox += r.take(1 + r.pick(64))
            elif op in (1, 2):
                c.outbox += make_frame(r)
            elif op in (3, 4, 5):
                self.write(c, (1, 7, 200, 4096, 1 << 20)[r.pick(5)])
            elif op in (6, 7, 8):
                self.poll()
            elif op in (9, 10):
                self.app(c, r.pick(8))
            elif op == 11:
                self.read(c)
            elif op == 12 and not c.write_shut and not c.hung_up:
                c.sock.shutdown(socket.SHUT_WR)
                c.write_shut = True
            elif op == 13:
                for _ in range(8):  # let a long frame through
                    self.write(c, 1 << 20)
                    self.poll()
                    self.read(c)
            else:
                self.write(c, 1 << 20)
                self.poll()
        self.finish()

    def finish(self) -> None:
        """finish hangs up every client and waits for the server to forget them all."""
        for c in self.all:
            self.read(c)
            c.hung_up = True
            c.sock.close()
        self.finishing = True
        if self.held:  # the clients left in the backlog are accepted, and leave
            self.held = False
            lib.lmw_accept_hold(self.server, 0)
        for _ in range(100):
            self.poll()
            st = self.stats
            if (
                st.connections == 0
                and st.handshakes == 0
                and st.handshakes_parked == 0
                and st.spill_bytes == 0
                and st.pending_write_bytes == 0
                and not any(fd_open(fd) for fd in self.clients)
            ):
                break
        else:
            st = self.stats
            raise AssertionError(
                f"connections did not end: connections={st.connections} "
                f"handshakes={st.handshakes} parked={st.handshakes_parked} "
                f"spill={st.spill_bytes} "
                f"pending={st.pending_write_bytes} paced={st.paced_in_flight} "
                f"open={[fd for fd in self.clients if fd_open(fd)]}"
            )
        assert st.buffer_pool_in_use <= self.read_buffers
        for pace_id in range(3):  # a paced send may still wait for its next member's turn:
            assert lib.lmw_paced_cancel(self.server, pace_id) == 0  # none is left to count
        assert st.paced_in_flight == 0

    def close(self) -> None:
        lib.lmw_server_free(self.server)
        for c in self.all:
            if not c.hung_up:
                c.sock.close()
        if self.listener is not None:
            self.listener.close()


def check_text(data: bytes) -> None:
    """check_text: a text message handed to Python must be UTF-8.

    A text message whose last character is cut short was once delivered before the 1007
    (tests/test_fuzz_regressions.py); it is a failure like any other invalid text.
    """
    data.decode("utf-8")


def check_close_payload(payload: bytes) -> None:
    """check_close_payload: a code valid on the wire, or 1013 (the spill budget), and UTF-8."""
    if not payload:
        return
    assert len(payload) >= 2, payload
    code = struct.unpack(">H", payload[:2])[0]
    assert lib.lmw_close_code_valid(code) or code == 1013, code
    payload[2:].decode("utf-8")


def peer_name(fd: int) -> object:
    """peer_name is the peer address of socket fd, or None (not a socket, not connected)."""
    try:
        dup = os.dup(fd)
    except OSError:
        return None
    try:
        sock = socket.socket(fileno=dup)
    except OSError:
        os.close(dup)
        return None
    try:
        return sock.getpeername()
    except OSError:
        return None
    finally:
        sock.close()


def fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def run_session(data: bytes) -> None:
    """run_session is one fuzz input: build a server, drive it, check, free it."""
    session = Session(data)
    try:
        session.run()
    finally:
        session.close()


def test_one_input(data: bytes) -> None:
    run_session(data)


if __name__ == "__main__":
    sys.exit(run(test_one_input))  # type: ignore[func-returns-value]
