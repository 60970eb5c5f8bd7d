"""An overloaded gateway never closes healthy connections (issue 17).

Every test reads the outcome as clients see it: a close frame, the end of the TCP
connection, an HTTP status line, the time a ping arrived, or the gateway's /metrics.

The gateway is tests/adversarial/gateway_server.py, a child process: an echo gateway whose
loop thread sleeps on ``POST /stall?seconds=S`` (a slow synchronous hook). The crowds of
idle clients live in one more child process (support/ping_crowd.py, driven by
support/overload.py): it holds thousands of raw WebSocket connections, answers every ping
with a pong exactly 50 ms after it arrived and records, per connection, ping arrival times,
close frames and EOF. It fires the stall (or SIGSTOP) itself, the moment a ping round has
reached nearly all of its connections (or a quarter of them within 25 ms, a round the server
wrote in one burst), so the pongs are still on their way when the loop stops polling.

Every wait is bounded; servers and crowds are ended by PID at teardown (a stopped server is
continued first).
"""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import pytest

from tests.adversarial.adversary import start_gateway, upgrade_head
from tests.support.overload import (
    CrowdProcess,
    HeadClients,
    gauge,
    lag_figures,
    send_stall,
    stall_answer,
    status_counts,
    stop_server,
    summary,
    tcp_state,
    through_ping_round,
)
from tests.support.servers import ServerProcess
from tests.support.waiting import wait_until

CROWD = 2000
HEARTBEAT = {"ping_interval": 2.0, "ping_timeout": 3.0}
STALL = 6.0
TCP_ESTABLISHED = 1

MakeGateway = Callable[[Mapping[str, object]], ServerProcess]
MakeCrowd = Callable[..., CrowdProcess]


@pytest.fixture
def gateway() -> Iterator[MakeGateway]:
    """gateway(config) starts the test gateway with Config(**config); every one started
    is continued (should it be stopped) and ended by PID at teardown."""
    started: list[ServerProcess] = []

    def start(config: Mapping[str, object]) -> ServerProcess:
        server = start_gateway(dict(config))
        started.append(server)
        return server

    yield start
    for server in started:
        stop_server(server)


@pytest.fixture
def crowd() -> Iterator[MakeCrowd]:
    """crowd(server, clients) starts a ping crowd process (its own lifetime bounds it); every
    one started is asked to quit and ended by PID at teardown."""
    started: list[CrowdProcess] = []

    def start(server: ServerProcess, clients: int, **kwargs: Any) -> CrowdProcess:
        process = CrowdProcess(server, clients, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        process.close()


def all_upgraded(process: CrowdProcess, clients: int) -> dict[str, Any]:
    """all_upgraded waits for the crowd's upgrades and asserts every one got its 101."""
    upgraded = process.upgraded()
    assert upgraded["open"] == clients, f"only {upgraded['open']} of {clients} upgraded: {upgraded}"
    return upgraded


def assert_all_open(report: dict[str, Any], server: ServerProcess) -> None:
    """assert_all_open: the crowd saw no close frame and no EOF, and the server agrees."""
    seen = (
        f"{summary(report)}; expected {CROWD} of {CROWD} open (the overload began"
        f" {report['began_after_first_ping'] * 1000:.0f} ms after the round's first ping;"
        f" {report['pongs_before_overload']} pongs of it were sent before)"
    )
    assert report["open"] == CROWD, seen
    assert report["close_frames"] == {} and report["eof"] == 0, seen
    counted = gauge(server, "connections")
    assert counted == CROWD, f"the server counts {counted:.0f} connections, not {CROWD}"


def test_busy_loop_keeps_healthy_connections(gateway: MakeGateway, crowd: MakeCrowd) -> None:
    """Case 1: a loop kept busy for 6 s by a slow synchronous hook, right after a ping round
    reached 2,000 idle clients that each answer 50 ms later, closes none of them: their pongs
    arrived (they sat in the kernel), so the deadline is judged on them, not on the loop's
    own pause. Config(ping_interval=2, ping_timeout=3); the clients are made active together
    first, so one round reaches them all (through_ping_round). Asserted, ping_interval +
    ping_timeout + 2 s after the stall: no close frame, no EOF, and the server's connections
    gauge is 2,000."""
    server = gateway(HEARTBEAT)
    process = crowd(server, CROWD)
    all_upgraded(process, CROWD)
    report = through_ping_round(process, server, "stall", **HEARTBEAT, seconds=STALL)
    assert_all_open(report, server)


def test_paused_process_keeps_healthy_connections(gateway: MakeGateway, crowd: MakeCrowd) -> None:
    """Case 2: the gateway process stopped by SIGSTOP for 6 s right after a ping round reached
    2,000 idle clients (each answering 50 ms later), then continued, closes none of them: the
    server's own pause does not count against clients. Same assertions as case 1."""
    server = gateway(HEARTBEAT)
    process = crowd(server, CROWD)
    all_upgraded(process, CROWD)
    report = through_ping_round(process, server, "sigstop", **HEARTBEAT, seconds=STALL)
    assert_all_open(report, server)


def heads_during_stall(
    server: ServerProcess, accepted_before: int, connect_during: int
) -> tuple[dict[str, int], dict[str, int]]:
    """heads_during_stall stalls the loop 4 s with two groups of clients that both send their
    whole upgrade head during the stall, about 0.5 s into it (well within the 2 s handshake
    deadline from their connect): ``accepted_before`` connected just before it (the loop has
    accepted them: their handshake deadline runs), ``connect_during`` connect during it (they
    wait in the listen backlog). Returns the status counts of each group."""
    early = HeadClients(server, accepted_before)
    late = HeadClients(server, connect_during)
    try:
        early.connect()
        connected = time.monotonic()
        wait_until(  # /metrics counts its own request as a handshake, hence the + 1
            lambda: gauge(server, "handshakes") >= accepted_before + 1,
            f"the server to accept {accepted_before} connections",
            10,
            interval=0.05,
        )
        stall = send_stall(server, 4.0)
        time.sleep(0.5)  # the loop reads the stall within milliseconds: now it sleeps
        late.connect()
        early.send_heads()
        late.send_heads()
        sent = time.monotonic() - connected
        assert sent < 1.5, f"setup too slow: heads sent {sent:.1f} s after connecting"
        status, slept = stall_answer(stall, 15)
        assert status == 200 and slept >= 3.9, f"the stall: {status}, {slept} s"
        return status_counts(early.answers(10)), status_counts(late.answers(10))
    finally:
        early.close()
        late.close()


def test_head_sent_during_stall_gets_101(gateway: MakeGateway) -> None:
    """Case 3: a whole upgrade head that arrived while the loop was busy (4 s) gets its 101,
    not 408, with handshake_timeout=2: once from a client the loop accepted just before the
    stall and once from a client that connected during it."""
    server = gateway({"handshake_timeout": 2.0})
    early, late = heads_during_stall(server, 1, 1)
    assert early == {"101": 1}, f"accepted before the stall: {early}"
    assert late == {"101": 1}, f"connected during the stall: {late}"


def test_head_storm_during_stall_gets_101(gateway: MakeGateway) -> None:
    """Case 3, storm: 500 clients send whole upgrade heads during a 4 s stall (400 accepted
    just before it, more than one epoll batch, and 100 that connect during it): all get 101,
    none 408 (handshake_timeout=2)."""
    server = gateway({"handshake_timeout": 2.0})
    early, late = heads_during_stall(server, 400, 100)
    assert early == {"101": 400}, f"400 accepted before the stall: {early}"
    assert late == {"101": 100}, f"100 connected during the stall: {late}"


def test_dead_client_is_still_closed(gateway: MakeGateway, crowd: MakeCrowd) -> None:
    """Case 4 (passes on 0.1.0; it guards the fix): with ping_interval=1, ping_timeout=1 a
    client that upgrades and then never reads nor answers a ping is closed within
    ping_interval + ping_timeout + 2.5 s of its upgrade: its TCP connection ends (the kernel
    reports CLOSE_WAIT, read without reading the socket) and the server's connections gauge
    drops by one. Ten healthy clients (answering after 50 ms) stay open meanwhile."""
    config = {"ping_interval": 1.0, "ping_timeout": 1.0}
    server = gateway(config)
    healthy = crowd(server, 10)
    all_upgraded(healthy, 10)
    dead = socket.create_connection((server.host, server.port), timeout=10)
    with dead:
        dead.sendall(upgrade_head(server))
        head = b""
        while not head.endswith(b"\r\n\r\n"):  # one byte at a time: nothing past the 101
            byte = dead.recv(1)
            assert byte, f"the server closed during the upgrade: {head!r}"
            head += byte
        upgraded = time.monotonic()
        assert head.startswith(b"HTTP/1.1 101 "), head
        bound = config["ping_interval"] + config["ping_timeout"] + 2.5
        wait_until(
            lambda: tcp_state(dead) != TCP_ESTABLISHED,
            f"the server to close the silent client within {bound} s",
            bound - (time.monotonic() - upgraded),
            interval=0.05,
        )
        took = time.monotonic() - upgraded
    assert gauge(server, "connections") == 10, "the server still counts the silent client"
    report = healthy.report()
    assert report["open"] == 10, f"healthy clients: {summary(report)}"
    assert took <= bound


def percentile(values: list[float], share: float) -> float:
    """percentile is the nearest-rank percentile of values (share in 0..1)."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


def busiest_window(times: list[float], width: float) -> int:
    """busiest_window is the most of times that fall in one window [t, t + width)."""
    ordered = sorted(times)
    most, start = 0, 0
    for end, t in enumerate(ordered):
        while t - ordered[start] >= width:
            start += 1
        most = max(most, end - start + 1)
    return most


def test_heartbeat_pings_are_spread(gateway: MakeGateway, crowd: MakeCrowd) -> None:
    """Case 5: heartbeat pings are spread over the interval with jitter, not sent in
    synchronised rounds. 1,000 clients connect at an even pace over 1 s (ping_interval=4,
    ping_timeout=10); each client's first ping is timed from its own upgrade: the 5th to
    95th percentile span of those delays is at least 40 % of the interval, and no 200 ms
    window of arrival times holds more than 25 % of the first pings."""
    clients, interval = 1000, 4.0
    server = gateway({"ping_interval": interval, "ping_timeout": 10.0})
    process = crowd(server, clients, spread=1.0)
    upgraded = all_upgraded(process, clients)
    assert upgraded["last"] - upgraded["first"] <= 1.5, f"upgrades took too long: {upgraded}"
    process.send("arm", fraction=1.0, timeout=2.5 * interval, action="none")
    process.expect("armed", timeout=10)
    process.expect("fired", "not_fired", timeout=2.5 * interval + 5)
    conns = process.report()["conns"]
    firsts = [c["pings"][0] for c in conns if c["up"] is not None and c["pings"]]
    delays = [c["pings"][0] - c["up"] for c in conns if c["up"] is not None and c["pings"]]
    assert len(firsts) >= 0.99 * clients, f"only {len(firsts)} of {clients} got a ping"
    span = percentile(delays, 0.95) - percentile(delays, 0.05)
    busiest = busiest_window(firsts, 0.2)
    assert span >= 0.4 * interval, (
        f"first pings come {percentile(delays, 0.05):.2f} .. {percentile(delays, 0.95):.2f} s"
        f" after the upgrade (5th .. 95th percentile): a span of {span:.2f} s, under 40 % of"
        f" the {interval:.0f} s interval; the busiest 200 ms holds {busiest} of {len(firsts)}"
    )
    assert busiest <= 0.25 * len(firsts), (
        f"{busiest} of {len(firsts)} first pings arrive within one 200 ms window"
    )


def test_loop_lag_metric(gateway: MakeGateway) -> None:
    """Case 6: /metrics exports the loop's lag: after a 2 s stall of the loop (slow hook),
    within 5 s GET /metrics shows lowmemws_loop_lag_seconds >= 1.5 (the longest time without
    polling in about the last 10 s) and lowmemws_loop_lag_max_seconds >= 1.5 (since start)."""
    server = gateway({})
    status, slept = stall_answer(send_stall(server, 2.0), 10)
    assert status == 200 and slept >= 1.9, f"the stall: {status}, {slept} s"
    deadline = time.monotonic() + 5
    lag, lag_max = lag_figures(server)
    while not (lag is not None and lag_max is not None and lag >= 1.5 and lag_max >= 1.5):
        if time.monotonic() > deadline:
            break
        time.sleep(0.2)
        lag, lag_max = lag_figures(server)
    assert lag is not None, "lowmemws_loop_lag_seconds is missing from /metrics"
    assert lag_max is not None, "lowmemws_loop_lag_max_seconds is missing from /metrics"
    assert lag >= 1.5, f"lowmemws_loop_lag_seconds is {lag} after a 2 s stall"
    assert lag_max >= 1.5, f"lowmemws_loop_lag_max_seconds is {lag_max} after a 2 s stall"
