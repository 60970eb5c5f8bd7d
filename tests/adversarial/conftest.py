"""Fixtures of the adversarial tests: a gateway with small caps and short deadlines, a
control client that must stay served, and the server's RSS bound.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.adversarial.adversary import SMALL_LIMITS, Guarded, guarded_gateway


@pytest.fixture(scope="module")
def guarded() -> Iterator[Guarded]:
    """guarded is one small-limits gateway shared by a module, with its control client."""
    with guarded_gateway(SMALL_LIMITS) as rig:
        yield rig
