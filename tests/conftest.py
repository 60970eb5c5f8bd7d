"""Shared fixtures: the echo server as a child process, a factory for any CLI server, a
factory for in-process Gateways, a redis-server, and a guarded page for the no-over-read
tests. Each fixture name has one meaning in the whole suite.

The echo server command comes from $LOWMEMWS_ECHO_CMD (default ``<python> -m lowmemws echo``),
see tests/support/servers.py. Every server listens on 127.0.0.1 on a free port and is stopped
by PID at teardown (SIGTERM, then SIGKILL after a timeout).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest

from lowmemws import Config, Gateway
from tests.support.guarded_page import GuardedPage
from tests.support.redis_server import RedisServer, require_redis
from tests.support.servers import ServerProcess, StartServer, start_cli_server, start_echo_server


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


@pytest.fixture(scope="module")
def guarded_page() -> GuardedPage:
    """guarded_page is a GuardedPage shared by a module's no-over-read tests."""
    return GuardedPage()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """redis_server is a fresh redis-server on a free port, killed at teardown; the test
    skips without redis-server or redis-py (fails under CI=true)."""
    server = RedisServer(require_redis(), tmp_path)
    server.start()
    yield server
    server.kill()


@pytest.fixture
def make_gateway() -> Iterator[Callable[..., Gateway]]:
    """make_gateway(config, hosts) is a Gateway in this process on a free port (127.0.0.1 by
    default); start() it after setting hooks. Every one made is stopped at teardown."""
    made: list[Gateway] = []

    def make(config: Config | None = None, hosts: str | tuple[str, ...] = "127.0.0.1") -> Gateway:
        gateway = Gateway(hosts, 0, config=config or Config())
        made.append(gateway)
        return gateway

    yield make
    for gateway in made:
        gateway.stop(timeout=10)
