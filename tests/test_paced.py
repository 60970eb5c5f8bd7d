"""Paced fan-out (issue 18) in one process: ``spread=`` and ``rate=`` on publish, broadcast and
send_to_users; joins and leaves during a paced send; overlapping sends; cancel; a gateway
stopping during one.

Timing is asserted only where pacing guarantees it whatever the machine's load: a paced
send never finishes sooner than its pace allows (a lower bound), and generous upper bounds
only keep a broken send from hanging. Worker processes and two nodes through Redis are in
test_paced_nodes.py.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator

import pytest

from lowmemws import Accept, Config, Connection, Gateway, Request
from tests.support import waiting
from tests.support.arrivals import Recorder, arrival_times, count

DEADLINE = 30.0  # bounds every wait; not a performance figure
wait_until = waiting.waiter(DEADLINE, interval=0.02)


@pytest.fixture
def gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    """gateway subscribes each client to the topics of its query string, tags it with its
    ``user``, and greets it with the server-side fd of its connection ("fd N")."""
    gw = make_gateway(Config(ping_interval=0))

    @gw.on_connect
    def decide(request: Request) -> Accept:
        topics = tuple(t for t in request.params.get("topics", "").split(",") if t)
        return Accept(user=int(request.params.get("user", "0")), topics=topics)

    @gw.on_open
    def greet(conn: Connection) -> None:
        conn.send(f"fd {conn.fd}")

    gw.start()
    return gw


@pytest.fixture
def clients() -> Iterator[list[Recorder]]:
    made: list[Recorder] = []
    yield made
    for client in made:
        client.close()


def connect(gw: Gateway, made: list[Recorder], n: int, query: str = "") -> list[Recorder]:
    """connect opens n recording clients and waits for their greetings."""
    new = [Recorder(f"ws://127.0.0.1:{gw.port}/?{query}") for _ in range(n)]
    made.extend(new)
    wait_until(lambda: all(c.messages() for c in new), "the greetings")
    return new


def fd_of(client: Recorder) -> int:
    return int(client.messages()[0].split()[1])


def stats(gw: Gateway) -> dict[str, int]:
    return {k: v for k, v in gw.stats().items() if k.startswith("paced")}


def finish_with_fence(gw: Gateway, made: list[Recorder]) -> None:
    """finish_with_fence waits for the paced sends to end, then broadcasts "fence" unpaced:
    once a client has it, nothing of an earlier paced send is still on its way to it."""
    wait_until(lambda: stats(gw)["paced_in_flight"] == 0, "the paced sends to end")
    gw.broadcast("fence")
    wait_until(lambda: all(c.messages("fence") for c in made), "the fence")


def test_a_spread_broadcast_reaches_everyone_once_over_the_spread(
    gateway: Gateway, clients: list[Recorder]
) -> None:
    connect(gateway, clients, 30)
    assert gateway.broadcast("news", spread=1.5) == 30  # the call returns at once
    assert stats(gateway)["paced_in_flight"] == 1
    finish_with_fence(gateway, clients)

    assert [len(c.messages("news")) for c in clients] == [1] * 30
    times = arrival_times(clients, "news")
    assert times[-1] - times[0] >= 1.0  # 30 deliveries over 1.5 s, not one burst
    first_half = sum(t < times[0] + 0.75 for t in times)
    assert 5 <= first_half <= 25  # spread evenly: neither all early nor all late
    assert stats(gateway) | {"paced_rate": 0} == {
        "paced_in_flight": 0,
        "paced_rate": 0,
        "paced_deliveries_total": 30,
        "paced_dropped_total": 0,
        "paced_cancelled_total": 0,
    }


def test_a_rate_publish_reaches_only_the_topic_at_that_rate(
    gateway: Gateway, clients: list[Recorder]
) -> None:
    members = connect(gateway, clients, 20, "topics=sport")
    others = connect(gateway, clients, 5, "topics=weather")
    assert gateway.publish("sport", "goal", rate=10) == 20
    wait_until(lambda: stats(gateway)["paced_rate"] > 0, "the achieved rate gauge")
    assert stats(gateway)["paced_rate"] <= 12  # a cap of 10 a second (one turn's rounding)
    finish_with_fence(gateway, clients)

    assert [len(c.messages("goal")) for c in members] == [1] * 20
    assert count(others, "goal") == 0
    times = arrival_times(members, "goal")
    assert times[-1] - times[0] >= 1.5  # 20 at 10 a second: 1.9 s between first and last


def test_send_to_users_sends_one_frame_to_a_batch_of_users_paced_or_not(
    gateway: Gateway, clients: list[Recorder]
) -> None:
    by_user = {user: connect(gateway, clients, 2, f"user={user}") for user in (1, 2, 3, 4)}
    assert gateway.send_to_users([1, 3, 3], "batch") == 4  # a user listed twice gets it once
    assert gateway.send_to_users([2, 4], "paced", spread=0.5) == 4
    assert gateway.send_to_user(4, "alone", rate=100) == 2
    finish_with_fence(gateway, clients)

    got = {user: [len(c.messages("batch")) for c in cs] for user, cs in by_user.items()}
    assert got == {1: [1, 1], 2: [0, 0], 3: [1, 1], 4: [0, 0]}
    assert [count(by_user[u], "paced") for u in (1, 2, 3, 4)] == [0, 2, 0, 2]
    assert [count(by_user[u], "alone") for u in (1, 2, 3, 4)] == [0, 0, 0, 2]
    assert stats(gateway)["paced_deliveries_total"] == 6  # the batch was not paced


def test_overlapping_sends_keep_their_own_pace_and_one_can_be_cancelled(
    gateway: Gateway, clients: list[Recorder]
) -> None:
    connect(gateway, clients, 30)
    gateway.broadcast("slow", spread=4.0, pace_id="promo")
    gateway.broadcast("quick", rate=30, pace_id="alert")
    wait_until(lambda: count(clients, "quick") == 30, "the quick send to finish")
    reached = count(clients, "slow")
    assert reached < 30  # the slow one is still under way, at its own pace
    not_reached = gateway.cancel_paced("promo")
    finish_with_fence(gateway, clients)

    assert count(clients, "slow") + not_reached == 30  # nobody got it after the cancel
    assert not_reached > 0
    assert all(len(c.messages("slow")) <= 1 for c in clients)
    assert stats(gateway)["paced_cancelled_total"] == not_reached
    assert gateway.cancel_paced("promo") == 0  # gone already; an unknown id is no error


def test_joins_and_leaves_during_a_paced_send(gateway: Gateway, clients: list[Recorder]) -> None:
    originals = connect(gateway, clients, 30, "topics=news")
    end = max(fd_of(c) for c in originals)  # the highest fd the server had used
    gateway.publish("news", "paced", spread=3.0)
    wait_until(lambda: count(originals, "paced") >= 5, "the first deliveries")
    leavers = [c for c in originals if not c.messages("paced")][-10:]
    for client in leavers:
        client.close()
    joiners = connect(gateway, clients, 15, "topics=news")
    stayed = [c for c in originals if c not in leavers]
    finish_with_fence(gateway, stayed + joiners)

    assert [len(c.messages("paced")) for c in stayed] == [1] * 20  # every member stayed
    assert all(len(c.messages("paced")) <= 1 for c in joiners)  # at most once
    late = [c for c in joiners if fd_of(c) > end]
    assert late and count(late, "paced") == 0  # past the end fixed at the start: never
    reached = count(stayed + joiners + leavers, "paced")
    assert stats(gateway)["paced_deliveries_total"] == reached


def test_a_gateway_stopping_during_a_paced_send_drops_the_rest_and_counts_it(
    gateway: Gateway, clients: list[Recorder]
) -> None:
    connect(gateway, clients, 30)
    gateway.broadcast("paced", spread=5.0)
    wait_until(lambda: count(clients, "paced") >= 3, "the first deliveries")
    gateway.stop()
    assert all(c.finished() for c in clients)

    assert {c.close_code for c in clients} == {1001}
    reached = count(clients, "paced")
    assert reached < 30  # the remainder was not sent in a burst before the close
    assert stats(gateway)["paced_dropped_total"] == 30 - reached
    assert stats(gateway)["paced_in_flight"] == 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {"spread": 1.0, "rate": 5.0},
        {"spread": 0},
        {"rate": -1},
        {"spread": float("nan")},
        {"spread": 1e7},
        {"pace_id": "no pace"},
    ],
)
def test_a_bad_pacing_is_refused(gateway: Gateway, kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        gateway.broadcast("x", **kwargs)  # type: ignore[arg-type]


def test_asyncio_callers_pace_too(gateway: Gateway, clients: list[Recorder]) -> None:
    connect(gateway, clients, 4, "user=9&topics=t")

    async def publish() -> list[int]:
        return [
            await gateway.apublish("t", "a", spread=0.3),
            await gateway.asend_to_user(9, "b", rate=50),
            await gateway.abroadcast("c", spread=0.3, pace_id="x"),
        ]

    assert asyncio.run(publish()) == [4, 4, 4]
    finish_with_fence(gateway, clients)
    assert [count(clients, text) for text in "abc"] == [4, 4, 4]


def test_an_enormous_rate_is_no_rate_at_all(gateway: Gateway, clients: list[Recorder]) -> None:
    connect(gateway, clients, 3)
    assert gateway.broadcast("now", rate=1e300) == 3
    finish_with_fence(gateway, clients)
    assert count(clients, "now") == 3
