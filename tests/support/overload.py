"""Tools of the overload tests (tests/test_overload.py) and benchmarks/overload.py.

- ``CrowdProcess``: the ping crowd (support/ping_crowd.py) as a child process: thousands of
  idle clients that answer pings late and record what they see, driven by JSON lines;
- ``send_stall`` / ``stall_answer``: start a stall from a raw socket without waiting;
- ``HeadClients``: many raw sockets that connect and send upgrade heads when told to;
- ``tcp_state``: the kernel's TCP state of a socket, read without reading its data.

Everything is bounded in time; child processes are ended by PID.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import os
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tests.adversarial.adversary import upgrade_head
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.processes import end_process
from tests.support.servers import ServerProcess

CROWD_SCRIPT = Path(__file__).with_name("ping_crowd.py")
SOURCES = tuple(f"127.0.0.{host}" for host in range(2, 10))
IP_BIND_ADDRESS_NO_PORT = 24
TCP_CLOSE_WAIT = 8
_LINES_KEPT = 50


def stop_server(server: ServerProcess) -> None:
    """stop_server continues the server should it be stopped (SIGSTOP), then ends it by PID."""
    if server.proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(server.pid, signal.SIGCONT)
    server.stop()


def gauge(server: ServerProcess, name: str, timeout: float = 10.0) -> float:
    """gauge is the value of the metric ``lowmemws_<name>`` in the server's /metrics."""
    return metric_value(fetch_metrics(server.host, server.port, timeout), f"lowmemws_{name}")


class CrowdError(AssertionError):
    """CrowdError: the crowd process exited, or an event did not come in time."""


class CrowdProcess(contextlib.AbstractContextManager["CrowdProcess"]):
    """CrowdProcess is one ping crowd child process holding ``clients`` connections.

    Events it prints are queued by a reader thread; ``expect`` takes the next event of a
    name (events of other names that come first are kept in ``events``).
    """

    def __init__(
        self,
        server: ServerProcess,
        clients: int,
        *,
        pong_delay: float = 0.05,
        spread: float = 0.0,
        lifetime: float = 120.0,
    ) -> None:
        self.argv = [
            sys.executable,
            str(CROWD_SCRIPT),
            "--host",
            server.host,
            "--port",
            str(server.port),
            "--clients",
            str(clients),
            "--pong-delay",
            str(pong_delay),
            "--spread",
            str(spread),
            "--lifetime",
            str(lifetime),
        ]
        self.events: list[dict[str, Any]] = []
        self._queue: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._other: collections.deque[str] = collections.deque(maxlen=_LINES_KEPT)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._drain, name="crowd-out", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """pid is the process id of the crowd."""
        return self.proc.pid

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("{"):
                try:
                    self._queue.put(json.loads(line))
                    continue
                except json.JSONDecodeError:
                    pass
            self._other.append(line)
        self._queue.put(None)

    def output(self) -> str:
        """output is the crowd's last lines that were not events (tracebacks, say)."""
        return "".join(self._other)

    def send(self, command: str, **fields: Any) -> None:
        """send writes one command line to the crowd."""
        assert self.proc.stdin is not None
        fields["cmd"] = command
        try:
            self.proc.stdin.write(json.dumps(fields) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError) as exc:
            raise CrowdError(f"the crowd is gone ({exc}); its output:\n{self.output()}") from exc

    def expect(self, *names: str, timeout: float) -> dict[str, Any]:
        """expect returns the next event called one of names; CrowdError after timeout."""
        for i, event in enumerate(self.events):
            if event["event"] in names:
                return self.events.pop(i)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CrowdError(f"no {'/'.join(names)} event from the crowd in {timeout:.0f} s")
            try:
                got = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if got is None:
                self._queue.put(None)  # stays at the end: later calls fail at once too
                raise CrowdError(
                    f"the crowd exited (code {self.proc.poll()}) before {'/'.join(names)}; "
                    f"its output:\n{self.output()}"
                )
            if got["event"] in names:
                return got
            self.events.append(got)

    def upgraded(self, timeout: float = 40.0) -> dict[str, Any]:
        """upgraded waits until every client has upgraded (or failed) and returns the event."""
        return self.expect("upgraded", timeout=timeout)

    def report(self, timeout: float = 20.0) -> dict[str, Any]:
        """report asks for every connection's record and returns it."""
        self.send("report")
        return self.expect("report", timeout=timeout)

    def close(self, timeout: float = 5.0) -> None:
        """close asks the crowd to quit, then ends it by PID if it is still running."""
        if self.proc.poll() is None:
            with contextlib.suppress(CrowdError):
                self.send("quit")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            end_process(self.proc, timeout)
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self._reader.join(timeout)

    def __exit__(self, *exc: object) -> None:
        self.close()


#: The crowd fires once this share of its open connections received a ping since it armed.
NEARLY_ALL = 0.99


def through_ping_round(
    process: CrowdProcess,
    server: ServerProcess,
    action: str,
    *,
    ping_interval: float,
    ping_timeout: float,
    seconds: float,
) -> dict[str, Any]:
    """through_ping_round overloads the server right after a ping round reached a crowd whose
    upgrades are done, and returns the crowd's report ping_interval + ping_timeout + 2 s after
    the overload ended (the figures of the server's config are passed in).

    The crowd first sends a client ping on every connection, so the server sees them all
    active at once and its next ping round reaches them together (the worst case); then,
    the moment that round has reached 99 % of them (or a quarter of them within 25 ms: a burst
    the server wrote in one go), it fires ``action``: ``stall`` makes the loop sleep
    ``seconds`` (POST /stall), ``sigstop`` stops the server process as long. Added to the
    report: ``began_after_first_ping``, how long after the round's first ping the overload
    began (seconds), and ``pongs_before_overload``, the pongs of the round sent before it
    (the server may have read those in time).
    """
    process.send("sync")
    process.expect("synced", timeout=10)
    process.send(
        "arm",
        fraction=NEARLY_ALL,
        timeout=3 * ping_interval + 2,
        action=action,
        seconds=seconds,
        pid=server.pid,
        path=f"/stall?seconds={seconds}",
        burst=True,
    )
    process.expect("armed", timeout=10)
    fired = process.expect("fired", "not_fired", timeout=3 * ping_interval + 5)
    assert fired["event"] == "fired", f"no ping round reached 99 % of the crowd: {fired}"
    done = process.expect("action_done", timeout=seconds + 10)
    if action == "stall":
        assert done["status"] == 200, f"the stall was answered {done['status']}"
        slept = float(done["body"].split()[0])
        assert slept >= seconds - 0.1, f"the loop slept only {slept} s"
    time.sleep(ping_interval + ping_timeout + 2)
    report = process.report()
    report["fired"] = fired
    # when the overload began (the stall's own time, or the SIGSTOP), after the round's first
    # ping; and the pongs of the round sent before it (the server may have read those in time)
    began = float(done["body"].split()[1]) if action == "stall" else float(fired["t"])
    report["began_after_first_ping"] = began - float(fired["first"])
    report["pongs_before_overload"] = sum(
        1 for c in report["conns"] for t in c["pongs"] if fired["first"] <= t < began
    )
    return report


def lag_figures(server: ServerProcess) -> tuple[float | None, float | None]:
    """lag_figures reads lowmemws_loop_lag_seconds and lowmemws_loop_lag_max_seconds from
    /metrics (None for a metric that is missing)."""
    text = fetch_metrics(server.host, server.port)
    found: list[float | None] = []
    for name in ("lowmemws_loop_lag_seconds", "lowmemws_loop_lag_max_seconds"):
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        found.append(float(match.group(1)) if match else None)
    return found[0], found[1]


def summary(report: dict[str, Any]) -> str:
    """summary is a report's figures in one line, for assertion messages."""
    return (
        f"{report['open']} of {report['upgraded']} open, close frames {report['close_frames']},"
        f" EOF {report['eof']} ({report['eof_without_close']} without a close frame)"
    )


def send_stall(server: ServerProcess, seconds: float) -> socket.socket:
    """send_stall sends ``POST /stall?seconds=S`` on a new socket and returns at once: the
    server's loop sleeps S seconds as soon as it reads it. Read the answer with
    stall_answer."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(
        f"POST /stall?seconds={seconds} HTTP/1.1\r\nHost: {server.host}\r\n"
        "Content-Length: 0\r\n\r\n".encode()
    )
    return sock


def stall_answer(sock: socket.socket, timeout: float) -> tuple[int, float]:
    """stall_answer reads the stall's HTTP answer: (status, seconds the server slept)."""
    data = b""
    deadline = time.monotonic() + timeout
    with sock:
        while True:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            try:
                chunk = sock.recv(4096)
            except ConnectionResetError:
                break
            except TimeoutError as exc:
                raise AssertionError(f"no answer to the stall in {timeout:.0f} s") from exc
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        raise AssertionError(f"the stall got no HTTP answer: {data[:100]!r}")
    return int(parts[1]), float(body.split()[0] if body else 0)


def tcp_state(sock: socket.socket) -> int:
    """tcp_state is the Linux TCP state of sock (tcpi_state of TCP_INFO): 1 ESTABLISHED,
    8 CLOSE_WAIT (the peer has closed), ...; reading it leaves the socket's data unread."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)
    return int(struct.unpack("B", info[:1])[0])


class HeadClients:
    """HeadClients are n raw client sockets that connect (``connect``) and send a complete
    upgrade head (``send_heads``) when told, then read their HTTP answers (``answers``).

    Non-blocking connects spread over 127.0.0.2 .. 127.0.0.9; one epoll loop reads them.
    """

    def __init__(self, server: ServerProcess, n: int) -> None:
        self.server = server
        self.n = n
        self.socks: list[socket.socket] = []

    def connect(self, timeout: float = 10.0) -> None:
        """connect opens the n connections and waits until the kernel has completed them
        (the server's loop need not have accepted them)."""
        for i in range(self.n):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.setblocking(False)
            sock.bind((SOURCES[i % len(SOURCES)], 0))
            self.socks.append(sock)
            code = sock.connect_ex((self.server.host, self.server.port))
            if code not in (0, errno.EINPROGRESS):
                raise AssertionError(f"connect failed: {errno.errorcode.get(code, code)}")
        pending = {s.fileno(): s for s in self.socks}
        with select.epoll() as ep:
            for fd in pending:
                ep.register(fd, select.EPOLLOUT)
            deadline = time.monotonic() + timeout
            while pending:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{len(pending)} connects still pending")
                for fd, _ in ep.poll(0.2):
                    code = pending[fd].getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                    if code:
                        raise AssertionError(f"connect failed: {errno.errorcode.get(code)}")
                    del pending[fd]
                    ep.unregister(fd)

    def send_heads(self) -> None:
        """send_heads sends a whole upgrade head on every socket (the kernel takes it)."""
        for sock in self.socks:
            head = upgrade_head(self.server)
            if sock.send(head) != len(head):
                raise AssertionError("the kernel took part of a small send")

    def answers(self, timeout: float) -> list[bytes]:
        """answers reads every socket until its answer head is complete (or EOF) and returns
        each status line; b"" for a connection that ended or timed out without one."""
        by_fd = {s.fileno(): s for s in self.socks}
        got = dict.fromkeys(by_fd, b"")
        pending = set(by_fd)
        with select.epoll() as ep:
            for fd in pending:
                ep.register(fd, select.EPOLLIN)
            deadline = time.monotonic() + timeout
            while pending and time.monotonic() < deadline:
                for fd, _ in ep.poll(0.2):
                    try:
                        chunk = by_fd[fd].recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        chunk = b""
                    got[fd] += chunk
                    if not chunk or b"\r\n\r\n" in got[fd]:
                        pending.discard(fd)
                        ep.unregister(fd)
        return [got[s.fileno()].split(b"\r\n", 1)[0] for s in self.socks]

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []


def status_counts(lines: list[bytes]) -> dict[str, int]:
    """status_counts counts status lines by their code ("none" for no answer)."""
    counts: dict[str, int] = {}
    for line in lines:
        parts = line.split(b" ", 2)
        ok = len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit()
        code = parts[1].decode() if ok else "none"
        counts[code] = counts.get(code, 0) + 1
    return counts
