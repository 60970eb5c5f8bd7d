"""Autobahn|Testsuite cases 1.* to 10.*, 12.* and 13.* (permessage-deflate) against the echo
server: every case OK, strict. 12.* and 13.* (216 cases, 1,000 messages each through the suite's
own Python 2 client) take most of the run: about 11 minutes on the 2-core machine.

Runs compliance/setup.sh (a Python 2.7 virtualenv with wstest, built once) and then
compliance/run.py in subprocesses, so the test sees exactly what a developer running the
harness by hand sees. A case passes when both its behavior and its close behavior are OK or
INFORMATIONAL; NON-STRICT counts as a failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.ci import skip_or_fail

ROOT = Path(__file__).resolve().parent.parent
COMPLIANCE = ROOT / "compliance"
NO_PYTHON27 = 3  # compliance/setup.sh's exit status when no Python 2.7 is found
SETUP_TIMEOUT = 900.0
RUN_TIMEOUT = 2700.0  # compliance/run.py's own limit on wstest; the subprocess gets more


@pytest.mark.slow
def test_autobahn_cases_1_to_10_12_13_all_ok(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    setup = subprocess.run(
        ["bash", str(COMPLIANCE / "setup.sh")],
        capture_output=True,
        text=True,
        timeout=SETUP_TIMEOUT,
    )
    if setup.returncode == NO_PYTHON27:
        skip_or_fail(f"Autobahn|Testsuite needs Python 2.7: {setup.stderr.strip()}")
    assert setup.returncode == 0, f"compliance/setup.sh failed:\n{setup.stdout}{setup.stderr}"

    reports = tmp_path / "reports"
    run = subprocess.run(
        [
            sys.executable,
            str(COMPLIANCE / "run.py"),
            "--reports",
            str(reports),
            "--timeout",
            str(RUN_TIMEOUT),
        ],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT + 120,
    )
    with capsys.disabled():  # the counts belong in every test log, passing or not
        print("\n" + run.stdout, end="")
    assert run.returncode in (0, 1), f"the compliance run broke:\n{run.stdout}{run.stderr}"
    summary = json.loads((reports / "summary.json").read_text())
    assert summary["cases"] == summary["expected"] > 0
    assert summary["missing"] == []
    assert summary["failed"] == [], run.stdout
    assert summary["passed"] == summary["cases"]
    assert run.returncode == 0, run.stdout
