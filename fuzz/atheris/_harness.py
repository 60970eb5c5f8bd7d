"""Shared set-up of the atheris targets: which lowmemws to load, and how to run.

A target imported by the fuzzing driver (`python fuzz/atheris/fuzz_x.py ARGS`) loads the
instrumented copy from fuzz/build/atheris (LOWMEMWS_FUZZ_BUILD overrides the place) and
refuses to run without it. A target imported by the test suite, where lowmemws is already
imported, uses that normal module: the regression tests replay inputs through it.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
BUILD = os.environ.get(
    "LOWMEMWS_FUZZ_BUILD", os.path.join(os.path.dirname(HERE), "build", "atheris")
)


def native() -> tuple[Any, Any]:
    """native returns (ffi, lib) of the instrumented build, or of an already loaded lowmemws."""
    if "lowmemws" not in sys.modules and os.path.isdir(os.path.join(BUILD, "lowmemws")):
        sys.path.insert(0, BUILD)
    from lowmemws._native import ffi, lib

    return ffi, lib


def instrumented() -> bool:
    """instrumented reports whether the loaded extension is the sanitizer build."""
    module = sys.modules.get("lowmemws._lowmemws")
    path = os.path.realpath(getattr(module, "__file__", "") or "")
    return path.startswith(os.path.realpath(BUILD) + os.sep)


def run(test_one_input: Callable[[bytes], None]) -> None:
    """run hands test_one_input to libFuzzer with the command line's options."""
    import atheris

    if not instrumented():
        sys.exit(f"fuzz: {BUILD}/lowmemws is not built; run `make -C fuzz atheris-build`")
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
