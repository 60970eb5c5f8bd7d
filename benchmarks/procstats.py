"""procstats: memory and CPU figures read from /proc, shared by every benchmark.

Everything here reads the kernel's own accounting (``/proc/PID/status``, ``/proc/PID/stat``,
``/proc/PID/smaps_rollup``, ``/proc/meminfo``) rather than timing wall clocks, because the
benchmark machine is shared and noisy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def status_kib(pid: int) -> dict[str, int]:
    """status_kib returns the ``kB`` fields of /proc/PID/status (VmRSS, RssAnon, ...)."""
    fields: dict[str, int] = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, rest = line.partition(":")
            parts = rest.split()
            if len(parts) == 2 and parts[1] == "kB":
                fields[name] = int(parts[0])
    return fields


def memory(pid: int) -> dict[str, int]:
    """memory returns RSS and RssAnon of one process, in bytes."""
    s = status_kib(pid)
    return {"rss": s["VmRSS"] * 1024, "rss_anon": s.get("RssAnon", 0) * 1024}


def pss(pid: int) -> int:
    """pss returns the proportional set size (bytes): shared pages split between sharers."""
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def children(pid: int) -> list[int]:
    """children returns the direct children of a process (needs /proc/PID/task/*/children)."""
    found: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                found.extend(int(p) for p in f.read().split())
    except FileNotFoundError:
        pass
    return found


def tree(pid: int) -> list[int]:
    """tree returns a process and all its descendants."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        todo.extend(children(p))
    return pids


def tree_memory(pid: int) -> dict[str, int]:
    """tree_memory sums RSS, RssAnon and PSS over a process tree (bytes)."""
    total = {"rss": 0, "rss_anon": 0, "pss": 0, "processes": 0}
    for p in tree(pid):
        try:
            m = memory(p)
            total["pss"] += pss(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
        total["rss"] += m["rss"]
        total["rss_anon"] += m["rss_anon"]
        total["processes"] += 1
    return total


def cpu_ticks(pid: int) -> int:
    """cpu_ticks returns utime + stime of a process in clock ticks (/proc/PID/stat 14, 15)."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    fields = data[data.rindex(")") + 2 :].split()
    return int(fields[11]) + int(fields[12])


def thread_cpu_ticks(pid: int) -> dict[int, int]:
    """thread_cpu_ticks returns utime + stime of every live thread of a process, by thread id
    (/proc/PID/task/TID/stat; the main thread's id is the PID)."""
    ticks: dict[int, int] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                data = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        fields = data[data.rindex(")") + 2 :].split()
        ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def tree_cpu_ticks(pid: int) -> int:
    """tree_cpu_ticks sums cpu_ticks over a process tree (live processes only)."""
    total = 0
    for p in tree(pid):
        try:
            total += cpu_ticks(p)
        except (FileNotFoundError, ProcessLookupError):
            continue
    return total


def tree_cpu_ns(pid: int) -> int:
    """tree_cpu_ns sums the CPU time of every live thread of a process tree, in nanoseconds
    (/proc/PID/task/TID/schedstat, the scheduler's own runtime accounting). utime + stime
    come in clock ticks (10 ms), too coarse for a window that costs ~0.1 s; a thread that
    ended during the window is missed, so measure servers whose threads live on."""
    total = 0
    for p in tree(pid):
        try:
            tids = os.listdir(f"/proc/{p}/task")
        except (FileNotFoundError, ProcessLookupError):
            continue
        for tid in tids:
            try:
                with open(f"/proc/{p}/task/{tid}/schedstat") as f:
                    total += int(f.read().split()[0])
            except (FileNotFoundError, ProcessLookupError):
                continue
    return total


def ticks_to_us(ticks: int) -> float:
    """ticks_to_us converts clock ticks to microseconds."""
    return ticks * 1_000_000 / CLOCK_TICKS


def meminfo_kib() -> dict[str, int]:
    """meminfo_kib returns /proc/meminfo in KiB."""
    out: dict[str, int] = {}
    with open("/proc/meminfo") as f:
        for line in f:
            name, _, rest = line.partition(":")
            out[name] = int(rest.split()[0])
    return out


def kernel_memory() -> dict[str, int]:
    """kernel_memory returns the kernel's slab and TCP socket memory, in bytes.

    Slab and SUnreclaim come from /proc/meminfo; tcp_mem_pages from /proc/net/sockstat
    (pages used by TCP socket buffers).
    """
    m = meminfo_kib()
    out = {"slab": m["Slab"] * 1024, "sunreclaim": m["SUnreclaim"] * 1024}
    with open("/proc/net/sockstat") as f:
        for line in f:
            if line.startswith("TCP:"):
                parts = line.split()
                out["tcp_mem"] = int(parts[parts.index("mem") + 1]) * PAGE_SIZE
    return out


def wait_settled(
    sample: Callable[[], int],
    *,
    interval: float = 0.5,
    window: int = 4,
    tolerance: float = 0.002,
    timeout: float = 30.0,
) -> int:
    """wait_settled samples until ``window`` samples in a row agree within ``tolerance``.

    Returns the last sample; gives up (and returns the last sample) after ``timeout`` seconds.
    """
    values: list[int] = []
    deadline = time.monotonic() + timeout
    while True:
        values.append(sample())
        last = values[-window:]
        if len(last) == window and max(last) - min(last) <= tolerance * max(1, max(last)):
            return values[-1]
        if time.monotonic() > deadline:
            return values[-1]
        time.sleep(interval)


def settled_memory(pid: int, timeout: float = 30.0) -> dict[str, int]:
    """settled_memory waits for a process's RSS to stop moving, then returns its memory."""
    wait_settled(lambda: memory(pid)["rss"], timeout=timeout)
    return memory(pid)


def settled_tree_memory(pid: int, timeout: float = 30.0) -> dict[str, int]:
    """settled_tree_memory waits for a tree's RSS sum to stop moving, then returns its memory."""
    wait_settled(lambda: tree_memory(pid)["rss"], timeout=timeout)
    return tree_memory(pid)


def wait_idle(pid: int, *, interval: float = 0.3, timeout: float = 15.0) -> None:
    """wait_idle waits until a process uses at most one clock tick per ``interval``.

    Run before a measured window, so clean-up left over from the previous round (closing
    thousands of connections, garbage collection) is not charged to the next one.
    """
    deadline = time.monotonic() + timeout
    last = cpu_ticks(pid)
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = cpu_ticks(pid)
        if now - last <= 1:
            return
        last = now
