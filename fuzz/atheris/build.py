"""Build an instrumented copy of lowmemws for the atheris targets.

The copy lives in fuzz/build/atheris/lowmemws: the package's Python files next to a
_lowmemws extension compiled by clang with AddressSanitizer, UBSan and libFuzzer's
coverage instrumentation (fuzzer-no-link: the libFuzzer runtime comes from atheris).
The targets put fuzz/build/atheris first on sys.path, so `import lowmemws` finds this
copy and never the uninstrumented one installed in the project's .venv.
The runtime's clock is fake_clock.c's (real time plus an offset that
lib.lmw_fuzz_clock_advance moves): the session target moves time without sleeping.

    python fuzz/atheris/build.py [OUTDIR]
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SRC = os.path.join(ROOT, "src", "lowmemws")
DEFAULT_OUT = os.path.join(ROOT, "fuzz", "build", "atheris")

SANITIZE = [
    "-g",
    "-O1",
    "-fno-omit-frame-pointer",
    "-fsanitize=address,undefined,fuzzer-no-link",
    "-fno-sanitize-recover=all",
]


def load_build_native():  # type: ignore[no-untyped-def]
    """load_build_native imports src/lowmemws/_build_native.py by path (cdef and sources)."""
    spec = importlib.util.spec_from_file_location(
        "_lowmemws_build_native", os.path.join(SRC, "_build_native.py")
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def copy_package(out: str) -> None:
    """copy_package puts the package's Python files (not the build script) and its data
    directories (static/: lowmemws.js, read when the package is imported) in out/lowmemws."""
    pkg = os.path.join(out, "lowmemws")
    if os.path.isdir(pkg):
        shutil.rmtree(pkg)
    os.makedirs(pkg)
    for name in sorted(os.listdir(SRC)):
        path = os.path.join(SRC, name)
        if name.endswith(".py") and name != "_build_native.py" or name == "py.typed":
            shutil.copy2(path, os.path.join(pkg, name))
        elif os.path.isdir(path) and not name.startswith(("_", ".")):
            shutil.copytree(path, os.path.join(pkg, name))


def build(out: str) -> str:
    """build compiles lowmemws._lowmemws with clang and the sanitizers into out."""
    native = load_build_native()
    copy_package(out)
    os.environ["CC"] = os.environ.get("FUZZ_CC", "clang")
    os.environ["LDSHARED"] = os.environ["CC"] + " -shared"
    flags = SANITIZE + os.environ.get("FUZZ_CFLAGS", "").split()
    ffi = FFI()
    ffi.cdef(native.cdef_text() + "\nvoid lmw_fuzz_clock_advance(uint64_t us);\n")
    ffi.set_source(
        "lowmemws._lowmemws",
        '#include "lmw.h"\nvoid lmw_fuzz_clock_advance(uint64_t us);',
        sources=[os.path.join(SRC, name) for name in native.SOURCES]
        + [os.path.join(HERE, "fake_clock.c")],
        include_dirs=[SRC],
        libraries=native.LIBRARIES,
        extra_compile_args=["-std=gnu11", "-Wall", "-Wno-unused-parameter"]
        + ["-Dclock_gettime=lmw_fuzz_clock_gettime"]
        + flags,
        extra_link_args=flags,
    )
    tmp = os.path.join(out, "tmp")
    os.makedirs(tmp, exist_ok=True)
    built = ffi.compile(tmpdir=tmp, verbose=False)
    target = os.path.join(out, "lowmemws", os.path.basename(built))
    shutil.move(built, target)
    return target


if __name__ == "__main__":
    print("fuzz: instrumented module", build(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT))
