"""Storms: every client of a gateway coming back at once after it restarts.

The page of the demo reconnects with exponential backoff and jitter; here thousands of raw
clients do the same after a server restart, in jittered waves, while a control client that
reconnected first keeps its echo working.
"""

from __future__ import annotations

import random
import time

from tests.adversarial.adversary import Guarded, close_code, start_gateway, upgrade_head
from tests.adversarial.crowd import SOURCES, Crowd
from tests.support.servers import ServerProcess

CLIENTS = 5000
WAVES = 10  # clients come back in waves, a jittered 20-120 ms apart
LIMITS: dict[str, object] = {"handshake_timeout": 5.0, "close_timeout": 2.0}


def test_mass_reconnect_after_a_restart() -> None:
    server = start_gateway(LIMITS)
    restarted: ServerProcess | None = None
    crowds: list[Crowd] = []
    try:
        before = Crowd(server, CLIENTS, sources=SOURCES[3], hello=upgrade_head(server))
        before.upgrade()
        assert server.stop() == 0  # SIGTERM: every client is told 1001 (going away)
        sample = random.Random(7).sample(before.socks, 200)
        assert {close_code(sock) for sock in sample} == {1001}
        before.close()

        restarted = ServerProcess(server.argv, server.host, server.port)  # the same port
        restarted.wait_ready(30)
        rig = Guarded(restarted)
        head = upgrade_head(restarted)
        jitter = random.Random(11)
        for wave in range(WAVES):
            time.sleep(jitter.uniform(0.02, 0.12))
            crowd = Crowd(restarted, CLIENTS // WAVES, sources=SOURCES[wave % 3], hello=head)
            crowds.append(crowd)
            crowd.upgrade()  # every one of them gets its 101
            rig.control.echo_ok()  # and the first one back is served all along
        rig.still_serving()
        rig.control.close()
    finally:
        for crowd in crowds:
            crowd.close()
        server.stop()
        if restarted is not None:
            restarted.stop()
