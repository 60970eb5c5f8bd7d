"""Missing tools skip a test on a developer's machine but fail it in CI (CI=true)."""

from __future__ import annotations

import os

import pytest


def in_ci() -> bool:
    """in_ci tells whether the tests run in CI, where nothing may be skipped."""
    return os.environ.get("CI") == "true"


def skip_or_fail(reason: str) -> None:
    """skip_or_fail skips the test with reason, or fails it with reason under CI=true."""
    if in_ci():
        pytest.fail(
            f"{reason} (CI=true: required, so this fails instead of skipping)", pytrace=False
        )
    pytest.skip(reason)
