"""A throw-away redis-server for the RedisBus tests, and the check that one can run."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .ci import skip_or_fail
from .servers import free_port
from .waiting import wait_until


def require_redis() -> str:
    """require_redis returns the redis-server binary; missing pieces skip the test, or fail
    it under CI=true."""
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    problems = []
    if not os.access(binary, os.X_OK):
        problems.append("redis-server is not installed (make sysdeps installs it)")
    try:
        import redis  # noqa: F401
    except ImportError:
        problems.append("redis-py is not installed (pip install 'lowmemws[redis]')")
    if problems:
        skip_or_fail("; ".join(problems))
    return binary


class RedisServer:
    """RedisServer is a redis-server on a free loopback port, stopped by its PID."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary, self.directory, self.port = binary, directory, free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """start runs the server (again, on the same port after kill) and waits for it."""
        args = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1"]
        args += ["--save", "", "--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
        wait_until(self.answers, "redis-server to answer", timeout=10)

    def answers(self) -> bool:
        """answers tells whether the server answers PING."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                return conn.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def kill(self) -> None:
        """kill ends the server at once (SIGKILL): an outage, as clients see one."""
        if self.process is not None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            self.process = None
