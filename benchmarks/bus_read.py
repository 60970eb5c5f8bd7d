"""bus_read: the CPU RedisBus's subscriber thread spends per message it drops, by how many
messages one read brings (issue 15).

A SubscriberLink on one end of a socketpair, its BusFilter dropping every message (our own
echoes: the same path as a user held elsewhere, minus the hub lookup), fed batches of K
small messages; each batch is one wait_links wake-up (select, recv_into, the C scan). The
figure includes the send on the other end. It shows the two costs apart: a fixed cost per
read (select, recv, the Python around them) and a small one per message (the C filter).

Usage: python benchmarks/bus_read.py [--messages 20000]
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from lowmemws._bus_filter import BusFilter  # noqa: E402
from lowmemws._redis_link import SubscriberLink, wait_links  # noqa: E402

NODE = b"\xee" * 16


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def message(seq: int) -> bytes:
    """One RESP3 push of a small user envelope from this node (dropped as an echo)."""
    data = NODE + seq.to_bytes(8, "big") + bytes([1, 1, 1]) + seq.to_bytes(8, "big") + b"x"
    return b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:{u:17}") + bulk(data)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20000)
    args = parser.parse_args()
    ours, theirs = socket.socketpair()
    link = SubscriberLink(
        SimpleNamespace(_sock=ours),
        True,
        lambda channel, data, judged: None,
        BusFilter(NODE, b"answers"),
        keepalive=60,
        reply_timeout=5,
    )
    wake_r, _ = os.pipe()
    for per_read in (1, 4, 16, 64):
        reads = args.messages // per_read
        batches = [
            b"".join(message(n * per_read + i) for i in range(per_read)) for n in range(reads)
        ]
        start = time.process_time()
        for batch in batches:
            theirs.sendall(batch)
            wait_links([link], 1.0, wake_r)
        spent = time.process_time() - start
        print(f"{per_read:3d} messages per read: {spent / (reads * per_read) * 1e6:.2f} us each")


if __name__ == "__main__":
    main()
