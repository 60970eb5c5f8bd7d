"""Crowd: many raw client sockets driven by one epoll loop in the test process.

Used by the abuse tests to open thousands of connections at once, upgrade them, send on all
and read from all without a thread per socket. Every wait is bounded.
"""

from __future__ import annotations

import errno
import select
import socket
import threading
import time
from collections.abc import Callable, Iterable

from tests.adversarial.adversary import WAIT, WireError, rss_bytes, upgrade_head
from tests.support.servers import ServerProcess

#: Source address groups clients bind to: a crowd spreads its sockets over its group, and
#: each address has its own ephemeral ports (the machine may hold many TIME_WAIT sockets).
SOURCES = tuple(tuple(f"127.0.{group}.{host}" for host in range(2, 10)) for group in range(1, 5))
#: Linux IP_BIND_ADDRESS_NO_PORT: bind the address only, pick the port at connect time for
#: the full 4-tuple (so ports in TIME_WAIT towards other servers stay usable).
IP_BIND_ADDRESS_NO_PORT = 24


def each_ready(
    socks: list[socket.socket],
    event: int,
    ready: Callable[[socket.socket], bool],
    timeout: float,
    unfinished: str,
) -> None:
    """each_ready calls ready(sock) whenever a socket is ready for the epoll event, until it
    has returned True for every socket; WireError("<count> <unfinished>") after timeout."""
    pending = {s.fileno(): s for s in socks}
    with select.epoll() as ep:
        for fd in pending:
            ep.register(fd, event)
        deadline = time.monotonic() + timeout
        while pending:
            if time.monotonic() > deadline:
                raise WireError(f"{len(pending)} {unfinished}")
            for fd, _ in ep.poll(0.5):
                if ready(pending[fd]):
                    del pending[fd]
                    ep.unregister(fd)


class Crowd:
    """Crowd is n TCP connections to server, opened at once with non-blocking connects."""

    def __init__(
        self,
        server: ServerProcess,
        n: int,
        *,
        sources: tuple[str, ...] = SOURCES[0],
        rcvbuf: int = 0,
        maxseg: int = 0,
        hello: bytes = b"",
    ) -> None:
        """hello, when given, is sent on each socket as soon as its connect completes.

        rcvbuf sets SO_RCVBUF and maxseg TCP_MAXSEG before the connect: a small segment size
        keeps the server's send buffer towards the socket small (Linux sizes it from the
        initial congestion window times the segment size, ~2.6 MB on loopback otherwise)."""
        self.server = server
        self.hello = hello
        self.sources = sources
        self.rcvbuf = rcvbuf
        self.maxseg = maxseg
        self.reopened = 0
        self.socks: list[socket.socket] = [self._connect(i) for i in range(n)]
        self._wait_connected(self.socks)

    def _connect(self, i: int) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        if self.rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.rcvbuf)
        if self.maxseg:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, self.maxseg)
        sock.setblocking(False)
        sock.bind((self.sources[i % len(self.sources)], 0))
        code = sock.connect_ex((self.server.host, self.server.port))
        if code not in (0, errno.EINPROGRESS):
            sock.close()
            raise WireError(f"connect failed: {errno.errorcode.get(code, code)}")
        return sock

    def _wait_connected(self, socks: list[socket.socket], timeout: float = 3 * WAIT) -> None:
        def connected(sock: socket.socket) -> bool:
            code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if code:
                raise WireError(f"connect failed: {errno.errorcode.get(code, code)}")
            if self.hello and sock.send(self.hello) != len(self.hello):
                raise WireError("the kernel took part of a small send")
            return True

        each_ready(socks, select.EPOLLOUT, connected, timeout, "connects still pending")

    def send_all(self, data: bytes) -> None:
        """send_all sends data on every socket (small data: the kernel takes it at once)."""
        for sock in self.socks:
            if sock.send(data) != len(data):
                raise WireError("the kernel took part of a small send")

    def read_all(
        self,
        until: bytes | int | None,
        timeout: float = 3 * WAIT,
        socks: list[socket.socket] | None = None,
    ) -> dict[socket.socket, bytes]:
        """read_all reads every socket (of socks, else of the crowd) until it holds the marker
        bytes (until is bytes), that many bytes (int), or EOF (None); returns what each read."""
        socks = self.socks if socks is None else socks
        got = {s: b"" for s in socks}

        def done(sock: socket.socket, data: bytes, eof: bool) -> bool:
            if eof or until is None:
                return eof
            if isinstance(until, int):
                return len(data) >= until
            return until in data

        def read(sock: socket.socket) -> bool:
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                return False
            except ConnectionResetError:
                chunk = b""
            got[sock] += chunk
            return done(sock, got[sock], not chunk)

        each_ready(socks, select.EPOLLIN, read, timeout, "sockets did not finish reading")
        return got

    def upgrade(self) -> None:
        """upgrade sends an upgrade head on every socket (unless hello was one) and checks
        every 101.

        A connection ended by the kernel before any answer is opened again, as a real client
        would (counted in reopened): when thousands of connects overflow the listen queue,
        Linux retransmits SYN-ACKs and may reset a few of those connections (PAWS, pruned
        half-open entries) whatever the server does. At most 1 % may be; each is retried at
        most three times."""
        if not self.hello.startswith(b"GET "):
            self.send_all(upgrade_head(self.server))
        answers = self.read_all(b"\r\n\r\n")
        for _ in range(3):
            lost = [i for i, sock in enumerate(self.socks) if answers[sock] == b""]
            if not lost or len(lost) > len(self.socks) // 100:
                break
            self.reopened += len(lost)
            for i in lost:
                self.socks[i].close()
                self.socks[i] = self._connect(i)
            again = [self.socks[i] for i in lost]
            self._wait_connected(again)
            if not self.hello.startswith(b"GET "):
                for sock in again:
                    sock.send(upgrade_head(self.server))
            answers.update(self.read_all(b"\r\n\r\n", socks=again))
        answers = {sock: answers[sock] for sock in self.socks}
        refused = [a for a in answers.values() if not a.startswith(b"HTTP/1.1 101 ")]
        if refused:
            raise WireError(f"{len(refused)} upgrades refused, e.g. {refused[0][:80]!r}")
        extra = [a for a in answers.values() if not a.endswith(b"\r\n\r\n")]
        if extra:
            raise WireError("bytes after the 101 before anything was sent")

    def close(self) -> None:
        for sock in self.socks:
            sock.close()
        self.socks = []

    def __enter__(self) -> Crowd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class PeakRss:
    """PeakRss samples a process's RSS every few milliseconds in a thread; peak is the most."""

    def __init__(self, pid: int, every: float = 0.002) -> None:
        self.pid = pid
        self.every = every
        self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(self.every)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(WAIT)
        self.peak = max(self.peak, rss_bytes(self.pid))


def statuses(answers: Iterable[bytes]) -> dict[int, int]:
    """statuses counts the HTTP status codes of answers (0 for an answer without one)."""
    counts: dict[int, int] = {}
    for answer in answers:
        parts = answer.split(b" ", 2)
        ok = len(parts) >= 2 and parts[0].startswith(b"HTTP/1.") and parts[1].isdigit()
        code = int(parts[1]) if ok else 0
        counts[code] = counts.get(code, 0) + 1
    return counts
