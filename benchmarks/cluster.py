"""cluster: what a RedisBus node spends on the cluster's traffic (issue 15).

Runs, against one fresh redis-server per row, NODES gateway processes with a RedisBus, each
holding USERS idle WebSocket connections (raw sockets from this process), and publishes
pre-encoded user envelopes straight into Redis (SPUBLISH, as another node would), so the
figures are the receiving nodes' alone. Rows:

- ``single channel``: the code before issue 15 (``--main-src``: a checkout of main's src with
  its compiled module), every envelope on one channel;
- ``partitioned, random``: users placed on nodes at random (what a round-robin load balancer
  does);
- ``partitioned, sticky``: users placed by partition (node = user partition % NODES), what a
  load balancer hashing the partition does (docs/scaling.md).

Each row reports, from the kernel's CPU accounting of every thread (schedstat, ns):
- idle CPU per node (ms/s) with its connections and no traffic;
- CPU node 0 spends per message for users on OTHER nodes (phase A: MESSAGES such messages);
- CPU per message summed over the nodes and the most any node spends, for MESSAGES
  messages to users chosen uniformly over the deployment (phase B), and from it the
  cluster-wide rate at which the busiest node would fill one core; redis-server's CPU per
  message in the same phase (receiving the SPUBLISH and sending it to the subscribers).

With ``--cluster`` the partitioned rows run again on a Redis Cluster of 3 masters
(redis-server --cluster-enabled, redis-cli --cluster create), the nodes given one master's
address.

Every wait has a deadline (PHASE_DEADLINE) and says on stderr what it waits for; a row
that misses one, or whose nodes lost connections or subscriptions on the way, is reported
with an ``error`` and the run goes on with the next row. The nodes run without heartbeats:
the benchmark's connections never answer a ping, and a ping round would close them all
``ping_interval + ping_timeout`` (40 s) into a row, subscriptions included.

Usage: python benchmarks/cluster.py [--nodes 4] [--users 1500] [--messages 20000]
       [--main-src /tmp/route-main/src] [--cluster] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

from lowmemws._bus_base import Envelope  # noqa: E402
from lowmemws._routing import channel_for, control_channel, user_partition  # noqa: E402

NODE = textwrap.dedent(
    """
    import sys
    from lowmemws import Accept, Config, Gateway, RedisBus
    bus = RedisBus(sys.argv[1])
    # no heartbeats: the benchmark's connections never answer a ping (see the docstring)
    gateway = Gateway("127.0.0.1", 0, bus=bus, config=Config(ping_interval=0))
    gateway.on_connect(lambda request: Accept(user=int(request.params["user"])))
    gateway.start()
    assert bus.wait_ready(30)
    print(gateway.port, flush=True)
    sys.stdin.read()  # until the benchmark closes our stdin
    gateway.stop()
    """
)
SETTLE = 2.0  # seconds for subscribes to settle after the connections are made
IDLE_WINDOW = 5.0  # seconds of idle CPU measured per row
QUIET = 0.5  # seconds without CPU growth that mean a node has drained its traffic
QUIET_MARGIN_NS = 2_000_000  # CPU a node may take over QUIET, above its idle rate, and be quiet
PHASE_DEADLINE = 120.0  # seconds any one wait (start, settle, drain) may take
PROGRESS_EVERY = 5.0  # seconds between two reports of a wait that goes on
PIPELINE = 500  # SPUBLISH per round trip from the publisher


class PhaseTimeout(RuntimeError):
    """PhaseTimeout: a wait of the benchmark passed PHASE_DEADLINE (the row is reported with
    the error, the run goes on)."""


def say(text: str) -> None:
    """say reports progress on stderr (stdout carries the rows)."""
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def cpu_ns(pid: int) -> int:
    """cpu_ns is the CPU time of every thread of pid, in ns (schedstat)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            continue  # a thread that ended meanwhile
    return total


class Redis:
    """Redis is a throw-away redis-server on a free loopback port."""

    def __init__(self, directory: Path) -> None:
        self.port = free_port()
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        import redis

        self.client = redis.Redis.from_url(self.url)
        wait_for_ping(self.client)
        self.pids = [self.process.pid]

    def stop(self) -> None:
        self.client.close()
        self.process.kill()
        self.process.wait()


class RedisClusterServers:
    """RedisClusterServers is a throw-away Redis Cluster of 3 masters (no replicas: the
    figures are per message, failover is the tests' business) on free loopback ports."""

    MASTERS = 3

    def __init__(self, directory: Path) -> None:
        import redis

        ports = [free_port() for _ in range(2 * self.MASTERS)]
        self.processes = []
        for port, bus_port in zip(ports[::2], ports[1::2], strict=True):
            home = directory / f"node-{port}"
            home.mkdir(exist_ok=True)
            args = ["redis-server", "--port", str(port), "--bind", "127.0.0.1"]
            args += ["--cluster-enabled", "yes", "--cluster-port", str(bus_port)]
            args += ["--save", "", "--appendonly", "no", "--dir", str(home)]
            self.processes.append(subprocess.Popen(args, stdout=subprocess.DEVNULL))
        masters = ports[::2]
        for port in masters:
            wait_for_ping(redis.Redis(port=port))
        addresses = [f"127.0.0.1:{port}" for port in masters]
        subprocess.run(
            ["redis-cli", "--cluster", "create", *addresses, "--cluster-yes"],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 30
        while not all(
            b"cluster_state:ok"
            in subprocess.run(
                ["redis-cli", "-p", str(port), "CLUSTER", "INFO"], capture_output=True
            ).stdout
            for port in masters
        ):
            assert time.monotonic() < deadline, "the cluster never became ready"
            time.sleep(0.1)
        self.url = f"redis://127.0.0.1:{masters[0]}/0"
        self.client = redis.RedisCluster.from_url(self.url)
        self.pids = [process.pid for process in self.processes]

    def stop(self) -> None:
        self.client.close()
        for process in self.processes:
            process.kill()
            process.wait()


def wait_for_ping(client: Any) -> None:
    """wait_for_ping returns once the server answers (10 s at most)."""
    import redis

    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            client.close()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Node:
    """Node is one gateway process (src: the lowmemws source it runs)."""

    def __init__(self, redis_url: str, src: str) -> None:
        env = dict(os.environ, PYTHONPATH=src)
        self.process = subprocess.Popen(
            [sys.executable, "-c", NODE, redis_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            text=True,
        )
        assert self.process.stdout is not None
        self.sockets: list[socket.socket] = []
        readable, _, _ = select.select([self.process.stdout], [], [], PHASE_DEADLINE)
        line = self.process.stdout.readline() if readable else ""
        if not line.strip().isdigit():
            self.process.kill()
            self.process.wait()
            raise PhaseTimeout(f"a node did not start within {PHASE_DEADLINE} s: {line!r}")
        self.port = int(line)

    def connect(self, users: list[int]) -> None:
        """connect opens one WebSocket per user (the upgrade only; never read again)."""
        batch = []
        for user in users:
            s = socket.create_connection(("127.0.0.1", self.port), timeout=PHASE_DEADLINE)
            s.sendall(
                f"GET /?user={user} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            batch.append(s)
        for s in batch:
            head = s.recv(4096)
            assert head.startswith(b"HTTP/1.1 101"), head[:40]
        self.sockets += batch

    def alive(self) -> int:
        """alive counts this node's connections the server has not closed: it reads what
        each one received (the messages delivered) and counts those at end of stream."""
        closed = 0
        for s in self.sockets:
            s.setblocking(False)
            try:
                while s.recv(65536):
                    pass
                closed += 1  # recv returned b"": the server closed it
            except BlockingIOError:
                pass  # open, nothing more to read
            except OSError:
                closed += 1  # reset
            s.setblocking(True)
        return len(self.sockets) - closed

    def stop(self) -> None:
        for s in self.sockets:
            s.close()
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            say(f"node {self.process.pid} did not stop within 20 s: killed")
            self.process.kill()
            self.process.wait()


def unserved(node: Node) -> int:
    """unserved is node's bus_unserved_total: messages it received for users it lacks
    (0 for the code before issue 15, which has no such counter)."""
    import http.client
    import re

    connection = http.client.HTTPConnection("127.0.0.1", node.port, timeout=10)
    connection.request("GET", "/metrics")
    text = connection.getresponse().read().decode()
    connection.close()
    match = re.search(r"^lowmemws_bus_unserved_total (\S+)$", text, re.M)
    return int(float(match.group(1))) if match else 0


def wait_quiet(pids: list[int], what: str, idle_ms: list[float] | None = None) -> None:
    """wait_quiet returns once no node's CPU grew, over QUIET seconds, by more than its idle
    rate (ms/s, when known) plus QUIET_MARGIN_NS: a node whose idle CPU is high (the code
    before issue 15, a loaded machine) is quiet too. Reports every PROGRESS_EVERY s.

    Raises:
        PhaseTimeout: not quiet within PHASE_DEADLINE.
    """
    allowed = [QUIET_MARGIN_NS + (idle * 1e6 * QUIET) for idle in (idle_ms or [0.0] * len(pids))]
    start = time.monotonic()
    reported = start
    last = [cpu_ns(p) for p in pids]
    while True:
        time.sleep(QUIET)
        now = [cpu_ns(p) for p in pids]
        grown = [b - a for a, b in zip(last, now, strict=True)]
        if all(g < limit for g, limit in zip(grown, allowed, strict=True)):
            return
        last = now
        waited = time.monotonic() - start
        if waited > PHASE_DEADLINE:
            raise PhaseTimeout(f"{what}: nodes still busy after {PHASE_DEADLINE} s: {grown} ns")
        if time.monotonic() - reported >= PROGRESS_EVERY:
            reported = time.monotonic()
            busy = ", ".join(f"{g / 1e6:.1f}" for g in grown)
            say(f"{what}: {waited:.0f} s, waiting for quiet nodes; their ms in {QUIET} s: {busy}")


def publish(
    redis: Redis | RedisClusterServers, users: list[int], channel_of: Callable[[int], str]
) -> None:
    """publish sends one small user envelope per entry of users, as another node would."""
    origin = os.urandom(16)
    seqs: dict[str, int] = {}
    pipe = redis.client.pipeline(transaction=False)
    for n, user in enumerate(users, 1):
        channel = channel_of(user)
        seq = seqs[channel] = seqs.get(channel, 0) + 1
        data = origin + seq.to_bytes(8, "big") + Envelope.for_user(user, b"m").encode()
        pipe.execute_command("SPUBLISH", channel, data)
        if n % PIPELINE == 0:
            pipe.execute()
    pipe.execute()


def placement(kind: str, nodes: int, per_node: int, rng: random.Random) -> list[list[int]]:
    """placement returns each node's user tags: sticky by partition, or at random."""
    placed: list[list[int]] = [[] for _ in range(nodes)]
    tag = 1_000_000
    while min(len(p) for p in placed) < per_node:
        tag += 1
        index = user_partition(tag) % nodes if kind == "sticky" else rng.randrange(nodes)
        if len(placed[index]) < per_node:
            placed[index].append(tag)
    return placed


def run_row(
    name: str, src: str, kind: str, args: argparse.Namespace, tmp: Path, cluster: bool = False
) -> dict[str, Any]:
    rng = random.Random(15)
    say(f"{name}: starting Redis and {args.nodes} nodes")
    redis: Redis | RedisClusterServers = RedisClusterServers(tmp) if cluster else Redis(tmp)
    nodes: list[Node] = []
    try:
        nodes += [Node(redis.url, src) for _ in range(args.nodes)]
        placed = placement(kind, args.nodes, args.users, rng)
        say(f"{name}: connecting {args.users} users to each node")
        for node, users in zip(nodes, placed, strict=True):
            node.connect(users)
        pids = [node.process.pid for node in nodes]
        time.sleep(SETTLE)
        wait_quiet(pids, f"{name}, settling")
        subscribed = shard_channels(redis)

        before = [cpu_ns(p) for p in pids]
        time.sleep(IDLE_WINDOW)
        idle_ms = [(cpu_ns(p) - b) / 1e6 / IDLE_WINDOW for p, b in zip(pids, before, strict=True)]

        if kind == "single":
            channel_of: Callable[[int], str] = lambda _user: control_channel()  # noqa: E731
        else:
            channel_of = lambda user: channel_for("user", user)  # noqa: E731
        elsewhere = [u for users in placed[1:] for u in users]
        phase_a = [rng.choice(elsewhere) for _ in range(args.messages)]
        everyone = [u for users in placed for u in users]
        phase_b = [rng.choice(everyone) for _ in range(args.messages)]

        unserved_before = unserved(nodes[0])
        say(f"{name}: phase A, {args.messages} messages for users not on node 0")
        a_cpu, a_seconds = measure(redis, pids, phase_a, channel_of, idle_ms, f"{name}, A")
        received = unserved(nodes[0]) - unserved_before
        redis_before = sum(cpu_ns(pid) for pid in redis.pids)
        say(f"{name}: phase B, {args.messages} messages for users anywhere")
        b_cpu, b_seconds = measure(redis, pids, phase_b, channel_of, idle_ms, f"{name}, B")
        redis_ns = sum(cpu_ns(pid) for pid in redis.pids) - redis_before
        per_message_b = [ns / args.messages for ns in b_cpu]
        busiest = max(per_message_b)
        subscriptions = shard_channels(redis)
        connections = sum(node.alive() for node in nodes)
        problems = []
        if subscriptions != subscribed:
            problems.append(f"channels subscribed {subscribed} before, {subscriptions} after")
        if connections != args.nodes * args.users:
            problems.append(f"{args.nodes * args.users - connections} connections were closed")
        return {
            "row": name,
            "error": "; ".join(problems) or None,
            "phase_a_seconds": round(a_seconds, 2),
            "nodes": args.nodes,
            "users_per_node": args.users,
            "messages": args.messages,
            "idle_ms_per_s": [round(x, 3) for x in idle_ms],
            "unserved_us_per_message_node0": round(a_cpu[0] / args.messages / 1000, 3),
            "unserved_received_node0": received,
            "us_per_received_unserved_node0": (
                round(a_cpu[0] / received / 1000, 3) if received else None
            ),
            "cluster_us_per_message_sum": round(sum(per_message_b) / 1000, 3),
            "cluster_us_per_message_busiest": round(busiest / 1000, 3),
            "cluster_rate_one_core_busiest": round(1e9 / busiest) if busiest else None,
            "phase_b_seconds": round(b_seconds, 2),
            "redis_us_per_message": round(redis_ns / args.messages / 1000, 3),
            "channels_with_subscribers": subscriptions,
        }
    except PhaseTimeout as exc:
        say(f"{name}: {exc}")
        return {"row": name, "error": str(exc)}
    finally:
        for node in nodes:
            node.stop()
        redis.stop()


def shard_channels(redis: Redis | RedisClusterServers) -> int:
    """shard_channels counts the shard channels with a subscriber, over every master."""
    if isinstance(redis, Redis):
        return len(redis.client.execute_command("PUBSUB", "SHARDCHANNELS"))
    replies = redis.client.execute_command(
        "PUBSUB", "SHARDCHANNELS", target_nodes=redis.client.get_primaries()
    )
    return len(replies) if isinstance(replies, list) else sum(map(len, replies.values()))


def measure(
    redis: Redis | RedisClusterServers,
    pids: list[int],
    users: list[int],
    channel_of: Callable[[int], str],
    idle_ms: list[float],
    what: str,
) -> tuple[list[float], float]:
    """measure publishes, waits for the nodes to drain, returns each node's CPU (ns) for
    the traffic (idle CPU over the same time taken off) and the seconds it took.

    Raises:
        PhaseTimeout: the nodes were not quiet within PHASE_DEADLINE.
    """
    before = [cpu_ns(p) for p in pids]
    start = time.monotonic()
    publish(redis, users, channel_of)
    wait_quiet(pids, what, idle_ms)
    seconds = time.monotonic() - start - QUIET
    spent = [
        max(0.0, cpu_ns(p) - b - idle * 1e6 * seconds)
        for p, b, idle in zip(pids, before, idle_ms, strict=True)
    ]
    return spent, seconds


def exit_on_sigterm(signum: int, frame: object) -> None:
    """exit_on_sigterm turns SIGTERM into SystemExit, so each row's finally stops the nodes
    and redis-servers it started instead of leaving them running."""
    raise SystemExit(128 + signum)


def main() -> None:
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument("--users", type=int, default=1500, help="connections per node")
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--main-src", help="src of the code before issue 15 (single channel)")
    parser.add_argument("--cluster", action="store_true", help="also on a 3-master cluster")
    parser.add_argument("--json", help="write the rows here too")
    args = parser.parse_args()
    tmp = Path(f"/tmp/cluster-bench-{os.getpid()}")
    tmp.mkdir(exist_ok=True)
    src = str(HERE.parent / "src")
    rows = []
    if args.main_src:
        rows.append(run_row("single channel (main)", args.main_src, "single", args, tmp))
        print(json.dumps(rows[-1]), flush=True)
    for kind in ("random", "sticky"):
        rows.append(run_row(f"partitioned, {kind}", src, kind, args, tmp))
        print(json.dumps(rows[-1]), flush=True)
    if args.cluster:
        for kind in ("random", "sticky"):
            name = f"partitioned, {kind}, Redis Cluster (3 masters)"
            rows.append(run_row(name, src, kind, args, tmp, cluster=True))
            print(json.dumps(rows[-1]), flush=True)
    load = os.getloadavg()
    result = {"load_average": load, "rows": rows}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
