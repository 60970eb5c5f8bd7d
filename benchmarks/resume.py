"""resume: a mass resume after a gateway restart (issue 12).

A gateway with history on and RedisBus (a real redis-server) holds N clients of the
envelope subprotocol, each a member of the topic "all" that learnt its position. The
gateway is killed (SIGKILL); meanwhile M messages are published to "all" straight into
Redis (`_history_redis.store_and_publish`, as a backend publisher would); the gateway is
started again on the same port and every client reconnects at once, naming its position.
Reported: the time from the restart until every client has its M messages replayed (each
checked: M messages, in offset order, then "resumed") and the peak RSS growth of the new
gateway process while they resume (VmHWM against its RSS before the reconnects), which
History.replay_threads and the write bounds cap.

Clients are processes of this script (``--client``), each with its own loopback source
address, driving non-blocking sockets with a selector.

    python benchmarks/resume.py [--connections 19000] [--missed 10] [--replay-threads 4]
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import procstats
from serverctl import free_port

PER_CLIENT = 6_500
POSITION = re.compile(rb'\{"resumed":"t:all","e":"([0-9a-f]*)","o":(\d+)\}')
MESSAGE = re.compile(rb'\{"s":"t:all","e":"[0-9a-f]+","o":(\d+),')
SYNCED = b'{"synced":true}'

GATEWAY = """
import sys, threading
from lowmemws import Accept, Config, Gateway, History, RedisBus
port, url = int(sys.argv[1]), sys.argv[2]
bus = RedisBus(url)
config = Config(history=History(replay_threads=int(sys.argv[3])))
gateway = Gateway("127.0.0.1", port, bus=bus, config=config)
gateway.on_connect(lambda request: Accept(topics=("all",)))
def announce():
    if gateway.wait_ready(60) and bus.wait_ready(60):
        print("ready", flush=True)
threading.Thread(target=announce, daemon=True).start()
gateway.run()
"""


# -- the client processes ----------------------------------------------------------------


def upgrade(positions: dict[str, list[object]]) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    resume = urllib.parse.quote(json.dumps(positions))
    return (
        f"GET /ws?lmw_resume={resume} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        "Sec-WebSocket-Protocol: lowmemws.v1\r\n\r\n"
    ).encode()


def connect_all(port: int, source: str, requests: list[bytes]) -> list[bytes]:
    """connect_all opens one connection per request at once and returns what each received
    up to its synced frame (the frames are small: no parsing of WebSocket headers needed)."""
    selector = selectors.DefaultSelector()
    received: list[bytearray] = [bytearray() for _ in requests]
    socks: list[socket.socket] = []
    for index, request in enumerate(requests):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.setblocking(False)
        sock.connect_ex(("127.0.0.1", port))
        socks.append(sock)
        selector.register(sock, selectors.EVENT_WRITE, (index, request))
    pending = len(requests)
    while pending:
        for key, events in selector.select(30):
            index, request = key.data
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if events & selectors.EVENT_WRITE:
                if sock.connect_ex(("127.0.0.1", port)) not in (0, 106):  # 106: EISCONN
                    raise SystemExit(f"connection {index} failed")
                sock.sendall(request)
                selector.modify(sock, selectors.EVENT_READ, (index, request))
                continue
            chunk = sock.recv(65536)
            if not chunk:
                raise SystemExit(f"connection {index} closed: {bytes(received[index][:80])!r}")
            received[index] += chunk
            if SYNCED in received[index]:
                selector.unregister(sock)
                pending -= 1
    client_main.socks = socks  # type: ignore[attr-defined]
    return [bytes(r) for r in received]


def client_main(port: int, source: str, count: int) -> None:
    """client_main: "connect" (learn positions), "resume" (after the restart), "close"."""
    positions: list[tuple[str, int]] = []
    for line in sys.stdin:
        command = line.strip()
        if command == "connect":
            got = connect_all(port, source, [upgrade({}) for _ in range(count)])
            for data in got:
                found = POSITION.search(data)
                positions.append(
                    (found.group(1).decode(), int(found.group(2))) if found else ("", 0)
                )
            print(json.dumps({"connected": len(got)}), flush=True)
        elif command == "drop":
            for sock in client_main.socks:  # type: ignore[attr-defined]
                sock.close()
            print(json.dumps({"dropped": True}), flush=True)
        elif command.startswith("resume"):
            missed = int(command.split()[1])
            requests = [upgrade({"t:all": [e, o]}) for e, o in positions]
            got = connect_all(port, source, requests)
            complete = 0
            for (_, offset), data in zip(positions, got, strict=True):
                offsets = [int(m) for m in MESSAGE.findall(data)]
                if offsets == list(range(offset + 1, offset + missed + 1)) and b'"resumed"' in data:
                    complete += 1
            print(json.dumps({"resumed": complete}), flush=True)
        elif command == "close":
            return


class Clients:
    def __init__(self, port: int, total: int) -> None:
        self.procs: list[subprocess.Popen[str]] = []
        for index, start in enumerate(range(0, total, PER_CLIENT)):
            count = min(PER_CLIENT, total - start)
            source = f"127.0.{10 + index}.2"
            args = [sys.executable, __file__, "--client", str(port), source, str(count)]
            self.procs.append(
                subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            )

    def command(self, text: str) -> list[dict[str, object]]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(text + "\n")
            proc.stdin.flush()
        answers = []
        for proc in self.procs:
            assert proc.stdout is not None
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"a client process failed (exit {proc.wait()})")
            answers.append(json.loads(line))
        return answers

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None and proc.stdin is not None:
                proc.stdin.write("close\n")
                proc.stdin.close()
            proc.wait(30)


# -- the driver ----------------------------------------------------------------------------


def start_gateway(script: Path, port: int, url: str, threads: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), url, str(threads)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != "ready":
        raise RuntimeError("the gateway did not start")
    return proc


def publish_missed(url: str, count: int) -> None:
    import redis

    from lowmemws import Envelope, History
    from lowmemws._history_redis import store_and_publish

    client = redis.Redis.from_url(url)
    sharded = int(str(client.info("server")["redis_version"]).split(".")[0]) >= 7
    for n in range(count):
        envelope = Envelope.for_topic("all", f"missed notification {n}")
        store_and_publish(client, envelope, History(), sharded=sharded)


def measure(connections: int, missed: int, redis_binary: str, threads: int) -> dict[str, float]:
    workdir = Path(tempfile.mkdtemp(prefix="resume-bench-"))
    redis_port, port = free_port(), free_port()
    redis_proc = subprocess.Popen(
        [redis_binary, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"redis://127.0.0.1:{redis_port}/0"
    script = workdir / "gateway.py"
    script.write_text(GATEWAY)
    time.sleep(0.5)
    gateway = start_gateway(script, port, url, threads)
    clients = Clients(port, connections)
    try:
        connected = sum(int(str(a["connected"])) for a in clients.command("connect"))
        os.kill(gateway.pid, signal.SIGKILL)  # a crash
        gateway.wait()
        clients.command("drop")
        publish_missed(url, missed)
        gateway = start_gateway(script, port, url, threads)
        base = procstats.memory(gateway.pid)["rss"]
        started = time.monotonic()
        resumed = sum(int(str(a["resumed"])) for a in clients.command(f"resume {missed}"))
        seconds = time.monotonic() - started
        peak = procstats.status_kib(gateway.pid)["VmHWM"] * 1024
        after = procstats.memory(gateway.pid)["rss"]
    finally:
        clients.close()
        gateway.kill()
        gateway.wait()
        redis_proc.kill()
        redis_proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "connections": connected,
        "resumed": resumed,
        "seconds": seconds,
        "rss_before": base,
        "rss_peak": peak,
        "rss_after": after,
    }


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        client_main(int(sys.argv[2]), sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=19_000)
    parser.add_argument("--missed", type=int, default=10)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--replay-threads", type=int, default=4, help="History.replay_threads")
    args = parser.parse_args()
    r = measure(args.connections, args.missed, args.redis_server, args.replay_threads)
    mib = 1024 * 1024
    print(
        f"mass resume: {r['connections']:,} clients, {args.missed} messages missed each, "
        f"gateway SIGKILLed and restarted (RedisBus, replay_threads {args.replay_threads})\n"
        f"  all caught up in {r['seconds']:.2f} s; {r['resumed']:,} complete "
        f"(each its {args.missed} messages in order, then resumed)\n"
        f"  gateway RSS before the reconnects {r['rss_before'] / mib:.1f} MiB, peak "
        f"{r['rss_peak'] / mib:.1f} MiB (+{(r['rss_peak'] - r['rss_before']) / mib:.1f} MiB), "
        f"after {r['rss_after'] / mib:.1f} MiB"
    )


if __name__ == "__main__":
    main()
