"""serverctl: start and stop the benchmark servers, shared by every benchmark.

A server is a fresh process running ``benchmarks/servers/<name>_server.py`` with the current
interpreter; it is ready when it has printed ``listening on`` and accepts a TCP connection. It
is stopped by PID: SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from importlib import metadata

HERE = os.path.dirname(os.path.abspath(__file__))
SERVERS_DIR = os.path.join(HERE, "servers")
ALL_SERVERS = ("lowmemws", "websockets", "aiohttp", "picows")
DISTRIBUTIONS = {
    "lowmemws": "lowmemws",
    "lowmemws_history": "lowmemws",
    "websockets": "websockets",
    "aiohttp": "aiohttp",
    "picows": "picows",
    "floor": None,
}


def free_port(host: str = "127.0.0.1") -> int:
    """free_port asks the kernel for a currently unused TCP port."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def version(name: str) -> str:
    """version returns the installed version of a server's library ("-" if none)."""
    dist = DISTRIBUTIONS.get(name)
    if dist is None:
        return "-"
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"


def usable(name: str) -> tuple[bool, str]:
    """usable tells whether a server can run here; the second value says why not."""
    probe = (
        "import lowmemws; lowmemws.Gateway; lowmemws.Accept"
        if name.startswith("lowmemws")
        else (f"import {name}" if name != "floor" else "pass")
    )
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    if r.returncode:
        return False, (r.stderr.strip().splitlines() or ["import failed"])[-1]
    return True, ""


def scrape_metrics(host: str, port: int, timeout: float = 30.0) -> dict[str, float]:
    """scrape_metrics reads a lowmemws server's GET /metrics: {"name{labels}": value}."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(f"GET /metrics HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    body = data.partition(b"\r\n\r\n")[2].decode()
    values: dict[str, float] = {}
    for line in body.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


class Server:
    """Server is one running benchmark server process (a context manager)."""

    def __init__(
        self,
        name: str,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        extra: tuple[str, ...] = (),
        timeout: float = 60.0,
        python: str | None = None,
    ) -> None:
        self.name = name
        self.host = host
        self.port = port or free_port(host)
        script = os.path.join(SERVERS_DIR, f"{name}_server.py")
        # python: another interpreter (another build of the library) instead of this one.
        args = [python or sys.executable, script, "--host", host, "--port", str(self.port), *extra]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=SERVERS_DIR
        )
        self.pid = self.proc.pid
        self.output: list[str] = []
        self._ready = threading.Event()
        threading.Thread(target=self._read_output, daemon=True).start()
        if not self._ready.wait(timeout) or not self._accepts(timeout):
            self.stop()
            raise RuntimeError(f"{name} server did not start: {''.join(self.output[-20:])}")

    def _read_output(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if len(self.output) < 1000:
                self.output.append(line)
            if "listening on" in line:
                self._ready.set()
        self._ready.set()

    def _accepts(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection((self.host, self.port), timeout=1).close()
                return True
            except OSError:
                time.sleep(0.05)
        return False

    def alive(self) -> bool:
        """alive tells whether the server process is still running."""
        return self.proc.poll() is None

    def stop(self, grace: float = 10.0) -> None:
        """stop sends SIGTERM to the server's PID, then SIGKILL after ``grace`` seconds."""
        if self.proc.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(grace)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.proc.wait()

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
