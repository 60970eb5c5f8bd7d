"""Fixtures of the adversarial tests: a gateway with small caps and short deadlines, a
control client that must stay served, and the server's RSS bound.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from adversary import Control, rss_bytes, start_gateway

from support.servers import ServerProcess

MiB = 1 << 20

#: Small caps and short deadlines so every limit is reached in well under a second or two.
SMALL_LIMITS: dict[str, object] = {
    "handshake_timeout": 1.0,
    "close_timeout": 1.0,
    "max_head": 2048,
    "max_http_body": 4096,
    "max_message_size": 1 * MiB,
    "spill_budget": 8 * MiB,
}

#: What the attacks of one test may add to the server's RSS over its warmed-up figure: the
#: spill budget (8 MiB) and the read pool (16 x 64 KiB) plus allocator slack.
RSS_MARGIN = 24 * MiB


class Guarded:
    """Guarded is a running gateway, its control client and its RSS bound.

    still_serving() is what every adversarial test ends with: the control client's echo
    works and the server's RSS is within RSS_MARGIN of its figure after warm-up.
    """

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.control = Control(server)
        self.control.echo_ok()
        self.baseline = rss_bytes(server.pid)
        self.peak = self.baseline

    def rss(self) -> int:
        """rss is the server's RSS now (and updates the peak seen)."""
        now = rss_bytes(self.server.pid)
        self.peak = max(self.peak, now)
        return now

    def still_serving(self) -> None:
        """still_serving asserts the control echo and the RSS bound."""
        assert self.server.proc.poll() is None, f"server died:\n{self.server.output()}"
        self.control.echo_ok()
        rss = self.rss()
        assert rss <= self.baseline + RSS_MARGIN, (
            f"server RSS {rss / MiB:.1f} MiB, over {self.baseline / MiB:.1f} MiB + "
            f"{RSS_MARGIN / MiB:.0f} MiB"
        )


@pytest.fixture(scope="module")
def guarded() -> Iterator[Guarded]:
    """guarded is one small-limits gateway shared by a module, with its control client."""
    server = start_gateway(SMALL_LIMITS)
    try:
        rig = Guarded(server)
        yield rig
        rig.control.close()
    finally:
        server.stop()
