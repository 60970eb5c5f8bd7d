"""``Gateway(processes=2)``: SO_REUSEPORT workers under a supervising parent, as users see it.

The server is a small script run as a child process (the parent forks its workers). Its
clients subscribe through the query string (``/?topics=a,b``) and talk to it in text:
``pid`` answers the worker's process id, ``pub TOPIC TEXT`` publishes TEXT to TOPIC from that
worker. A publish in one worker reaches subscribers in every worker (the process bus); a
killed worker is restarted; SIGTERM closes every client with 1001 and the parent exits 0.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import websocket

from tests.support import waiting
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.servers import ServerProcess, StartServer
from tests.support.ws_close import expect_close_frames

DEADLINE = 20.0  # bounds every wait; not a performance figure

SERVER = textwrap.dedent(
    """
    import argparse, os, threading
    from lowmemws import Accept, Config, Gateway

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    gateway = Gateway(args.host, args.port, processes=2, config=Config(shutdown_timeout=5))

    @gateway.on_connect
    def decide(request):
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        return Accept(topics=topics)

    @gateway.on_message
    def command(conn, message):
        if message == "pid":
            conn.send(str(os.getpid()))
        elif message.startswith("pub "):
            _, topic, text = message.split(" ", 2)
            gateway.publish(topic, text)

    def announce():
        if gateway.wait_ready(60):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


wait_until = waiting.waiter(DEADLINE, interval=0.05)


@pytest.fixture
def server(start_server: StartServer, tmp_path: Path) -> ServerProcess:
    script = tmp_path / "pubsub_server.py"
    script.write_text(SERVER)
    return start_server([sys.executable, str(script)])


@pytest.fixture
def clients() -> Iterator[list[websocket.WebSocket]]:
    made: list[websocket.WebSocket] = []
    yield made
    for client in made:
        client.shutdown()


def children(pid: int) -> set[int]:
    """children are the process ids of pid's child processes (its workers)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found.update(int(c) for c in (task / "children").read_text().split())
        except FileNotFoundError:
            continue
    return found


def metrics(server: ServerProcess) -> str:
    return fetch_metrics(server.host, server.port)


def gauge(text: str, name: str) -> int:
    return int(metric_value(text, name))


def connect(
    server: ServerProcess, made: list[websocket.WebSocket], topics: str = ""
) -> tuple[websocket.WebSocket, int]:
    """connect opens a client and asks which worker process serves it."""
    client = websocket.create_connection(f"{server.url}?topics={topics}", timeout=DEADLINE)
    made.append(client)
    client.send("pid")
    return client, int(client.recv())


def one_on_each_worker(
    server: ServerProcess, made: list[websocket.WebSocket], topics: str
) -> dict[int, websocket.WebSocket]:
    """one_on_each_worker opens clients until both workers serve one; {worker pid: client}.

    The kernel spreads SO_REUSEPORT connections by a hash of their addresses, so a few
    connections almost surely reach both; the bound only keeps a failure from hanging.
    """
    by_worker: dict[int, websocket.WebSocket] = {}
    for _ in range(200):
        client, pid = connect(server, made, topics)
        by_worker.setdefault(pid, client)
        if len(by_worker) == 2:
            return by_worker
    raise AssertionError(f"200 connections all reached one worker: {set(by_worker)}")


def test_connections_spread_and_a_publish_reaches_the_other_worker(
    server: ServerProcess, clients: list[websocket.WebSocket]
) -> None:
    text = metrics(server)
    assert gauge(text, "lowmemws_processes") == 2
    workers = children(server.pid)
    assert len(workers) == 2
    by_worker = one_on_each_worker(server, clients, "news")
    assert set(by_worker) == workers
    assert gauge(metrics(server), "lowmemws_connections") == len(clients)  # summed

    (pid_a, a), (pid_b, b) = by_worker.items()
    a.send("pub news from worker a")
    assert b.recv() == "from worker a"
    assert a.recv() == "from worker a"  # and its own subscribers
    b.send("pub news from worker b")
    assert a.recv() == "from worker b"
    assert b.recv() == "from worker b"
    for client in clients:  # every subscriber, on either worker, got both exactly once
        if client not in (a, b):
            assert [client.recv(), client.recv()] == ["from worker a", "from worker b"]
    a.send("pub sport nobody listens")
    a.send("pub news fence")
    assert b.recv() == "fence"


def test_a_killed_worker_is_restarted_and_the_server_keeps_serving(
    server: ServerProcess, clients: list[websocket.WebSocket]
) -> None:
    by_worker = one_on_each_worker(server, clients, "news")
    (victim, doomed), (survivor, alive) = by_worker.items()
    os.kill(victim, signal.SIGKILL)
    doomed.settimeout(DEADLINE)
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        doomed.recv()  # its clients lose their connection with it

    def restarted() -> bool:
        pids = children(server.pid)
        return len(pids) == 2 and victim not in pids and survivor in pids

    wait_until(restarted, "the parent to start a new worker")
    wait_until(lambda: gauge(metrics(server), "lowmemws_processes") == 2, "two workers again")
    (replacement,) = children(server.pid) - {survivor}
    assert server.proc.poll() is None

    alive.send("pid")  # the survivor's clients were not disturbed
    assert int(alive.recv()) == survivor
    fresh: dict[int, websocket.WebSocket] = {}
    for _ in range(200):
        client, pid = connect(server, clients, "news")
        fresh.setdefault(pid, client)
        if replacement in fresh:
            break
    assert replacement in fresh, "no connection reached the new worker"
    fresh[replacement].send("pub news from the new worker")
    assert alive.recv() == "from the new worker"  # the process bus is rewired too
    alive.send("pub news back")
    assert fresh[replacement].recv() == "from the new worker"
    assert fresh[replacement].recv() == "back"


def test_sigterm_closes_every_client_with_1001_and_exits_0(
    server: ServerProcess, clients: list[websocket.WebSocket]
) -> None:
    by_worker = one_on_each_worker(server, clients, "")
    workers = set(by_worker)
    server.terminate()
    expect_close_frames(clients, 1001)
    try:
        assert server.proc.wait(DEADLINE) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the parent did not exit within {DEADLINE:.0f} s of SIGTERM")
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
        "no worker to outlive the parent",
    )


def test_workers_of_a_killed_supervisor_close_their_clients_with_1001_and_exit(
    server: ServerProcess, clients: list[websocket.WebSocket]
) -> None:
    """A supervisor killed outright (SIGKILL: no handler runs) leaves no orphan serving on:
    the kernel tells each worker, which stops as on SIGTERM, so its clients reconnect to a
    live process instead of staying on one that nobody restarts and whose bus is gone."""
    by_worker = one_on_each_worker(server, clients, "")
    workers = set(by_worker)
    os.kill(server.pid, signal.SIGKILL)
    server.proc.wait(DEADLINE)
    expect_close_frames(clients, 1001)
    wait_until(
        lambda: not any(Path(f"/proc/{pid}").exists() for pid in workers),
        "no worker to outlive its killed supervisor",
    )
