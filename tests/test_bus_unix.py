"""RedisBus, Publisher and the Redis history store over a ``unix://`` URL: a real
redis-server listening only on a unix socket (no TCP port), a gateway node with history, a
Publisher in the same process, and a lowmemws.client client that drops its link and
resumes.

redis-py's unix socket connection refuses the TCP keepalive option the bus passes to TCP
connections; before the fix the bus's threads died on their first connect and nothing
travelled.
"""

from __future__ import annotations

import asyncio
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from lowmemws import Accept, Config, Gateway, History, Publisher, RedisBus
from lowmemws.client import Client, Delivery, Refresh
from tests.support.redis_server import require_redis
from tests.support.waiting import wait_until

DEADLINE = 20.0  # bounds every wait; not a performance figure


@pytest.fixture
def unix_redis_url() -> Iterator[str]:
    """unix_redis_url is the ``unix://`` URL of a fresh redis-server that listens on a unix
    socket in a /tmp directory of its own (short: a socket path has at most 107 bytes) and on
    no TCP port; killed and removed at teardown."""
    binary = require_redis()
    directory = Path(tempfile.mkdtemp(prefix="lmw-unix-", dir="/tmp"))
    socket_path = directory / "redis.sock"
    args = [binary, "--port", "0", "--unixsocket", str(socket_path), "--unixsocketperm", "700"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(directory)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        wait_until(socket_path.exists, "redis-server's unix socket", timeout=10)
        yield f"unix://{socket_path}"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=10)
        shutil.rmtree(directory, ignore_errors=True)


async def take(client: Client, count: int) -> list[Delivery | Refresh]:
    return [await client.next(DEADLINE) for _ in range(count)]


def texts(events: list[Delivery | Refresh]) -> list[object]:
    return [e.data if isinstance(e, Delivery) else ("refresh", e.stream) for e in events]


def test_a_unix_socket_url_carries_publish_send_to_user_and_history_resume(
    unix_redis_url: str,
) -> None:
    bus = RedisBus(unix_redis_url, backoff_cap=0.3)
    gateway = Gateway("127.0.0.1", 0, bus=bus, config=Config(history=History()))

    @gateway.on_connect
    def decide(request: object) -> Accept:
        return Accept(user=7, topics=("mail",))

    gateway.start()
    publisher = Publisher(unix_redis_url, history=History())
    try:
        assert bus.wait_ready(DEADLINE), "the gateway's RedisBus never came up on the socket"
        assert publisher.wait_ready(DEADLINE), "the Publisher never came up on the socket"
        assert bus.sharded is True  # redis-server 7+: sharded pub/sub, as over TCP

        async def scenario() -> None:
            async with Client(f"ws://127.0.0.1:{gateway.port}/", backoff_base=0.05) as client:
                await asyncio.wait_for(client.connected.wait(), DEADLINE)
                publisher.publish("mail", "m1")
                publisher.send_to_user(7, "u1")
                assert sorted(texts(await take(client, 2)), key=str) == ["m1", "u1"]
                client.drop_link()  # as a network failure: no close frame
                await asyncio.sleep(0.05)
                for n in (2, 3, 4):
                    publisher.publish("mail", f"m{n}")
                publisher.send_to_user(7, "u2")
                gateway.publish("mail", "m5")  # the gateway's own bus stores in Redis too
                events = await take(client, 5)
                assert sorted(texts(events), key=str) == ["m2", "m3", "m4", "m5", "u2"]
                mail = [e.data for e in events if isinstance(e, Delivery) and e.stream == "t:mail"]
                assert mail == ["m2", "m3", "m4", "m5"]  # once each, in order
                assert client.connects == 2
                publisher.send_to_user(7, "u3")  # live again after the replay
                assert texts(await take(client, 1)) == ["u3"]
                assert client.positions["t:mail"][1] == 5
                assert client.positions["u:7"][1] == 3

        asyncio.run(scenario())
        assert bus.stats.snapshot()["reconnects"] == 0
    finally:
        publisher.close()
        gateway.stop(timeout=10)
