"""history_publish: the cost of one publish with history on (issue 12), in memory and in Redis.

A gateway in this process with no subscriber (so the figure is the publish path alone:
store, position, envelope, bus) publishes N messages of SIZE bytes to one topic, and the
same without history for reference. With ``--redis-server`` a redis-server is started and a
RedisBus gateway publishes through the store-and-publish script (one round trip each).
Reported per publish: wall microseconds and this process's CPU microseconds (all threads).

    python benchmarks/history_publish.py [--messages 20000] [--size 256]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
import time

from serverctl import free_port

import lowmemws


def per_publish(gateway: lowmemws.Gateway, messages: int, size: int) -> tuple[float, float]:
    payload = "x" * size
    for _ in range(200):  # warm-up
        gateway.publish("news", payload)
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(messages):
        gateway.publish("news", payload)
    return (
        (time.perf_counter() - wall) / messages * 1e6,
        (time.process_time() - cpu) / messages * 1e6,
    )


def measure(
    config: lowmemws.Config, bus: object | None, messages: int, size: int
) -> tuple[float, float]:
    gateway = lowmemws.Gateway("127.0.0.1", 0, config=config, bus=bus)  # type: ignore[arg-type]
    gateway.start()
    try:
        if isinstance(bus, lowmemws.RedisBus):
            bus.wait_ready(10)
        return per_publish(gateway, messages, size)
    finally:
        gateway.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--redis-server", default=shutil.which("redis-server"))
    args = parser.parse_args()
    history = lowmemws.Config(history=lowmemws.History())
    rows = [
        ("LocalBus, no history", measure(lowmemws.Config(), None, args.messages, args.size)),
        ("LocalBus, history in memory", measure(history, None, args.messages, args.size)),
    ]
    if args.redis_server:
        port, workdir = free_port(), tempfile.mkdtemp(prefix="history-publish-")
        redis = subprocess.Popen(
            [args.redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", workdir],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(0.5)
        url = f"redis://127.0.0.1:{port}/0"
        try:
            n = max(1, args.messages // 4)
            plain = measure(lowmemws.Config(), lowmemws.RedisBus(url), n, args.size)
            rows.append(("RedisBus, no history (buffered)", plain))
            stored = measure(history, lowmemws.RedisBus(url), n, args.size)
            rows.append(("RedisBus, history in Redis Streams", stored))
        finally:
            redis.kill()
            redis.wait()
            shutil.rmtree(workdir, ignore_errors=True)
    print(f"one publish of {args.size} B to a topic with no subscriber, this process's cost")
    print("| bus | wall us/publish | CPU us/publish |\n| --- | --- | --- |")
    for name, (wall, cpu) in rows:
        print(f"| {name} | {wall:.1f} | {cpu:.1f} |")


if __name__ == "__main__":
    main()
