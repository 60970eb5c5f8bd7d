"""bus_read: the CPU RedisBus's subscriber thread spends per message it drops, by how many
messages one read brings (issue 15).

A SubscriberLink on one end of a unix socketpair, its BusFilter dropping every message (our
own echoes: the same path as a user held elsewhere, minus the hub lookup). A sender thread
writes batches of K small messages, each once the previous one was read (the socket's
queue is empty), then a message on the answer channel that the filter leaves to Python: the
fence. The subscriber thread calls wait_links until the fence arrives; its own CPU time
(thread_time) per dropped message is the figure, the sender's is not in it.

Two paths: ``C loop`` (plain sockets: lmw_bus_wait polls, reads and drops with the GIL
released; Python runs only for the fence) and ``Python loop`` (what a TLS link still does,
and every link did before: select, recv_into and the C scan per read, from Python).

Usage: python benchmarks/bus_read.py [--messages 40000] [--json FILE]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import socket
import struct
import sys
import termios
import threading
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lowmemws._bus_filter import BusFilter  # noqa: E402
from lowmemws._redis_link import SubscriberLink, wait_links  # noqa: E402

NODE = b"\xee" * 16
ANSWERS = b"answers"
PER_READ = (1, 4, 16, 64)
DEADLINE = 120.0  # seconds a path may take for one batch size: a bound, not a figure


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def message(seq: int, channel: bytes = b"lowmemws:{u:17}") -> bytes:
    """One RESP3 push of a small user envelope from this node (dropped as an echo)."""
    data = NODE + seq.to_bytes(8, "big") + bytes([1, 1, 1]) + seq.to_bytes(8, "big") + b"x"
    return b">3\r\n" + bulk(b"smessage") + bulk(channel) + bulk(data)


def queued(sock: socket.socket) -> int:
    """queued: bytes waiting in sock's receive queue (FIONREAD)."""
    return int(struct.unpack("i", fcntl.ioctl(sock, termios.FIONREAD, b"\0" * 4))[0])


def run(per_read: int, messages: int, native: bool) -> float:
    """run: the subscriber thread's CPU (us) per dropped message, per_read to a read."""
    ours, theirs = socket.socketpair()
    fence = threading.Event()
    link = SubscriberLink(
        SimpleNamespace(_sock=ours),
        True,
        lambda channel, data, judged: fence.set() if channel == ANSWERS else None,
        BusFilter(NODE, ANSWERS),
        keepalive=60,
        reply_timeout=5,
    )
    if not native:  # the path a TLS link takes: Python's select and recv_into
        link.native = None
    wake_r, wake_w = os.pipe()
    spent: list[float] = []

    def subscribe() -> None:
        start = time.thread_time()
        deadline = time.monotonic() + DEADLINE
        while not fence.is_set() and time.monotonic() < deadline:
            wait_links([link], 1.0, wake_r)
        spent.append(time.thread_time() - start)

    reads = messages // per_read
    batches = [b"".join(message(n * per_read + i) for i in range(per_read)) for n in range(reads)]
    subscriber = threading.Thread(target=subscribe)
    subscriber.start()
    for batch in batches:
        theirs.sendall(batch)
        while queued(ours):  # read before the next batch: exactly per_read per read
            time.sleep(0)  # lets the GIL go to the subscriber (the Python loop needs it)
    theirs.sendall(message(0, ANSWERS))
    subscriber.join()
    assert fence.is_set(), "the fence never arrived"
    for fd in (wake_r, wake_w):
        os.close(fd)
    ours.close()
    theirs.close()
    return spent[0] / (reads * per_read) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40000)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    figures: dict[str, dict[int, float]] = {}
    for name, native in (("C loop", True), ("Python loop", False)):
        figures[name] = {}
        for per_read in PER_READ:
            us = run(per_read, args.messages, native)
            figures[name][per_read] = round(us, 3)
            print(f"{name:11s} {per_read:3d} messages per read: {us:.3f} us each", flush=True)
    result = {"messages": args.messages, "load_average": os.getloadavg(), "us_per_drop": figures}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
