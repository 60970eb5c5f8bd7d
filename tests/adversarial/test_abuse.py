"""Abuse by numbers: thousands of silent connections, clients that never read during a
broadcast, everyone sending at once, a connection storm. Each keeps a control client served
and the server's RSS bounded; counts and waits are bounded so the file runs in well under a
minute on two cores.

Clients bind to 127.0.x.2-9 (crowd.SOURCES), so thousands of them never run out of
ephemeral ports on one source address.
"""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from tests.adversarial.adversary import (
    WAIT,
    Control,
    Guarded,
    MiB,
    ServerFrames,
    connect,
    frame,
    guarded_gateway,
    http_answer,
    server_stats,
    start_gateway,
    upgrade_head,
    wait_for,
)
from tests.adversarial.crowd import SOURCES, Crowd, PeakRss, statuses
from tests.support.servers import ServerProcess

HANDSHAKE_TIMEOUT = 2.0
ABUSE_LIMITS: dict[str, object] = {
    "handshake_timeout": HANDSHAKE_TIMEOUT,
    "close_timeout": 10.0,  # the slow client reads its 1008 only after the broadcast
    "write_limit": 64 * 1024,
}
SILENT = 2000
BURST = 19_000  # issue 3: 19,000 clients each sending 1 KiB at the same moment
STORM = 19_000  # issue 7: 19,000 connections arriving at once
BURST_RSS_BOUND = 16 * MiB  # issue 3: peak growth of a 1 KiB-per-client burst
SILENT_RSS_BOUND = 4 * MiB  # 2,000 handshakes that sent nothing: slots only, no buffers
STORM_RSS_BOUND = 16 * MiB  # 19,000 upgrades at once: slots, pool, queued 101s


@pytest.fixture(scope="module")
def abused() -> object:
    with guarded_gateway(ABUSE_LIMITS) as rig:
        yield rig


def stat(server: ServerProcess, name: str) -> int:
    value = server_stats(server)[name]
    assert isinstance(value, int)
    return value


def test_thousands_of_silent_connections_get_408_and_cost_no_buffers(abused: Guarded) -> None:
    before = abused.rss()
    with Crowd(abused.server, SILENT, sources=SOURCES[0]) as crowd:
        wait_for(lambda: stat(abused.server, "handshakes") >= SILENT, what="all accepted")
        held = abused.rss()
        abused.control.echo_ok()  # served while the silent ones are held
        answers = crowd.read_all(None)  # each ends: an answer, then EOF
    assert statuses(answers.values()) == {408: SILENT}
    print(f"silent: {SILENT} held, RSS growth {(held - before) / MiB:.2f} MiB")
    assert held - before <= SILENT_RSS_BOUND, f"{(held - before) / MiB:.2f} MiB while held"
    wait_for(lambda: stat(abused.server, "handshakes") <= 1, what="handshakes back to none")
    abused.still_serving()


def test_every_client_sending_1_kib_at_once_gets_its_echo(abused: Guarded) -> None:
    # each head goes out as soon as its connect completes: the handshake deadline (2 s
    # here) counts from accept, and 19,000 connects take longer than that
    head = upgrade_head(abused.server)
    with Crowd(abused.server, BURST, sources=SOURCES[1], hello=head) as crowd:
        crowd.upgrade()
        reopened = crowd.reopened
        messages = {s: os.urandom(1020) + i.to_bytes(4, "big") for i, s in enumerate(crowd.socks)}
        echo_len = len(frame(2, b"x" * 1024, mask=None))
        before = abused.rss()
        with PeakRss(abused.server.pid) as peak:
            for sock, message in messages.items():
                sock.send(frame(2, message))
            echoes = crowd.read_all(echo_len)
        for sock, message in messages.items():
            assert echoes[sock] == frame(2, message, mask=None)
    growth = peak.peak - before
    print(
        f"burst: {BURST} x 1 KiB, peak RSS growth {growth / MiB:.2f} MiB "
        f"({reopened} connections reset by the kernel during the connects, reopened)"
    )
    assert growth <= BURST_RSS_BOUND, f"peak RSS growth {growth / MiB:.2f} MiB"
    wait_for(lambda: stat(abused.server, "connections") == 1, what="the crowd's closes")
    abused.still_serving()


def test_connection_storm_keeps_the_control_client_served(abused: Guarded) -> None:
    echoes: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()
    control = Control(abused.server)

    def keep_echoing() -> None:
        try:
            while not stop.is_set():
                control.echo_ok()
                echoes.append(1)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    thread = threading.Thread(target=keep_echoing, daemon=True)
    thread.start()
    try:
        head = upgrade_head(abused.server)
        with PeakRss(abused.server.pid) as peak:
            before = peak.peak
            with Crowd(abused.server, STORM, sources=SOURCES[2], hello=head) as crowd:
                crowd.upgrade()
                assert stat(abused.server, "connections") == STORM + 2
                during = len(echoes)
                reopened = crowd.reopened
    finally:
        stop.set()
        thread.join(WAIT)
        control.close()
    assert not errors, f"the control client failed during the storm: {errors[0]!r}"
    assert during > 0
    print(
        f"storm: {STORM} upgrades, control echoed {during} times, peak RSS growth "
        f"{(peak.peak - before) / MiB:.2f} MiB ({reopened} reset by the kernel, reopened)"
    )
    assert peak.peak - before <= STORM_RSS_BOUND
    wait_for(lambda: stat(abused.server, "connections") == 1, what="the storm's closes")
    abused.still_serving()


def post_broadcast(server: ServerProcess, body: bytes, policy: str) -> None:
    """post_broadcast asks the gateway (POST /broadcast) to send body to every client."""
    with connect(server) as sock:
        sock.sendall(
            b"POST /broadcast?policy=%s HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (policy.encode(), len(body))
            + body
        )
        status, _, _ = http_answer(sock)
    assert status == 200


def broadcast_index(frames: ServerFrames) -> int | None:
    """broadcast_index reads one broadcast frame and returns its number; None at the end
    of the connection (a close frame here is an error)."""
    got = frames.next(time.monotonic() + WAIT)
    if got is None:
        return None
    opcode, fin, payload = got
    assert (opcode, fin, len(payload)) == (2, True, BROADCAST_SIZE), (opcode, payload[:8])
    return int.from_bytes(payload[:4], "big")


BROADCASTS = 96
BROADCAST_SIZE = 32 * 1024
WRITE_LIMIT = int(ABUSE_LIMITS["write_limit"])  # type: ignore[call-overload]


@pytest.mark.parametrize("policy", ["drop", "close"])
def test_a_client_that_never_reads_does_not_hold_back_a_broadcast(policy: str) -> None:
    """Fifty readers get every one of 96 broadcasts of 32 KiB; the client that never reads
    (a 4 KiB receive buffer) is skipped ("drop") or closed with 1008 ("close") once more
    than write_limit (64 KiB) waits for it; the queued output and RSS stay bounded."""
    server = start_gateway(ABUSE_LIMITS)
    frames = [
        frame(2, i.to_bytes(4, "big") * (BROADCAST_SIZE // 4), mask=None) for i in range(BROADCASTS)
    ]
    try:
        with (
            Crowd(server, 50, sources=SOURCES[3]) as readers,
            Crowd(server, 1, sources=SOURCES[3], rcvbuf=4096) as lazy,
        ):
            readers.upgrade()
            lazy.upgrade()
            received: dict[socket.socket, bytes] = {}
            reading = threading.Thread(
                target=lambda: received.update(readers.read_all(sum(map(len, frames)))),
                daemon=True,
            )
            reading.start()
            pending_peak = 0
            with PeakRss(server.pid) as peak:
                before = peak.peak
                for i in range(BROADCASTS):
                    post_broadcast(server, frames[i][4:], policy)
                    pending_peak = max(pending_peak, stat(server, "pending_write_bytes"))
                reading.join(3 * WAIT)
            assert not reading.is_alive(), "the readers did not get every broadcast"
            assert all(received[sock] == b"".join(frames) for sock in readers.socks)
            stats = server_stats(server)
            dropped, closes = stats["dropped"], stats["closes"]
            assert isinstance(dropped, dict) and isinstance(closes, dict)
            print(
                f"broadcast {policy}: pending output peak {pending_peak / 1024:.0f} KiB, "
                f"peak RSS growth {(peak.peak - before) / MiB:.2f} MiB, dropped {dropped}"
            )
            # what may wait: write_limit and one frame for the slow client, and whatever
            # the readers had not read yet when it was sampled
            assert pending_peak <= WRITE_LIMIT + 51 * len(frames[0])
            assert peak.peak - before <= 16 * MiB
            lazy.socks[0].setblocking(True)
            slow = ServerFrames(lazy.socks[0])
            if policy == "drop":
                assert dropped["write_limit"] > 0 and dropped["closed"] == 0
                assert stat(server, "connections") == 51
                assert 0 < stat(server, "pending_write_bytes") <= WRITE_LIMIT + len(frames[0])
                # reading at last, it gets the broadcasts that were not dropped, in order
                got = [broadcast_index(slow) for _ in range(BROADCASTS - dropped["write_limit"])]
                assert got == sorted(got) and len(set(got)) == len(got)
            else:
                assert dropped["closed"] == 1 and dropped["write_limit"] == 0
                # what it had not begun to receive was discarded, so reading at last it
                # gets a prefix of the broadcasts, in order, then the close frame 1008
                got = []
                while True:
                    item = slow.next(time.monotonic() + WAIT)
                    assert item is not None, "the connection ended without a close frame"
                    opcode, fin, payload = item
                    if opcode == 8:
                        assert payload[:2] == (1008).to_bytes(2, "big")
                        break
                    assert (opcode, fin, len(payload)) == (2, True, BROADCAST_SIZE)
                    got.append(int.from_bytes(payload[:4], "big"))
                assert got == list(range(len(got))) and len(got) < BROADCASTS
                lazy.socks[0].close()  # a client ends the TCP connection after the close frame
                wait_for(lambda: stat(server, "connections") == 50, what="the slow one closed")
                assert server_stats(server)["closes"]["1008"] == 1  # type: ignore[index]
    finally:
        server.stop()
