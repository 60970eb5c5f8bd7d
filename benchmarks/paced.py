"""paced: a broadcast to N subscribers spread over S seconds, as the clients see it (issue 18).

One lowmemws server (``servers/lowmemws_paced_server.py``: heartbeat off, no hooks but
``POST /broadcast?size=B&spread=S``), N idle connections from Python load-client processes
that count every frame by its arrival time (10 ms buckets of the machine's monotonic clock),
and three measurements of the server's CPU (its threads' runtime in ns, from
/proc/PID/task/TID/schedstat), each from the request until every client has its frame:

- the unpaced broadcast of the B-byte frame (``--rounds`` times: median);
- the same broadcast spread over S seconds (``--paced-rounds`` times: median), with the
  arrivals per second of its last round, against the target N / S per second (within 20 %);
- the server doing nothing for S seconds (its loop and sweep: the floor under any paced send);
- the machine's own price for working in steps: ``burst_cost.c`` does the same pure
  computation back to back and in steps 100 ms apart over S seconds (no socket, no system
  call); the ratio of the two is what any program pays here for the paced shape alone.

The unpaced and paced rounds alternate, so a change in the machine's load (it is shared)
weighs on both alike.

    python benchmarks/paced.py [--connections 19000] [--spread 10] [--size 256] [--json F]

``--rate R --processes N`` measures the other form instead: the same broadcast capped at R
deliveries a second over N worker processes (each paces at R / N), arrivals per second only.
"""

from __future__ import annotations

import argparse
import http.client
import math
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from typing import Any

import procstats
import report
from loadclients import LoadClients
from serverctl import Server, version

BUCKET = 0.01  # seconds per arrival bucket: well under a pacing step (100 ms)
TOLERANCE = 0.2  # the target: each second within 20 % of N / S
PACE_STEP_S = 0.1  # the step of a paced send (PACE_STEP_MS in src/lowmemws/_paced.c)
BURST_ROUNDS = 1900  # rounds of burst_cost.c's work per measurement (~60 ms of CPU here)
BURST_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "burst_cost.c")


def broadcast(srv: Server, size: int, spread: float, rate: float = 0.0) -> int:
    """broadcast asks the server for one broadcast; returns the connections it goes to."""
    conn = http.client.HTTPConnection(srv.host, srv.port, timeout=60)
    try:
        conn.request("POST", f"/broadcast?size={size}&spread={spread}&rate={rate}", body=b"")
        answer = conn.getresponse().read().decode()
    finally:
        conn.close()
    return int(answer.split()[1])


def cpu_of(srv: Server, action: Any) -> tuple[float, Any]:
    """cpu_of runs action once the server is idle; returns (server CPU seconds, result)."""
    procstats.wait_idle(srv.pid)
    before = procstats.tree_cpu_ns(srv.pid)  # worker processes too
    result = action()
    return (procstats.tree_cpu_ns(srv.pid) - before) / 1e9, result


def per_second(replies: list[dict[str, Any]], start: float, seconds: int) -> list[int]:
    """per_second sums the workers' arrival buckets into whole seconds after start; the last
    entry holds whatever came later."""
    counts = [0] * (seconds + 1)
    for reply in replies:
        for key, frames in reply["arrivals"].items():
            middle = (int(key) + 0.5) * BUCKET - start
            counts[min(seconds, max(0, int(middle)))] += frames
    return counts


def paced_round(
    srv: Server, lc: LoadClients, size: int, spread: float, rate: float = 0.0
) -> dict[str, Any]:
    """paced_round measures one paced broadcast (spread, or rate when given): its CPU and
    its arrivals per second."""
    lc.reset()
    seconds = spread or sum(lc.counts) / rate
    timeout = seconds * 3 + 60
    lc.begin(
        [{"cmd": "arrivals", "per_conn": 1, "bucket": BUCKET, "timeout": timeout}] * len(lc.procs)
    )
    time.sleep(0.5)  # every worker is counting before the first frame can arrive
    started: list[float] = []

    def send() -> list[dict[str, Any]]:
        started.append(time.monotonic())
        broadcast(srv, size, 0.0 if rate else spread, rate)
        return lc.finish()

    cpu, replies = cpu_of(srv, send)
    return {
        "cpu_s": cpu,
        "frames": sum(r["frames"] for r in replies),
        "ok": all(r["ok"] for r in replies),
        "per_second": per_second(replies, started[0], math.ceil(seconds)),
    }


def unpaced_round(srv: Server, lc: LoadClients, size: int) -> float:
    lc.reset()
    cpu, _ = cpu_of(srv, lambda: (broadcast(srv, size, 0), lc.wait_frames(1)))
    return cpu


def idle_cpu(srv: Server, seconds: float) -> float:
    cpu, _ = cpu_of(srv, lambda: time.sleep(seconds))
    return cpu


def burst_us(program: str, steps: int, sleep_ms: int, per_step: int) -> float:
    """burst_us runs burst_cost once: its CPU microseconds per round of work."""
    out = subprocess.run(
        [program, str(steps), str(sleep_ms), str(per_step)], capture_output=True, text=True
    )
    found = re.search(r": ([0-9.]+) us of CPU per round", out.stdout)
    if out.returncode != 0 or found is None:
        raise RuntimeError(f"burst_cost failed: {out.stdout}{out.stderr}")
    return float(found.group(1))


def burst_floor(spread: float, log: Any) -> dict[str, Any] | None:
    """burst_floor measures the machine's price for the paced shape (see the docstring):
    the same work back to back and in steps PACE_STEP_S apart over the spread, alternating
    three times; None without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        log("  burst floor skipped: no C compiler")
        return None
    steps = max(1, round(spread / PACE_STEP_S))
    per_step = max(1, BURST_ROUNDS // steps)
    together: list[float] = []
    stepped: list[float] = []
    with tempfile.TemporaryDirectory(prefix="burst-cost-") as tmp:
        program = os.path.join(tmp, "burst_cost")
        subprocess.run([cc, "-O2", "-o", program, BURST_SOURCE], check=True)
        for _ in range(3):
            together.append(burst_us(program, 1, 0, steps * per_step))
            stepped.append(burst_us(program, steps, round(PACE_STEP_S * 1000), per_step))
    ratio = statistics.median(stepped) / statistics.median(together)
    log(f"  the same computation in {steps} steps {PACE_STEP_S * 1000:.0f} ms apart: x{ratio:.2f}")
    return {"together_us": together, "stepped_us": stepped, "ratio": ratio}


def run(
    connections: int, spread: float, size: int, rounds: int, paced_rounds: int, log: Any = print
) -> dict[str, Any]:
    """run measures the paced and the unpaced broadcast on one server (see the docstring)."""
    with Server("lowmemws_paced") as srv, LoadClients(srv.host, srv.port, connections) as lc:
        opened = lc.open()
        log(f"  {opened['opened']:,} connections open in {opened['seconds']:.1f} s")
        broadcast(srv, size, 0)  # warm-up, not measured
        lc.wait_frames(1)
        unpaced: list[float] = []
        paced: list[dict[str, Any]] = []
        for i in range(max(rounds, paced_rounds)):
            if i < rounds:
                unpaced.append(unpaced_round(srv, lc, size))
                log(f"  unpaced round {i + 1}: {unpaced[-1] * 1e3:.1f} ms CPU")
            if i < paced_rounds:
                paced.append(paced_round(srv, lc, size, spread))
                log(f"  paced round {i + 1}: {paced[-1]['cpu_s'] * 1e3:.1f} ms CPU, per second "
                    f"{paced[-1]['per_second']}")  # fmt: skip
        idle = idle_cpu(srv, spread)
        log(f"  idle for {spread:g} s: {idle * 1e3:.1f} ms CPU")
        lc.close()
    floor = burst_floor(spread, log)
    last = paced[-1]
    target = connections / spread
    full = last["per_second"][: int(spread)]
    paced_cpu = statistics.median(p["cpu_s"] for p in paced)
    unpaced_cpu = statistics.median(unpaced)
    return {
        "version": version("lowmemws"),
        "connections": opened["opened"],
        "size": size,
        "spread_s": spread,
        "target_per_second": target,
        "per_second": last["per_second"],
        "per_second_ok": all(abs(n - target) <= TOLERANCE * target for n in full),
        "delivered": last["frames"],
        "all_delivered": all(p["ok"] for p in paced),
        "paced_cpu_s": [p["cpu_s"] for p in paced],
        "unpaced_cpu_s": unpaced,
        "idle_cpu_s": idle,
        "cpu_ratio": paced_cpu / unpaced_cpu if unpaced_cpu else None,
        "cpu_ratio_less_idle": (paced_cpu - idle) / unpaced_cpu if unpaced_cpu else None,
        "burst_floor": floor,
        "load_average": list(os.getloadavg()),
    }


def run_rate(
    connections: int, rate: float, size: int, processes: int, rounds: int, log: Any = print
) -> dict[str, Any]:
    """run_rate measures a broadcast capped at rate deliveries a second over ``processes``
    worker processes (each paces at rate / processes): the arrivals per second."""
    extra = ("--processes", str(processes))
    with (
        Server("lowmemws_paced", extra=extra) as srv,
        LoadClients(srv.host, srv.port, connections) as lc,
    ):
        opened = lc.open()
        rows = []
        for i in range(rounds):
            rows.append(paced_round(srv, lc, size, 0.0, rate))
            log(f"  rate round {i + 1}: per second {rows[-1]['per_second']}")
        lc.close()
    full = rows[-1]["per_second"][: int(connections / rate)]
    return {
        "mode": "rate",
        "version": version("lowmemws"),
        "connections": opened["opened"],
        "processes": processes,
        "size": size,
        "rate": rate,
        "per_second": rows[-1]["per_second"],
        "per_second_ok": all(abs(n - rate) <= TOLERANCE * rate for n in full),
        "never_over": all(n <= rate * (1 + TOLERANCE) for n in rows[-1]["per_second"]),
        "all_delivered": all(r["ok"] for r in rows),
        "load_average": list(os.getloadavg()),
    }


def render_rate(r: dict[str, Any]) -> str:
    """render_rate writes the rate figures."""
    seconds = ", ".join(f"{n:,}" for n in r["per_second"][:-1])
    return "\n".join(
        [
            f"lowmemws {r['version']}: {r['connections']:,} subscribers on {r['processes']} "
            f"worker processes, one {r['size']} B broadcast at rate={r['rate']:g}",
            f"- arrivals per second (each process paces at rate / {r['processes']}): {seconds}; "
            f"later: {r['per_second'][-1]:,} -> "
            f"{'ok' if r['per_second_ok'] else 'MISSED'} (within 20 % of {r['rate']:,.0f})",
            f"- delivered: {'all' if r['all_delivered'] else 'NOT all'}; load average "
            f"{', '.join(f'{x:.1f}' for x in r['load_average'])}",
        ]
    )


def render(r: dict[str, Any]) -> str:
    """render writes the figures the way the issue's closing note gives them."""
    if r.get("mode") == "rate":
        return render_rate(r)
    target = r["target_per_second"]
    low, high = target * (1 - TOLERANCE), target * (1 + TOLERANCE)
    seconds = ", ".join(f"{n:,}" for n in r["per_second"][:-1])
    paced = statistics.median(r["paced_cpu_s"])
    unpaced = statistics.median(r["unpaced_cpu_s"])
    return "\n".join(
        [
            f"lowmemws {r['version']}: {r['connections']:,} subscribers, one {r['size']} B "
            f"broadcast spread over {r['spread_s']:g} s",
            f"- arrivals per second (target {target:,.0f}, each within {low:,.0f}-{high:,.0f}): "
            f"{seconds}; later: {r['per_second'][-1]:,} -> "
            f"{'ok' if r['per_second_ok'] else 'MISSED'}",
            f"- delivered: {r['delivered']:,} ({'all' if r['all_delivered'] else 'NOT all'})",
            f"- server CPU: paced {paced * 1e3:.0f} ms (median of {len(r['paced_cpu_s'])}), "
            f"unpaced {unpaced * 1e3:.0f} ms (median of {len(r['unpaced_cpu_s'])}): "
            f"x{r['cpu_ratio']:.2f} (target <= x1.20); the loop idling for the same "
            f"{r['spread_s']:g} s costs {r['idle_cpu_s'] * 1e3:.0f} ms, so the paced "
            f"sending itself is x{r['cpu_ratio_less_idle']:.2f}",
            burst_line(r),
            f"- load average during the run: {', '.join(f'{x:.1f}' for x in r['load_average'])}"
            " (2 cores, shared)",
        ]
    )


def burst_line(r: dict[str, Any]) -> str:
    """burst_line says what the machine charges for the paced shape alone."""
    floor = r.get("burst_floor")
    if not floor:
        return "- the machine's price for working in steps: not measured (no C compiler)"
    return (
        f"- the machine's price for working in steps: the same pure computation in steps "
        f"{PACE_STEP_S * 1000:.0f} ms apart costs x{floor['ratio']:.2f} its cost back to back "
        "(benchmarks/burst_cost.c)"
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = report.parser(__doc__)
    p.add_argument("--connections", type=int, default=19_000)
    p.add_argument("--spread", type=float, default=10.0)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--rounds", type=int, default=5, help="unpaced rounds")
    p.add_argument("--paced-rounds", type=int, default=3)
    p.add_argument("--rate", type=float, default=0.0, help="measure rate=R instead (arrivals only)")
    p.add_argument("--processes", type=int, default=1, help="worker processes (with --rate)")
    return report.main(p, argv, run_args, render)


def run_args(a: argparse.Namespace) -> dict[str, Any]:
    """run_args runs with the figures given on the command line."""
    connections = min(a.connections, 19_000)
    if a.rate:
        return run_rate(connections, a.rate, a.size, a.processes, a.paced_rounds)
    return run(connections, a.spread, a.size, a.rounds, a.paced_rounds)


if __name__ == "__main__":
    main()
