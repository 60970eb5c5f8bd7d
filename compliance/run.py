"""Run Autobahn|Testsuite's fuzzing client against the lowmemws echo server and judge it.

Usage (from the repository root, after ``bash compliance/setup.sh``)::

    .venv/bin/python compliance/run.py [--cases '1.*' '2.*' ...] [--timeout 1200]

Starts the echo server (``$LOWMEMWS_ECHO_CMD``, default ``<python> -m lowmemws echo``) on a
free loopback port with ``--max-message-size 16777216`` (the 9.* cases send up to 16 MiB),
runs ``wstest -m fuzzingclient`` with a spec made from compliance/fuzzingclient.json, stops
the server by PID and reads the suite's ``index.json``.

Strict judgement: a case passes only when both its "behavior" and its "behaviorClose" are OK
or INFORMATIONAL; NON-STRICT, FAILED and UNIMPLEMENTED fail it. Every case wstest announced
must have a result.

Output: one summary line per field with the count of each result, the ids of the cases that
are not OK, a last line ``autobahn: N cases, N passed, N failed (strict)``, and
compliance/reports/summary.json. Exit status: 0 when every case passed, 1 when some did not,
2 when the run itself broke (server did not start, wstest crashed or timed out).
"""

from __future__ import annotations

import argparse
import ast
import collections
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))  # for tests.support

from tests.support.servers import ServerProcess, ServerStartError, start_echo_server  # noqa: E402

TEMPLATE = HERE / "fuzzingclient.json"
DEFAULT_REPORTS = HERE / "reports"
DEFAULT_WSTEST = ROOT / ".venv27" / "bin" / "wstest"
MAX_MESSAGE_SIZE = 16 * 1024 * 1024
AGENT = "lowmemws"
FIELDS = ("behavior", "behaviorClose")
RESULTS = ("OK", "NON-STRICT", "FAILED", "INFORMATIONAL", "UNIMPLEMENTED")
PASSING = frozenset({"OK", "INFORMATIONAL"})
EXIT_PASSED, EXIT_FAILED, EXIT_BROKEN = 0, 1, 2


class HarnessError(RuntimeError):
    """HarnessError: the run could not judge the server (as opposed to the server failing)."""


def case_key(case_id: str) -> tuple[int, ...]:
    """case_key orders case ids numerically: 1.1.2 before 1.1.10."""
    return tuple(int(part) for part in case_id.split("."))


def write_spec(reports: Path, port: int, cases: list[str] | None) -> Path:
    """write_spec fills the template with the server URL and report directory."""
    spec: dict[str, Any] = json.loads(TEMPLATE.read_text())
    spec["outdir"] = str(reports)
    spec["servers"][0]["agent"] = AGENT
    spec["servers"][0]["url"] = f"ws://127.0.0.1:{port}"
    if cases:
        spec["cases"] = cases
    path = reports / "fuzzingclient.generated.json"
    path.write_text(json.dumps(spec, indent=2) + "\n")
    return path


def run_wstest(wstest: Path, spec: Path, log_path: Path, timeout: float) -> None:
    """run_wstest runs the fuzzing client to completion, its output going to log_path."""
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [str(wstest), "-m", "fuzzingclient", "-s", str(spec)],
            cwd=spec.parent,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            status = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            message = f"wstest did not finish within {timeout:.0f} s; see {log_path}"
            raise HarnessError(message) from None
    if status != 0:
        raise HarnessError(f"wstest exited with status {status}; see {log_path}")


def announced_cases(log_text: str) -> list[str]:
    """announced_cases returns the case ids wstest said it would run ("Cases = [...]")."""
    for line in log_text.splitlines():
        if line.startswith("Cases = "):
            return [str(case) for case in ast.literal_eval(line[len("Cases = ") :])]
    raise HarnessError("wstest did not announce its cases")


def load_results(reports: Path) -> dict[str, dict[str, Any]]:
    """load_results returns {case id: result} for the agent from the suite's index.json."""
    index_path = reports / "index.json"
    if not index_path.exists():
        raise HarnessError(f"wstest wrote no {index_path}")
    index: dict[str, dict[str, dict[str, Any]]] = json.loads(index_path.read_text())
    if AGENT not in index:
        raise HarnessError(f"{index_path} has no results for agent {AGENT!r}")
    return index[AGENT]


def judge(results: dict[str, dict[str, Any]], expected: list[str]) -> dict[str, Any]:
    """judge counts each field's results and lists the cases that fail strict judgement."""
    missing = sorted(set(expected) - set(results), key=case_key)
    counts = {
        field: collections.Counter(r.get(field, "?") for r in results.values()) for field in FIELDS
    }
    not_ok = {field: {} for field in FIELDS}  # type: dict[str, dict[str, list[str]]]
    failed: list[str] = []
    for case_id in sorted(results, key=case_key):
        outcome = results[case_id]
        for field in FIELDS:
            if outcome.get(field) != "OK":
                not_ok[field].setdefault(str(outcome.get(field)), []).append(case_id)
        if any(outcome.get(field) not in PASSING for field in FIELDS):
            failed.append(case_id)
    return {
        "cases": len(results),
        "expected": len(expected),
        "passed": len(results) - len(failed),
        "failed": failed,
        "missing": missing,
        "counts": {field: dict(counts[field]) for field in FIELDS},
        "not_ok": not_ok,
    }


def print_summary(summary: dict[str, Any], server_exit: int | None, seconds: float) -> None:
    """print_summary prints the per-field counts, the non-OK cases and the verdict line."""
    for field in FIELDS:
        counts = summary["counts"][field]
        others = sorted(set(counts) - set(RESULTS))
        shown = [f"{name} {counts.get(name, 0)}" for name in (*RESULTS, *others)]
        print(f"{field:>13}: " + ", ".join(shown))
        for result, case_ids in sorted(summary["not_ok"][field].items()):
            print(f"{'':>15}{result}: {' '.join(case_ids)}")
    if summary["missing"]:
        print(f"missing results: {' '.join(summary['missing'])}")
    print(f"server exit code after SIGTERM: {server_exit}; run took {seconds:.0f} s")
    print(
        f"autobahn: {summary['cases']} cases, {summary['passed']} passed, "
        f"{len(summary['failed']) + len(summary['missing'])} failed (strict)"
    )


def run(args: argparse.Namespace) -> int:
    """run performs one compliance run and returns the exit status."""
    reports: Path = args.reports.resolve()
    reports.mkdir(parents=True, exist_ok=True)
    for stale in ("index.json", "summary.json"):
        (reports / stale).unlink(missing_ok=True)
    if not args.wstest.exists():
        raise HarnessError(f"{args.wstest} not found: run 'bash compliance/setup.sh' first")
    started = time.monotonic()
    server: ServerProcess = start_echo_server(["--max-message-size", str(MAX_MESSAGE_SIZE)])
    print(f"server: {server.ready_line} (pid {server.pid})", flush=True)
    log_path = reports / "wstest.log"
    try:
        spec = write_spec(reports, server.port, args.cases)
        run_wstest(args.wstest, spec, log_path, args.timeout)
    finally:
        server_exit = server.stop()
    expected = announced_cases(log_path.read_text(errors="replace"))
    summary = judge(load_results(reports), expected)
    summary["server_exit_code"] = server_exit
    (reports / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, server_exit, time.monotonic() - started)
    print(f"reports: {reports / 'index.html'}")
    all_passed = not summary["failed"] and not summary["missing"] and summary["cases"] > 0
    return EXIT_PASSED if all_passed else EXIT_FAILED


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", help="case patterns instead of the template's")
    parser.add_argument("--timeout", type=float, default=2400.0, help="seconds for the whole run")
    parser.add_argument("--reports", type=Path, default=DEFAULT_REPORTS)
    parser.add_argument("--wstest", type=Path, default=DEFAULT_WSTEST)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return run(args)
    except (HarnessError, ServerStartError) as exc:
        print(f"compliance: {exc}", file=sys.stderr)
        return EXIT_BROKEN


if __name__ == "__main__":
    sys.exit(main())
