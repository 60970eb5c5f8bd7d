"""attacks: what the attacks of issue 16 do to a gateway, in one table.

Each attack runs against its own gateway (tests/adversarial/gateway_server.py, started as a
child on a free loopback port) with the adversarial tests' helpers:

- header-only pinning: six WebSockets each send a frame head declaring 1 MiB and 10 bytes
  (default Config): the control client's worst echo over ~3 s, and the status line a new
  client's upgrade gets; the same with 100 plain-HTTP heads declaring Content-Length 65536;
- reset storm: 300 WebSockets, the header-only pinning, then the 300 reset (SO_LINGER 0):
  the server's CPU (% of one core) and RSS growth over 30 s, then a new client's upgrade
  and echo (on 0.1.0 the heartbeat drops the silent attackers ~40 s after their upgrade:
  ping_interval 30 s plus ping_timeout 10 s, which ends the pinning);
- broadcast: write_budget 1 MiB, 200 WebSockets that never read, a 1 MB broadcast:
  pending_write_bytes right after it, and the messages counted as dropped;
- fd headroom: RLIMIT_NOFILE 256, 400 clients sending "BAD" and a blank line and keeping
  their sockets open: the most fds the server had open, and how many clients got a 400.

Every wait is bounded; a server that stalls gets that as its figure ("no echo within
20 s"). The machine is shared: the attacks run one after the other, never in parallel.

    python benchmarks/attacks.py [--json PATH] [--storm-seconds 30]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import struct
import sys
import time
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.adversarial.adversary import (  # noqa: E402
    SERVER_SCRIPT,
    MiB,
    connect,
    rss_bytes,
    start_gateway,
    upgrade_head,
)
from tests.adversarial.crowd import SOURCES, Crowd  # noqa: E402
from tests.adversarial.test_defects import (  # noqa: E402
    PeakFds,
    cpu_seconds,
    header_only_pinning,
    stats_now,
    total,
    upgrade_status,
)
from tests.support.servers import ServerProcess, start_cli_server  # noqa: E402
from tests.support.wsproto_client import WsprotoClient, WsprotoClientError  # noqa: E402

STALL = 20.0  # how long one echo or one answer is waited for before it counts as stalled


def echo_figure(client: WsprotoClient, seconds: float = 3.0) -> str:
    """echo_figure echoes on client for seconds: the worst round trip, or the stall."""
    worst = 0.0
    count = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        token = f"attack probe {count}"
        started = time.monotonic()
        try:
            client.send_message(token)
            while client.receive_message(max(started + STALL - time.monotonic(), 0.001)) != token:
                pass
        except (WsprotoClientError, OSError):
            return f"no echo within {STALL:.0f} s (after {count} echoes)"
        worst = max(worst, time.monotonic() - started)
        count += 1
        time.sleep(0.05)
    return f"max {worst * 1000:.1f} ms over {count} echoes"


def control(server: ServerProcess) -> WsprotoClient:
    client = WsprotoClient(server.host, server.port, timeout=STALL)
    client.send_message("warm-up")
    client.receive_message()
    return client


def new_client_echo(server: ServerProcess) -> str:
    """new_client_echo connects a new client and measures its echo (or says what failed)."""
    started = time.monotonic()
    status = upgrade_status(server, STALL)
    waited = time.monotonic() - started
    if not status.startswith("HTTP/1.1 101 "):
        return f"upgrade answered {status!r} after {waited:.1f} s"
    try:
        client = control(server)
    except (WsprotoClientError, OSError) as exc:
        return f"no upgrade within {STALL:.0f} s ({str(exc)[:60]})"
    try:
        return f"101 after {waited:.1f} s, echo {echo_figure(client, 1.0)}"
    finally:
        client.sock.close()


def guarded(figures: dict[str, Any], key: str, run: Any) -> None:
    """guarded runs one attack; an exception becomes its figure instead of the table's end."""
    try:
        run()
    except Exception as exc:  # recorded as the figure
        figures[key] = f"error: {type(exc).__name__}: {exc}"[:160]


def pinning(figures: dict[str, Any]) -> None:
    server = start_gateway({})
    try:
        client = control(server)
        with header_only_pinning(server):
            figures["pin_heads_echo"] = echo_figure(client)
            figures["pin_heads_new_client"] = upgrade_status(server, STALL)
        client.sock.close()
    finally:
        server.stop()
    server = start_gateway({})
    try:
        client = control(server)
        head = b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 65536\r\n\r\n"
        with Crowd(server, 100, sources=SOURCES[1], hello=head):
            time.sleep(0.3)
            figures["pin_body_echo"] = echo_figure(client)
            figures["pin_body_new_client"] = upgrade_status(server, STALL)
        client.sock.close()
    finally:
        server.stop()


def storm(figures: dict[str, Any], seconds: float) -> None:
    """storm: 300 WebSockets open, the header-only pinning, then the 300 reset at once
    (open connections are not swept by the handshake deadline: the storm lasts)."""
    server = start_gateway({})
    try:
        resetting = Crowd(server, 300, sources=SOURCES[2], hello=upgrade_head(server))
        resetting.upgrade()
        with header_only_pinning(server):
            rss, cpu = rss_bytes(server.pid), cpu_seconds(server.pid)
            started = time.monotonic()
            for sock in resetting.socks:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            resetting.close()
            peak, timeline = rss, []
            window_cpu, window_at = cpu, started
            while time.monotonic() - started < seconds and server.proc.poll() is None:
                time.sleep(0.5)
                peak = max(peak, rss_bytes(server.pid))
                if time.monotonic() - window_at >= 5.0:  # CPU share per 5 s window
                    now_cpu, now = cpu_seconds(server.pid), time.monotonic()
                    timeline.append(f"{100 * (now_cpu - window_cpu) / (now - window_at):.0f}")
                    window_cpu, window_at = now_cpu, now
            figures["storm_cpu_timeline"] = " ".join(timeline)
            figures["storm_loadavg"] = " ".join(open("/proc/loadavg").read().split()[:3])
            share = (cpu_seconds(server.pid) - cpu) / (time.monotonic() - started)
            figures["storm_cpu_percent"] = round(100 * share, 1)
            figures["storm_rss_growth_mib"] = round((rss_bytes(server.pid) - rss) / MiB, 1)
            figures["storm_rss_peak_growth_mib"] = round((peak - rss) / MiB, 1)
            figures["storm_echo_after"] = new_client_echo(server)
    finally:
        server.stop()


def broadcast(figures: dict[str, Any]) -> None:
    server = start_gateway({"write_budget": MiB, "max_http_body": 2 * MiB})
    try:
        with Crowd(server, 200, sources=SOURCES[0], rcvbuf=4096, maxseg=536) as lazy:
            lazy.upgrade()
            before = stats_now(server, STALL)
            body = os.urandom(1_000_000)
            with connect(server) as sock:
                sock.settimeout(STALL)
                request = b"POST /broadcast HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                sock.sendall(request % len(body) + body)
                sock.recv(4096)
            after = stats_now(server, STALL)
            if before is None or after is None:
                figures["broadcast_pending_mib"] = f"/stats not answered within {STALL:.0f} s"
                return
            pending = after["pending_write_bytes"]
            assert isinstance(pending, int)
            figures["broadcast_pending_mib"] = round(pending / MiB, 1)
            figures["broadcast_dropped"] = total(after, "dropped") - total(before, "dropped")
            figures["broadcast_connections"] = after["connections"]
    finally:
        server.stop()


def fd_headroom(figures: dict[str, Any]) -> None:
    command = [sys.executable, str(SERVER_SCRIPT), "--config", "{}"]
    server = start_cli_server(command, ["--nofile", "256"])
    try:
        client = control(server)
        with PeakFds(server.pid) as fds:
            with Crowd(server, 400, sources=SOURCES[3], hello=b"BAD\r\n\r\n") as crowd:
                time.sleep(0.3)
                figures["fds_echo"] = echo_figure(client)
                got_400 = 0
                try:
                    answers = crowd.read_all(b"\r\n\r\n", timeout=60.0)
                    got_400 = sum(1 for a in answers.values() if a.startswith(b"HTTP/1.1 400 "))
                except AssertionError as exc:  # crowd.WireError: some never answered
                    figures["fds_unanswered"] = str(exc)
        figures["fds_max_open"] = fds.peak
        figures["fds_clients_got_400"] = got_400
        figures["fds_server_alive"] = server.proc.poll() is None
        client.sock.close()
    finally:
        server.stop()


ROWS = (
    ("pin_heads_echo", "header-only pinning (6 x 1 MiB declared): control echo"),
    ("pin_heads_new_client", "header-only pinning: a new client's upgrade"),
    ("pin_body_echo", "HTTP body pinning (100 x 64 KiB declared): control echo"),
    ("pin_body_new_client", "HTTP body pinning: a new client's upgrade"),
    ("storm_cpu_percent", "reset storm (pinning + 300 resets): server CPU, % of a core"),
    ("storm_cpu_timeline", "reset storm: server CPU % per 5 s window"),
    ("storm_loadavg", "reset storm: machine load average at its end (1, 5, 15 min)"),
    ("storm_echo_after", "reset storm: a new client's echo at its end"),
    ("storm_rss_growth_mib", "reset storm: RSS growth, MiB"),
    ("storm_rss_peak_growth_mib", "reset storm: peak RSS growth, MiB"),
    ("broadcast_pending_mib", "1 MB broadcast to 200 non-readers: pending_write_bytes, MiB"),
    ("broadcast_dropped", "1 MB broadcast: messages counted as dropped"),
    ("broadcast_connections", "1 MB broadcast: connections after it (200 = all)"),
    ("fds_max_open", "RLIMIT_NOFILE 256, 400 BAD clients: most fds open"),
    ("fds_clients_got_400", "RLIMIT_NOFILE 256: clients answered 400 (of 400)"),
    ("fds_unanswered", "RLIMIT_NOFILE 256: clients never answered"),
    ("fds_echo", "RLIMIT_NOFILE 256: control echo"),
    ("fds_server_alive", "RLIMIT_NOFILE 256: server still running"),
)


def table(figures: dict[str, Any]) -> str:
    width = max(len(label) for _, label in ROWS)
    lines = [f"{'figure':<{width}}  value", f"{'-' * width}  -----"]
    for key, label in ROWS:
        if key in figures:
            lines.append(f"{label:<{width}}  {figures[key]}")
    for key, value in figures.items():  # errors of attacks recorded under other keys
        if key not in dict(ROWS):
            lines.append(f"{key:<{width}}  {value}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON")
    parser.add_argument("--storm-seconds", type=float, default=30.0)
    args = parser.parse_args()
    figures: dict[str, Any] = {}
    guarded(figures, "pinning", lambda: pinning(figures))
    guarded(figures, "storm", lambda: storm(figures, args.storm_seconds))
    guarded(figures, "broadcast", lambda: broadcast(figures))
    guarded(figures, "fd_headroom", lambda: fd_headroom(figures))
    import lowmemws

    version = getattr(lowmemws, "__version__", "?")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"lowmemws {version}: the attacks of issue 16 ({when})")
    print(table(figures))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"version": version, **figures}, out, indent=2)
            out.write("\n")


if __name__ == "__main__":
    main()
