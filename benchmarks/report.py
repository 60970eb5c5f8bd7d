"""report: what every benchmark does around its measurement, shared by every benchmark.

The loop over the servers (skipping the unusable ones, and a failed one without losing the
others' figures), the summary of repeated rounds, the Markdown table, and the command line
that prints the table and writes the JSON record.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from serverctl import ALL_SERVERS, usable


def each_server(
    names: Iterable[str], measure: Callable[[str], dict[str, Any]], log: Any = print
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """each_server measures every usable server in turn: returns the rows and the skipped ones.

    A server that cannot run here, or whose measurement fails, is logged and listed in the
    second value with the reason, so a broken server does not hide the others' figures.
    """
    rows: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    for name in names:
        ok, why = usable(name)
        if not ok:
            log(f"  {name}: skipped ({why})")
            skipped[name] = why
            continue
        try:
            rows.append(measure(name))
        except Exception as exc:  # a broken server must not hide the others' figures
            log(f"  {name}: failed ({exc})")
            skipped[name] = f"failed: {exc}"
    return rows, skipped


def spread(values: Sequence[float]) -> dict[str, float]:
    """spread summarises repeated measurements: median, min, max and the count."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def median_range(s: dict[str, float], fmt: str) -> str:
    """median_range formats a spread as ``median (min-max)``, each with the format ``fmt``."""
    return f"{s['median']:{fmt}} ({s['min']:{fmt}}-{s['max']:{fmt}})"


def table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """table renders a Markdown table (also readable on a terminal)."""
    rows = [[str(c) for c in r] for r in rows]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def parser(doc: str | None) -> argparse.ArgumentParser:
    """parser starts a benchmark's command line, with its module docstring as the help."""
    return argparse.ArgumentParser(description=doc, formatter_class=argparse.RawTextHelpFormatter)


def add_servers(p: argparse.ArgumentParser) -> None:
    """add_servers adds ``--servers a,b`` (default: every server) to a command line."""
    p.add_argument("--servers", default=",".join(ALL_SERVERS))


def main(
    p: argparse.ArgumentParser,
    argv: list[str] | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
) -> dict[str, Any]:
    """main adds ``--json``, parses the command line and runs; prints the table, writes JSON."""
    p.add_argument("--json", help="also write the figures to this file")
    a = p.parse_args(argv)
    result = run(a)
    print(render(result))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result
