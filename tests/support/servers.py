"""Start a lowmemws CLI server as a child process on a free loopback port.

The tests, the compliance harness and the demo all need the same thing: run a command such as
``python -m lowmemws echo --host 127.0.0.1 --port P``, wait for the line
``listening on ws://127.0.0.1:P`` it prints when ready, and stop it by PID afterwards (SIGTERM,
then SIGKILL after a timeout). Only loopback addresses are used.

The echo command comes from the environment variable ``LOWMEMWS_ECHO_CMD`` (split like a shell
command line) so the harness can be pointed at another server with the same CLI contract;
by default it is ``<this interpreter> -m lowmemws echo``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

from .processes import end_process

ECHO_CMD_ENV = "LOWMEMWS_ECHO_CMD"
LOOPBACK = "127.0.0.1"
READY_PREFIX = "listening on ws"  # ws:// or, serving TLS, wss://
_OUTPUT_LINES_KEPT = 200
_START_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """ServerStartError: the server exited or stayed silent instead of printing its ready line."""


def echo_command() -> list[str]:
    """echo_command returns the argv prefix of the echo server, without --host/--port."""
    configured = os.environ.get(ECHO_CMD_ENV, "").strip()
    if configured:
        return shlex.split(configured)
    return [sys.executable, "-m", "lowmemws", "echo"]


def free_port(host: str = LOOPBACK) -> int:
    """free_port returns a TCP port that was free on host a moment ago (the kernel's choice)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


class ServerProcess(contextlib.AbstractContextManager["ServerProcess"]):
    """ServerProcess is a running CLI server: its Popen, address and the output it printed.

    Standard output and standard error are merged and drained by a thread for the whole life
    of the process, so a chatty server never blocks on a full pipe; the last lines are kept
    for error messages.
    """

    def __init__(self, argv: Sequence[str], host: str, port: int) -> None:
        self.argv = list(argv)
        self.host = host
        self.port = port
        self.ready_line: str | None = None
        self._lines: collections.deque[str] = collections.deque(maxlen=_OUTPUT_LINES_KEPT)
        self._ready = threading.Event()
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._drain, name=f"server-{port}", daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        """pid is the process id of the server (the parent, when it runs several processes)."""
        return self.proc.pid

    @property
    def url(self) -> str:
        """url is the WebSocket URL of the server's root path."""
        return f"ws://{self.host}:{self.port}/"

    def output(self) -> str:
        """output returns the last lines the server printed (stdout and stderr merged)."""
        return "".join(self._lines)

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.append(line)
            if self.ready_line is None and line.startswith(READY_PREFIX):
                self.ready_line = line.rstrip("\r\n")
                self._ready.set()
        self._ready.set()  # end of output: wake a waiter so it sees the exit at once

    def wait_ready(self, timeout: float) -> None:
        """wait_ready blocks until the ready line appears; ServerStartError if it does not."""
        self._ready.wait(timeout)
        if self.ready_line is not None:
            return
        self.stop()
        raise ServerStartError(
            f"server {shlex.join(self.argv)!r} did not print {READY_PREFIX!r} within "
            f"{timeout:.0f} s (exit code {self.proc.returncode}); its output:\n{self.output()}"
        )

    def terminate(self) -> None:
        """terminate sends SIGTERM (the documented way to stop the server) without waiting."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 10.0) -> int:
        """stop ends the server: SIGTERM, then SIGKILL after timeout; returns its exit code."""
        end_process(self.proc, timeout)
        self._reader.join(timeout)
        return self.proc.returncode

    def __exit__(self, *exc: object) -> None:
        self.stop()


def start_cli_server(
    command: Sequence[str],
    extra_args: Sequence[str] = (),
    *,
    host: str = LOOPBACK,
    ready_timeout: float = 30.0,
) -> ServerProcess:
    """start_cli_server runs ``command --host H --port P extra_args`` and waits until ready.

    The port is chosen free just before the start; should another process take it in between
    (the server then exits early), the start is retried on a new port, a few times at most.
    """
    last_error: ServerStartError | None = None
    for _ in range(_START_ATTEMPTS):
        port = free_port(host)
        argv = [*command, "--host", host, "--port", str(port), *extra_args]
        server = ServerProcess(argv, host, port)
        started = time.monotonic()
        try:
            server.wait_ready(ready_timeout)
            return server
        except ServerStartError as exc:
            last_error = exc
            if time.monotonic() - started >= ready_timeout:
                break  # silent, not a lost port race: retrying would only wait again
    assert last_error is not None
    raise last_error


def start_echo_server(
    extra_args: Sequence[str] = (), *, host: str = LOOPBACK, ready_timeout: float = 30.0
) -> ServerProcess:
    """start_echo_server starts the configured echo server (see echo_command) and waits."""
    return start_cli_server(echo_command(), extra_args, host=host, ready_timeout=ready_timeout)


StartServer = Callable[..., ServerProcess]
"""StartServer is the type of the start_server fixture: (command, extra_args) -> server."""
