"""Two gateway processes sharing topics, users and broadcasts through a real redis-server.

Each node is a small script run as its own process: ``Gateway(bus=RedisBus(url))``, the bus
made inside that process. Clients subscribe through the query string (``/?user=7&topics=a``)
and drive the node in text: ``pub TOPIC TEXT``, ``user N TEXT`` and ``all TEXT`` publish
from that node (the answer ``refused`` means BusUnavailable). Redis is killed and restarted
mid-test: each node keeps serving its own clients meanwhile, and what was published during
the outage arrives on the other node afterwards, in order (RedisBus buffers it).
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import websocket

from lowmemws._routing import channel_for
from lowmemws.metrics import BUS_GAUGES
from tests.support import waiting
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.redis_server import RedisServer
from tests.support.servers import ServerProcess, StartServer

DEADLINE = 20.0  # bounds every wait; not a performance figure

NODE = textwrap.dedent(
    """
    import argparse, threading
    from lowmemws import Accept, BusUnavailable, Gateway, RedisBus

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--redis")
    parser.add_argument("--max-buffered", type=int, default=10000)
    parser.add_argument("--backoff-base", type=float, default=0.05)
    args = parser.parse_args()
    bus = RedisBus(
        args.redis,
        backoff_base=args.backoff_base,
        backoff_cap=max(0.5, args.backoff_base),
        max_buffered=args.max_buffered,
    )
    gateway = Gateway(args.host, args.port, bus=bus)

    @gateway.on_connect
    def decide(request):
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        return Accept(user=int(request.params.get("user", "0")), topics=topics)

    @gateway.on_message
    def command(conn, message):
        verb, rest = message.split(" ", 1)
        try:
            if verb == "pub":
                topic, text = rest.split(" ", 1)
                gateway.publish(topic, text)
            elif verb == "user":
                user, text = rest.split(" ", 1)
                gateway.send_to_user(int(user), text)
            elif verb == "all":
                gateway.broadcast(rest)
            elif verb == "count":
                topic, text = rest.split(" ", 1)
                conn.send(f"reached {gateway.publish(topic, text)}")
        except BusUnavailable:
            conn.send("refused")

    def announce():
        if gateway.wait_ready(30) and bus.wait_ready(30):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


@pytest.fixture
def start_node(
    start_server: StartServer,
    redis_server: RedisServer,  # noqa: F811
    tmp_path: Path,
) -> Callable[..., ServerProcess]:
    script = tmp_path / "redis_node.py"
    script.write_text(NODE)

    def start(max_buffered: int = 10000, backoff_base: float = 0.05) -> ServerProcess:
        args = ["--redis", redis_server.url, "--max-buffered", str(max_buffered)]
        args += ["--backoff-base", str(backoff_base)]
        return start_server([sys.executable, str(script)], args)

    return start


@pytest.fixture
def make_client(
    redis_server: RedisServer,  # noqa: F811
) -> Iterator[Callable[..., websocket.WebSocket]]:
    """make_client(node, user, topics) connects a client to node and waits until the node
    subscribed to the client's partitions (a member is reached by what is published after
    that: issue 15); all are shut at teardown."""
    import redis

    made: list[websocket.WebSocket] = []
    holders: dict[str, set[int]] = {}  # channel -> ports of the nodes with members there
    admin = redis.Redis.from_url(redis_server.url)

    def connect(node: ServerProcess, user: int = 0, topics: str = "") -> websocket.WebSocket:
        url = f"{node.url}?user={user}&topics={topics}"
        client = websocket.create_connection(url, timeout=DEADLINE)
        made.append(client)
        channels = [channel_for("topic", t) for t in topics.split(",") if t]
        channels += [channel_for("user", user)] if user else []
        for channel in channels:
            holders.setdefault(channel, set()).add(node.port)
            wait_until(
                lambda ch=channel: shard_subscribers(admin, ch) >= len(holders[ch]),  # type: ignore[misc]
                f"the nodes to subscribe to {channel}",
            )
        return client

    yield connect
    for client in made:
        client.shutdown()
    admin.close()


def shard_subscribers(admin: Any, channel: str) -> int:
    """shard_subscribers asks Redis how many links subscribe to channel (sharded)."""
    return int(admin.execute_command("PUBSUB", "SHARDNUMSUB", channel)[1])


def bus_counter(node: ServerProcess, name: str) -> int:
    metric = f"lowmemws_bus_{name}" if name in BUS_GAUGES else f"lowmemws_bus_{name}_total"
    return int(metric_value(fetch_metrics(node.host, node.port), metric))


wait_until = waiting.waiter(DEADLINE, interval=0.05)


def test_a_publish_on_one_node_reaches_clients_on_the_other(
    start_node: Callable[..., ServerProcess],
    make_client: Callable[..., websocket.WebSocket],
) -> None:
    a, b = start_node(), start_node()
    on_a = make_client(a, user=1, topics="news")
    on_b = make_client(b, user=2, topics="news")
    also_b = make_client(b, user=1)  # user 1 on both nodes

    on_a.send("pub news from node a")
    assert on_a.recv() == "from node a"
    assert on_b.recv() == "from node a"
    on_b.send("pub news from node b")
    assert on_b.recv() == "from node b"
    assert on_a.recv() == "from node b"

    on_b.send("user 1 to user one")  # every connection of user 1, on every node
    assert on_a.recv() == "to user one"
    assert also_b.recv() == "to user one"
    on_a.send("all everyone")
    assert [c.recv() for c in (on_a, on_b, also_b)] == ["everyone"] * 3


def test_publish_returns_the_connections_of_its_own_node_it_reached(
    start_node: Callable[..., ServerProcess],
    make_client: Callable[..., websocket.WebSocket],
) -> None:
    a, b = start_node(), start_node()
    on_a = make_client(a, topics="news")
    also_a = make_client(a, topics="news")
    on_b = make_client(b, topics="news")

    on_a.send("count news headline")  # RedisBus delivers to its own node before returning
    assert on_a.recv() == "headline"
    assert on_a.recv() == "reached 2"  # the two members on node a; node b is not counted
    assert also_a.recv() == "headline"
    assert on_b.recv() == "headline"


def test_redis_outage_keeps_local_traffic_then_resumes_and_flushes(
    start_node: Callable[..., ServerProcess],
    make_client: Callable[..., websocket.WebSocket],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = start_node(), start_node()
    a_pub, a_sub = make_client(a), make_client(a, topics="t")
    b_pub, b_sub = make_client(b), make_client(b, topics="t")
    a_pub.send("pub t before")
    assert a_sub.recv() == b_sub.recv() == "before"
    b_pub.send("pub t before from b")
    assert a_sub.recv() == b_sub.recv() == "before from b"

    redis_server.kill()
    wait_until(lambda: bus_counter(a, "disconnects") >= 1, "node a to notice the outage")
    wait_until(lambda: bus_counter(b, "disconnects") >= 1, "node b to notice the outage")
    during = [f"during {n}" for n in range(10)]
    for text in during:
        a_pub.send(f"pub t {text}")
        assert a_sub.recv() == text  # local traffic on node a goes on
    b_pub.send("pub t b alone")
    assert b_sub.recv() == "b alone"  # and on node b
    b_sub.settimeout(1.0)
    with pytest.raises(websocket.WebSocketTimeoutException):
        b_sub.recv()  # nothing from node a crosses while Redis is down
    b_sub.settimeout(DEADLINE)
    assert bus_counter(a, "buffered") == 10
    assert bus_counter(a, "refused") == 0

    redis_server.start()  # same port
    # node a's buffer arrives at node b in order, each once, then live traffic resumes
    assert [b_sub.recv() for _ in during] == during
    assert a_sub.recv() == "b alone"  # node b's outage publish crossed the other way too
    a_pub.send("pub t after")
    assert a_sub.recv() == "after"
    assert b_sub.recv() == "after"
    b_pub.send("pub t after from b")
    assert a_sub.recv() == "after from b"
    assert b_sub.recv() == "after from b"
    for node in (a, b):
        assert bus_counter(node, "reconnects") >= 1
        assert bus_counter(node, "missed") == 0
        assert bus_counter(node, "dropped") == 0
    assert bus_counter(a, "buffered") == 0


def test_a_full_outage_buffer_refuses_the_publisher_and_delivers_nothing(
    start_node: Callable[..., ServerProcess],
    make_client: Callable[..., websocket.WebSocket],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a, b = start_node(max_buffered=3), start_node()
    a_pub, a_sub = make_client(a), make_client(a, topics="t")
    b_sub = make_client(b, topics="t")
    a_pub.send("pub t before")
    assert b_sub.recv() == a_sub.recv() == "before"
    redis_server.kill()
    wait_until(lambda: bus_counter(a, "disconnects") >= 1, "node a to notice the outage")
    wait_until(lambda: bus_counter(b, "disconnects") >= 1, "node b to notice the outage")
    for n in range(3):
        a_pub.send(f"pub t kept {n}")
        assert a_sub.recv() == f"kept {n}"
    a_pub.send("pub t one too many")
    assert a_pub.recv() == "refused"  # the publisher is told: no silent loss
    a_pub.send("all one too many as well")
    assert a_pub.recv() == "refused"
    assert bus_counter(a, "refused") == 2

    redis_server.start()
    assert [b_sub.recv() for _ in range(3)] == [f"kept {n}" for n in range(3)]
    a_pub.send("pub t fence")
    assert b_sub.recv() == "fence"
    assert a_sub.recv() == "fence"  # a refused publish was not delivered locally either


def test_an_outage_buffer_waits_for_the_other_nodes_even_without_earlier_traffic(
    start_node: Callable[..., ServerProcess],
    make_client: Callable[..., websocket.WebSocket],
    redis_server: RedisServer,  # noqa: F811
) -> None:
    a = start_node()
    b = start_node(backoff_base=3.0)  # resubscribes 1.5-3 s after it lost Redis
    a_pub, b_sub = make_client(a), make_client(b, topics="t")
    # node a published nothing, but its idle link polls the channel: it has seen node b
    wait_until(lambda: bus_counter(a, "peers") >= 2, "node a to see node b subscribed")
    redis_server.kill()
    wait_until(lambda: bus_counter(b, "disconnects") >= 1, "node b to notice the outage")
    a_pub.send("pub t during the outage")
    redis_server.start()
    assert b_sub.recv() == "during the outage"  # within the default flush grace (6 s)
