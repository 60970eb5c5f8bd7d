"""RedisBus over TLS (``rediss://``): a real redis-server that listens only on a TLS port
with a test CA's certificate, two RedisBus nodes in this process.

A TLS link's bytes must pass through Python's ssl, so its subscriber reads in Python (the C
filter still judges) while plain sockets are read by the C wait loop: this keeps that second
path honest.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowmemws import RedisBus
from lowmemws.bus import Envelope
from tests.support.ci import skip_or_fail
from tests.support.redis_server import require_redis
from tests.support.servers import free_port
from tests.support.tls import make_certificates
from tests.support.waiting import wait_until

DEADLINE = 20.0  # bounds every wait; not a performance figure


@pytest.fixture
def tls_redis_url() -> Iterator[str]:
    """tls_redis_url is the ``rediss://`` URL (trusting the test CA) of a fresh
    redis-server listening on a TLS port only; killed and removed at teardown."""
    binary = require_redis()
    directory = Path(tempfile.mkdtemp(prefix="lmw-tls-redis-", dir="/tmp"))
    certs = make_certificates(directory)
    port = free_port()
    args = [binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1"]
    args += ["--tls-cert-file", str(certs.cert), "--tls-key-file", str(certs.key)]
    args += ["--tls-ca-cert-file", str(certs.ca), "--tls-auth-clients", "no"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(port) or process.poll() is not None, "redis-server", 10)
        if process.poll() is not None:
            skip_or_fail("redis-server refused the TLS options (built without TLS?)")
        ca = urllib.parse.quote(str(certs.ca), safe="")
        yield f"rediss://127.0.0.1:{port}/0?ssl_ca_certs={ca}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


def listening(port: int) -> bool:
    """listening tells whether something accepts TCP connections on the loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_two_nodes_exchange_topic_user_and_broadcast_over_tls(tls_redis_url: str) -> None:
    got_a: list[Envelope] = []
    got_b: list[Envelope] = []
    a = RedisBus(tls_redis_url, backoff_cap=0.3)
    b = RedisBus(tls_redis_url, backoff_cap=0.3)
    a.start(got_a.append)
    b.start(got_b.append)
    try:
        assert a.wait_ready(DEADLINE) and b.wait_ready(DEADLINE)
        links = list(b._links.values())
        assert links and all(link.native is None for link in links)  # read through ssl
        sent = [
            Envelope.for_topic("mail", "new mail"),
            Envelope.for_user(7, b"\x00\xff"),
            Envelope.for_all("maintenance at noon"),
        ]
        for envelope in sent:
            a.publish(envelope)
        wait_until(lambda: len(got_b) == 3, "node b to receive over TLS", timeout=DEADLINE)
        assert got_b == sent
        assert got_a == sent  # delivered locally; its own echoes skipped
    finally:
        a.close(timeout=1)
        b.close(timeout=1)
