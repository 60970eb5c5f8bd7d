"""Shared fixtures: the echo server as a child process, and a factory for any CLI server.

The echo server command comes from $LOWMEMWS_ECHO_CMD (default ``<python> -m lowmemws echo``),
see tests/support/servers.py. Every server listens on 127.0.0.1 on a free port and is stopped
by PID at teardown (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import pytest

from support.servers import ServerProcess, StartServer, start_cli_server, start_echo_server


@pytest.fixture(scope="session")
def echo_process() -> Iterator[ServerProcess]:
    """echo_process is one echo server shared by the whole session (16 MiB message cap)."""
    server = start_echo_server(["--max-message-size", str(16 * 1024 * 1024)])
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def echo_server(echo_process: ServerProcess) -> tuple[str, int]:
    """echo_server is (host, port) of the shared echo server; it fails fast if it died."""
    if echo_process.proc.poll() is not None:
        pytest.fail(
            f"the echo server exited with code {echo_process.proc.returncode}; its output:\n"
            f"{echo_process.output()}"
        )
    return echo_process.host, echo_process.port


@pytest.fixture
def start_server() -> Iterator[StartServer]:
    """start_server(command, extra_args) starts a CLI server; all are stopped at teardown."""
    started: list[ServerProcess] = []

    def start(command: Sequence[str], extra_args: Sequence[str] = ()) -> ServerProcess:
        server = start_cli_server(command, extra_args)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
