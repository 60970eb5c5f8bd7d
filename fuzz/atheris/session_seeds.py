"""Seed inputs of the session target (fuzz_session.py) for the stateful cases of issue 16.

fuzz_session.py reads its input as a list of decisions (Reader.byte, pick, take). The
seeds here spell out, decision by decision, the attacks the issue found, so that the
fuzzer starts from them and mutates around them:

- stateful_declared_large: a frame head declaring far more than it sends (60,000 bytes
  declared in a 64 KiB-message server with a 4 KiB read block, 10 sent), while a second
  client keeps sending whole frames;
- stateful_declared_4gib: a frame head declaring 2**32 + 16 bytes and 20 bytes of it;
- stateful_http_no_body: a plain HTTP head declaring Content-Length 1000 with no body;
- stateful_partial_then_hangup: a partial frame, then the client shuts its end down and
  hangs up while the other client goes on;
- stateful_close_then_trickle: the application closes a connection; the client never
  answers the close frame and sends one byte at a time;
- stateful_paid_partial: two clients each send 3,100 bytes of a 5,000-byte frame (3/4 of
  an 8 KiB spill budget together), then a whole frame.

And the parking operations of issue 11 (lmw_park, lmw_accept_hold; first byte's bit 7):

- park_upgrade_frames_then_accept: an upgrade is parked, its client sends two frames before
  its 101, the upgrade is accepted later and the frames are read after it;
- park_http_half_close_respond: a parked POST whose client half-closes still gets its
  answer;
- park_upgrade_hangup_then_answer: the client of a parked upgrade hangs up (freed at once);
  the late answer is refused and changes nothing;
- park_timeout_408: a parked upgrade and a parked POST past a 0.2 s handshake_timeout
  (the clock moved two ticks): both answered 408, their late answers refused;
- park_close_all: lmw_close_all with a parked upgrade, a parked POST and an open
  connection (the third client, through the listener): 503, 503, a close frame;
- park_accept_hold: a client connects through the listener while accepting is held, is
  accepted once it is allowed again, and its upgrade is parked and accepted.

``python fuzz/atheris/session_seeds.py`` writes them to fuzz/corpus/atheris_session/
(the committed seeds that `make -C fuzz run` reads); ``--check`` replays each through the
session target with the installed (uninstrumented) lowmemws and prints the outcome.
"""

from __future__ import annotations

import argparse
import os
import struct
import sys
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(os.path.dirname(HERE), "corpus", "atheris_session")
MASK = b"\x11\x22\x33\x44"
UPGRADE_HEAD = 0  # index in fuzz_session.HEADS of the RFC 6455 upgrade
# run(): operations (Reader.pick(16))
RAW, WRITE, POLL, APP, READ, SHUT, FLUSH, PARKING = 0, 3, 6, 9, 11, 12, 14, 15
# Session.parking_op: operations (Reader.pick(10))
ANSWER_LATER, ANSWER_STALE, HANG_UP, MOVE_CLOCK, HOLD, CONNECT, CLOSE_ALL = 0, 2, 3, 4, 5, 6, 7
POST_HEAD = 2  # index in fuzz_session.HEADS of the POST with a 5-byte body
PARK_FLAGS = (3 << 1) | (3 << 3) | 0x80  # UPGRADE events to Python, max_events 4, parking
SHORT_TIMEOUT = 0x40  # handshake_timeout 0.2 s


def masked_frame(opcode: int, payload: bytes, declared: int | None = None) -> bytes:
    """masked_frame is a client frame; declared overrides the length in its head."""
    n = len(payload) if declared is None else declared
    head = bytes([0x80 | opcode])
    if n < 126:
        head += bytes([0x80 | n])
    elif n < 65536:
        head += bytes([0x80 | 126]) + struct.pack(">H", n)
    else:
        head += bytes([0x80 | 127]) + struct.pack(">Q", n)
    return head + MASK + bytes(b ^ MASK[i & 3] for i, b in enumerate(payload))


class Seed:
    """Seed writes the decisions fuzz_session.Session reads, in its order."""

    def __init__(
        self,
        *,
        spill_budget: int = 2,
        heads: tuple[bytes | int, ...],
        flags: int = 1 | (3 << 1) | (3 << 3),
    ) -> None:
        # flags: auto_upgrade (no UPGRADE events to answer), max_events 4, 4 read buffers,
        # the "drop" write policy
        # max_head 8192, spill budget SPILL_BUDGETS[spill_budget], write_limit 256 KiB
        self.data = bytearray([flags, 2, spill_budget, 2])
        self.clients = len(heads)
        self.data.append(self.clients - 1)
        for head in heads:
            if isinstance(head, int):
                self.data.append(head)
            else:  # raw bytes instead of one of fuzz_session.HEADS
                assert 1 <= len(head) <= 200
                self.data += bytes([4, len(head) - 1]) + head

    def op(self, op: int, client: int) -> Seed:
        self.data.append(op)
        if self.clients > 1:
            self.data.append(client)
        return self

    def raw(self, client: int, data: bytes) -> Seed:
        """raw appends data to a client's outbox, at most 64 bytes per operation."""
        for at in range(0, len(data), 64):
            chunk = data[at : at + 64]
            self.op(RAW, client)
            self.data += bytes([len(chunk) - 1]) + chunk
        return self

    def flush(self, client: int) -> Seed:
        """flush writes all of a client's outbox and polls the server once."""
        return self.op(FLUSH, client)

    def poll(self, times: int = 1) -> Seed:
        for _ in range(times):
            self.op(POLL, 0)
        return self

    def read(self, client: int) -> Seed:
        return self.op(READ, client)

    def shut(self, client: int) -> Seed:
        return self.op(SHUT, client)

    def app_close(self, client: int) -> Seed:
        """app_close: the application closes the client's connection with 1000."""
        self.op(APP, client)
        self.data += bytes([1, 0, 0, 0])  # what=close, current gen, code 1000, no reason
        return self

    def upgraded(self) -> Seed:
        """upgraded flushes every client's upgrade head (answered in C: auto_upgrade)."""
        for client in range(self.clients):
            self.flush(client)
        return self

    def write(self, client: int) -> Seed:
        """write writes all of a client's outbox, without polling."""
        self.op(WRITE, client)
        self.data.append(4)  # 1 MiB
        return self

    # the answer to each UPGRADE or HTTP event of a poll, in the parking mode
    def park(self) -> Seed:
        self.data.append(1)
        return self

    def accept(self) -> Seed:
        """accept answers an upgrade in its batch (or responds to an HTTP request)."""
        self.data += bytes([0, 0, 0])  # not parked, accept (respond), user tag 0
        return self

    def parking(self, op: int, *decisions: int, client: int = 0) -> Seed:
        """parking is one of Session.parking_op's operations and its decisions."""
        self.op(PARKING, client)
        self.data += bytes([op, *decisions])
        if op == CONNECT:
            self.clients += 1
        return self

    def encoded(self) -> bytes:
        return bytes(self.data)


def seeds() -> dict[str, bytes]:
    hello = masked_frame(1, b"hello")
    whole = masked_frame(2, b"w" * 300)
    declared_large = (
        Seed(heads=(UPGRADE_HEAD, UPGRADE_HEAD))
        .upgraded()
        .raw(0, masked_frame(2, b"x" * 10, declared=60_000))
        .flush(0)
        .raw(1, hello)
        .flush(1)
        .raw(1, whole)
        .flush(1)
        .read(1)
        .poll(3)
    )
    declared_4gib = (
        Seed(heads=(UPGRADE_HEAD, UPGRADE_HEAD))
        .upgraded()
        .raw(0, masked_frame(2, b"y" * 20, declared=2**32 + 16))
        .flush(0)
        .raw(1, hello)
        .flush(1)
        .read(0)
        .poll(2)
    )
    http_no_body = (
        Seed(heads=(b"POST /form HTTP/1.1\r\nHost: a\r\nContent-Length: 1000\r\n\r\n", 0))
        .upgraded()
        .raw(1, hello)
        .flush(1)
        .read(0)
        .poll(3)
    )
    partial_then_hangup = (
        Seed(heads=(UPGRADE_HEAD, UPGRADE_HEAD))
        .upgraded()
        .raw(0, masked_frame(2, b"z" * 2000, declared=60_000))
        .flush(0)
        .shut(0)
        .poll(2)
        .raw(1, hello)
        .flush(1)
        .read(1)
    )
    close_then_trickle = (
        Seed(heads=(UPGRADE_HEAD,))
        .upgraded()
        .raw(0, hello)
        .flush(0)  # the message event tells the application the connection's handle
        .app_close(0)
        .poll()
        .read(0)
    )
    for byte in masked_frame(2, b"t" * 40):
        close_then_trickle.raw(0, bytes([byte])).flush(0).read(0)
    paid = 3100
    paid_partial = Seed(spill_budget=0, heads=(UPGRADE_HEAD, UPGRADE_HEAD)).upgraded()
    for client in (0, 1):
        paid_partial.raw(client, masked_frame(2, b"p" * 5000)[: 8 + paid]).flush(client)
    paid_partial.raw(1, hello).flush(1).read(1).read(0).poll(2)
    return {
        **parking_seeds(),
        "stateful_declared_large": declared_large.encoded(),
        "stateful_declared_4gib": declared_4gib.encoded(),
        "stateful_http_no_body": http_no_body.encoded(),
        "stateful_partial_then_hangup": partial_then_hangup.encoded(),
        "stateful_close_then_trickle": close_then_trickle.encoded(),
        "stateful_paid_partial": paid_partial.encoded(),
    }


def parking_seeds() -> dict[str, bytes]:
    hello = masked_frame(1, b"hello")
    world = masked_frame(2, b"world")
    frames_then_accept = (
        Seed(flags=PARK_FLAGS, heads=(UPGRADE_HEAD,))
        .flush(0)
        .park()
        .raw(0, hello + world)
        .write(0)
        .poll(2)
        .parking(ANSWER_LATER, 0, 0, 0)  # the first parked one, accept, (reject status)
        .poll(2)
        .read(0)
    )
    half_close = (
        Seed(flags=PARK_FLAGS, heads=(POST_HEAD,))
        .flush(0)
        .park()
        .shut(0)
        .poll(3)
        .parking(ANSWER_LATER, 0, 0, 0)  # respond
        .read(0)
    )
    hangup = (
        Seed(flags=PARK_FLAGS, heads=(UPGRADE_HEAD, UPGRADE_HEAD))
        .flush(0)
        .park()
        .flush(1)
        .accept()
        .parking(HANG_UP, 0, 1)  # the first parked one, a full close
        .parking(ANSWER_LATER, 0, 0, 0)  # refused: the client is gone
        .parking(ANSWER_STALE, 2, 1, 0)  # reject the accepted one again: refused
        .read(1)
    )
    timeout = (
        Seed(flags=PARK_FLAGS | SHORT_TIMEOUT, heads=(UPGRADE_HEAD, POST_HEAD))
        .flush(0)
        .park()
        .flush(1)
        .park()
        .parking(MOVE_CLOCK, 1, 0, 1)  # two ticks; the two late answers: accept, respond
        .read(0)
        .read(1)
    )
    close_all = (
        Seed(flags=PARK_FLAGS, heads=(UPGRADE_HEAD, POST_HEAD))
        .flush(0)
        .park()
        .flush(1)
        .park()
        .parking(CONNECT, UPGRADE_HEAD)  # a third client, through the listener
        .poll()
        .flush(2)
        .accept()
        .parking(CLOSE_ALL, 0, 2)  # the late answers: accept, reject
        .poll()
        .read(0)
        .read(1)
        .read(2)
    )
    accept_hold = (
        Seed(flags=PARK_FLAGS, heads=(UPGRADE_HEAD,))
        .flush(0)
        .accept()
        .parking(HOLD)
        .parking(CONNECT, UPGRADE_HEAD)
        .poll(2)
        .parking(HOLD)
        .flush(1)
        .park()
        .parking(ANSWER_LATER, 0, 1, 0)  # accept with the subprotocol
        .read(1)
    )
    return {
        "park_upgrade_frames_then_accept": frames_then_accept.encoded(),
        "park_http_half_close_respond": half_close.encoded(),
        "park_upgrade_hangup_then_answer": hangup.encoded(),
        "park_timeout_408": timeout.encoded(),
        "park_close_all": close_all.encoded(),
        "park_accept_hold": accept_hold.encoded(),
    }


def check(named: dict[str, bytes]) -> int:
    """check replays each seed through fuzz_session with the installed lowmemws."""
    import lowmemws  # noqa: F401  (loaded first: the harness then uses this module)

    sys.path.insert(0, HERE)
    import fuzz_session

    failed = 0
    for name, data in named.items():
        try:
            fuzz_session.run_session(data)
        except Exception:  # reported, and counted
            failed += 1
            last = traceback.format_exc().strip().splitlines()[-1]
            print(f"{name}: FAILS {last}")
        else:
            print(f"{name}: ok")
    return failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="replay instead of writing")
    args = parser.parse_args()
    named = seeds()
    if args.check:
        sys.exit(1 if check(named) else 0)
    os.makedirs(CORPUS, exist_ok=True)
    for name, data in named.items():
        with open(os.path.join(CORPUS, name), "wb") as out:
            out.write(data)
        print(f"{os.path.join(CORPUS, name)}: {len(data)} bytes")


if __name__ == "__main__":
    main()
