"""A throw-away Redis Cluster on loopback: 3 masters and a replica each (issue 15).

Six redis-server processes in cluster mode (``--cluster-enabled yes``, each with its own
config file, data directory, client port and cluster bus port, all chosen free by the
kernel), joined by ``redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes``.
The harness waits for ``cluster_state:ok`` on every node and stops every process by its PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from pathlib import Path

from .ci import skip_or_fail
from .redis_server import require_redis
from .waiting import wait_until

MASTERS = 3
START_TIMEOUT = 30.0  # seconds for the cluster to form; not a performance figure


def require_redis_cli() -> str:
    """require_redis_cli returns redis-cli (it creates the cluster); missing: skip, or fail
    under CI=true."""
    binary = shutil.which("redis-cli") or "/usr/bin/redis-cli"
    if not os.access(binary, os.X_OK):
        skip_or_fail("redis-cli is not installed (make sysdeps installs it)")
    return binary


def distinct_free_ports(count: int) -> list[int]:
    """distinct_free_ports returns count different loopback ports free a moment ago."""
    probes = []
    try:
        for _ in range(count):
            probe = socket.socket()
            probe.bind(("127.0.0.1", 0))
            probes.append(probe)
        return [int(probe.getsockname()[1]) for probe in probes]
    finally:
        for probe in probes:
            probe.close()


class RedisCluster:
    """RedisCluster is MASTERS masters with a replica each on free loopback ports."""

    def __init__(self, directory: Path) -> None:
        self.server_binary = require_redis()
        self.cli = require_redis_cli()
        self.directory = directory
        # client and cluster bus ports, all distinct (free_port alone may repeat a port
        # that was picked but not bound yet)
        ports = distinct_free_ports(4 * MASTERS)
        self.ports, self.bus_ports = ports[: 2 * MASTERS], ports[2 * MASTERS :]
        self.processes: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        """url names one node; a cluster client learns the others from it."""
        return f"redis://127.0.0.1:{self.ports[0]}/0"

    def start(self) -> None:
        """start runs the six servers, creates the cluster and waits until it serves."""
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            self._start_node(port, bus_port)
        for port in self.ports:
            wait_until(
                lambda p=port: "PONG" in self.cli_call(p, "PING"),  # type: ignore[misc]
                f"redis-server on {port} to answer",
                timeout=START_TIMEOUT,
            )
        addresses = [f"127.0.0.1:{port}" for port in self.ports]
        subprocess.run(
            [self.cli, "--cluster", "create", *addresses, "--cluster-replicas", "1"]
            + ["--cluster-yes"],
            check=True,
            capture_output=True,
            timeout=START_TIMEOUT,
        )
        wait_until(self.healthy, "the Redis Cluster to serve", timeout=START_TIMEOUT)

    def _start_node(self, port: int, bus_port: int) -> None:
        home = self.directory / f"node-{port}"
        home.mkdir(exist_ok=True)
        args = [self.server_binary, "--port", str(port), "--bind", "127.0.0.1"]
        args += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
        args += ["--cluster-port", str(bus_port), "--cluster-node-timeout", "2000"]
        args += ["--repl-diskless-sync-delay", "0"]  # replicas in sync at once, not after 5 s
        args += ["--save", "", "--appendonly", "no", "--dir", str(home)]
        self.processes[port] = subprocess.Popen(args, stdout=subprocess.DEVNULL)

    def cli_call(self, port: int, *command: str) -> str:
        """cli_call runs one command on the node at port and returns its text answer."""
        done = subprocess.run(
            [self.cli, "-p", str(port), *command],
            capture_output=True,
            timeout=10,
            check=False,
        )
        return done.stdout.decode()

    def healthy(self) -> bool:
        """healthy: every node says cluster_state:ok and knows all six nodes."""
        for port in self.ports:
            info = self.cli_call(port, "CLUSTER", "INFO")
            if (
                "cluster_state:ok" not in info
                or f"cluster_known_nodes:{len(self.ports)}" not in info
            ):
                return False
        return True

    def masters(self) -> list[int]:
        """masters returns the client ports of the current masters."""
        return [p for p in self.ports if "role:master" in self.cli_call(p, "INFO", "replication")]

    def replica_of(self, master_port: int) -> int:
        """replica_of returns the client port of a replica of the master at master_port."""
        for port in self.ports:
            info = self.cli_call(port, "INFO", "replication")
            if f"master_port:{master_port}" in info:
                return port
        raise AssertionError(f"no replica of {master_port}")

    def kill(self) -> None:
        """kill ends every server at once (SIGKILL): an outage of the whole cluster."""
        self.stop()

    def restart(self) -> None:
        """restart runs the servers again on their ports; each reloads the cluster's
        layout from its nodes.conf, so no create is needed."""
        for port, bus_port in zip(self.ports, self.bus_ports, strict=True):
            self._start_node(port, bus_port)
        wait_until(self.healthy, "the Redis Cluster to serve again", timeout=START_TIMEOUT)

    def stop(self) -> None:
        """stop kills every server by its PID."""
        for process in self.processes.values():
            if process.poll() is None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        self.processes.clear()
