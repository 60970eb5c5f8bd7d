"""The house rules of the source tree, checked on the source itself (STYLE.md, issue 10):

- one file makes every state change of a connection: no `state =` outside _conn.c;
- the runtime's C files form layers: no file calls into a file that calls back into it;
- no Python module of lowmemws imports one that imports it back (imports needed only for
  type checking, under ``if TYPE_CHECKING:``, do not count: they never run).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lowmemws"
# _tls_off.c stands in for the TLS files in a build without OpenSSL (the same names)
RUNTIME_C = sorted(p for p in PACKAGE.glob("_*.c") if p.name not in ("_frame.c", "_tls_off.c"))
STATE_ASSIGNMENT = re.compile(r"(->|\.)state\s*=[^=]")
DEFINITION = re.compile(r"^[a-z][\w \*]*?\b(lmw__\w+)\(", re.M)
CALL = re.compile(r"\b(lmw__\w+)\(")


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """find_cycle returns one cycle of the graph as a list of nodes, or None."""
    done: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return [*path[path.index(node) :], node]
        if node in done:
            return None
        for nxt in sorted(edges.get(node, ())):
            cycle = visit(nxt, [*path, node])
            if cycle:
                return cycle
        done.add(node)
        return None

    for start in sorted(edges):
        cycle = visit(start, [])
        if cycle:
            return cycle
    return None


def test_only_the_state_machine_file_changes_a_state() -> None:
    found = [
        f"{path.name}:{number}: {line.strip()}"
        for path in RUNTIME_C
        if path.name != "_conn.c"
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if STATE_ASSIGNMENT.search(line)
    ]
    assert found == []


def test_the_runtime_files_form_layers() -> None:
    defined_in = {
        name: path.name for path in RUNTIME_C for name in DEFINITION.findall(path.read_text())
    }
    calls = {
        path.name: {
            defined_in[name]
            for name in CALL.findall(path.read_text())
            if defined_in.get(name, path.name) != path.name
        }
        for path in RUNTIME_C
    }
    assert len(defined_in) > 20, "the definition pattern no longer finds the functions"
    assert find_cycle(calls) is None, f"a cycle between runtime files: {find_cycle(calls)}"
    # _tls_conn.c is storage too: a TLS connection's state and the sealing of its output
    assert calls["_output.c"] <= {"_slot.c", "_tls_conn.c"}, "the write path only uses storage"
    # paced fan-out sits beside _fanout.c: it sends through the state machine, reads the hub,
    # compresses through the zlib pool (storage level, like _spill.c)
    allowed = {"_conn.c", "_hub.c", "_deflate.c", "_slot.c"}
    assert calls["_paced.c"] <= allowed, "paced sends stay a layer"
    assert calls["_deflate.c"] <= {"_slot.c"}, "compression only uses storage"


def runtime_imports(path: Path) -> set[str]:
    """runtime_imports lists the lowmemws modules path imports when it runs."""
    tree = ast.parse(path.read_text())
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("lowmemws."):
            found.add((node.module or "").split(".")[1])
    return found


def test_no_python_module_imports_one_that_imports_it_back() -> None:
    modules = {path.stem: path for path in PACKAGE.glob("*.py")}
    edges = {
        name: {dep for dep in runtime_imports(path) if dep in modules and dep != name}
        for name, path in modules.items()
    }
    assert edges["server"], "the import pattern no longer finds the imports"
    assert find_cycle(edges) is None, f"an import cycle: {find_cycle(edges)}"
