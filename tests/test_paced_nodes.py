"""Paced fan-out (issue 18) across worker processes (``Gateway(processes=2)``) and across two
nodes through a real redis-server (``RedisBus``).

Each server is a small script run as its own process. Its clients subscribe through the query
string (``/?topics=news``) and are greeted with the pid of the process that serves them; a
client drives its node with JSON commands (publish, broadcast, cancel), so a paced send
starts on one node and travels the bus to every other. What the tests check is the documented
semantics: with ``spread`` every node spreads its own members over the whole time; with
``rate`` each node paces at rate / nodes, so the deployment's total holds; a cancel reaches
every node. Timing is asserted as lower bounds only (what pacing guarantees whatever the load).
"""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import waiting
from tests.support.arrivals import Recorder, count
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.redis_server import RedisServer
from tests.support.servers import ServerProcess, StartServer

DEADLINE = 30.0  # bounds every wait; not a performance figure
wait_until = waiting.waiter(DEADLINE, interval=0.05)

NODE = textwrap.dedent(
    """
    import argparse, json, os, threading
    from lowmemws import Accept, Config, Gateway, RedisBus

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis")
    parser.add_argument("--processes", type=int, default=1)
    args = parser.parse_args()
    bus = RedisBus(args.redis) if args.redis else None
    gateway = Gateway(
        args.host, args.port, processes=args.processes, bus=bus, config=Config(ping_interval=0)
    )

    @gateway.on_connect
    def decide(request):
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        return Accept(topics=topics)

    @gateway.on_open
    def greet(conn):
        conn.send(f"pid {os.getpid()}")

    @gateway.on_message
    def command(conn, message):
        cmd = json.loads(message)
        op = cmd.pop("op")
        if op == "publish":
            gateway.publish(cmd.pop("topic"), cmd.pop("text"), **cmd)
        elif op == "broadcast":
            gateway.broadcast(cmd.pop("text"), **cmd)
        elif op == "cancel":
            gateway.cancel_paced(cmd["pace_id"])

    def announce():
        if gateway.wait_ready(60) and (bus is None or bus.wait_ready(30)):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


@pytest.fixture
def start_node(start_server: StartServer, tmp_path: Path) -> Callable[..., ServerProcess]:
    script = tmp_path / "paced_node.py"
    script.write_text(NODE)

    def start(*args: str) -> ServerProcess:
        return start_server([sys.executable, str(script)], list(args))

    return start


@pytest.fixture
def clients() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for client in made:
        client.close()


def connect(node: ServerProcess, made: list[Recorder], query: str = "") -> Recorder:
    client = Recorder(f"{node.url}?{query}")
    made.append(client)
    wait_until(lambda: bool(client.messages()), "the greeting")
    return client


def pid_of(client: Recorder) -> int:
    return int(client.messages()[0].split()[1])


def command(client: Recorder, **cmd: object) -> None:
    client.send(json.dumps(cmd))


def metric(node: ServerProcess, name: str) -> int:
    return int(metric_value(fetch_metrics(node.host, node.port), f"lowmemws_{name}"))


def span(recorders: list[Recorder], text: str) -> float:
    times = sorted(t for r in recorders for t in r.times(text))
    return times[-1] - times[0]


def by_process(made: list[Recorder]) -> dict[int, list[Recorder]]:
    groups: dict[int, list[Recorder]] = {}
    for client in made:
        groups.setdefault(pid_of(client), []).append(client)
    return groups


def fence(
    nodes: list[ServerProcess], control: Recorder, made: list[Recorder], expected: list[str]
) -> None:
    """fence waits until every client of made has each text of expected (a paced send's
    start travels the bus, so a node may not have it yet when asked) and the nodes' paced
    sends have ended, then broadcasts "fence" unpaced: once every client has it, nothing
    paced is still on its way (so duplicates would show)."""
    wait_until(lambda: all(c.messages(t) for c in made for t in expected), "the paced sends")
    wait_until(lambda: all(metric(n, "paced_in_flight") == 0 for n in nodes), "their end")
    command(control, op="broadcast", text="fence")
    wait_until(lambda: all(c.messages("fence") for c in made), "the fence")


def test_worker_processes_each_pace_their_own_members(
    start_node: Callable[..., ServerProcess], clients: list[Recorder]
) -> None:
    node = start_node("--processes", "2")
    members: list[Recorder] = []
    while len(members) < 40 and not (
        len(by_process(members)) == 2 and min(map(len, by_process(members).values())) >= 8
    ):
        members.append(connect(node, clients, "topics=news"))
    groups = by_process(members)
    assert len(groups) == 2, "every connection reached one worker"
    control = connect(node, clients)

    command(control, op="publish", topic="news", text="spread", spread=1.5)
    command(control, op="publish", topic="news", text="rate", rate=10)
    fence([node], control, members, ["spread", "rate"])

    assert [len(c.messages("spread")) for c in members] == [1] * len(members)
    assert [len(c.messages("rate")) for c in members] == [1] * len(members)
    for group in groups.values():
        assert span(group, "spread") >= 0.5  # each worker spreads its share over the time
        # each of the 2 workers paces at 10 / 2 a second: its n-th delivery >= (n - 1) / 5 s
        assert span(group, "rate") >= 0.7 * (len(group) - 1) / 5
    assert metric(node, "paced_deliveries_total") == 2 * len(members)
    assert count(clients, "spread") == len(members)  # the control is not a member


def test_two_nodes_through_redis_pace_and_cancel_together(
    start_node: Callable[..., ServerProcess],
    redis_server: RedisServer,
    clients: list[Recorder],
) -> None:
    nodes = [start_node("--redis", redis_server.url) for _ in range(2)]
    members = {
        i: [connect(n, clients, "topics=news") for _ in range(8)] for i, n in enumerate(nodes)
    }
    controls = [connect(n, clients) for n in nodes]
    wait_until(lambda: metric(nodes[0], "bus_peers") == 2, "node 0 to see both nodes")
    everyone = [c for group in members.values() for c in group]

    command(controls[0], op="publish", topic="news", text="rate", rate=8)
    command(controls[1], op="broadcast", text="spread", spread=1.5)
    fence(nodes, controls[0], everyone, ["rate", "spread"])
    wait_until(lambda: all(c.messages("fence") for c in controls), "the fence")

    assert [len(c.messages("rate")) for c in everyone] == [1] * 16
    assert [len(c.messages("spread")) for c in clients] == [1] * 18  # controls too
    for group in members.values():
        assert span(group, "rate") >= 0.7 * 7 / 4  # 2 nodes at 8 / 2 a second, 8 members each
        assert span(group, "spread") >= 0.5

    command(controls[0], op="publish", topic="news", text="cancelled", spread=6, pace_id="p")
    wait_until(lambda: count(everyone, "cancelled") >= 2, "the first deliveries")
    wait_until(lambda: all(metric(n, "paced_in_flight") == 1 for n in nodes), "both started")
    command(controls[1], op="cancel", pace_id="p")  # from the other node
    wait_until(lambda: all(metric(n, "paced_in_flight") == 0 for n in nodes), "the cancel")
    command(controls[0], op="broadcast", text="fence 2")
    wait_until(lambda: all(c.messages("fence 2") for c in clients), "the second fence")
    not_reached = sum(metric(n, "paced_cancelled_total") for n in nodes)
    assert not_reached > 0
    assert count(everyone, "cancelled") + not_reached == 16
