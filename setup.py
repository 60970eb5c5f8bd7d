"""Only here because cffi_modules cannot be declared in pyproject.toml."""

import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext


class BuildExtWithClearError(build_ext):
    """Turns a missing C compiler into one sentence instead of a traceback."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, LinkError, CCompilerError...
            raise SystemExit(
                "lowmemws: building the C codec failed (%s); lowmemws needs a C compiler, "
                "the Python headers and zlib: on Debian/Ubuntu run "
                "'apt-get install gcc python3-dev zlib1g-dev', then install again." % (exc,)
            ) from exc


if not sys.platform.startswith("linux"):
    raise SystemExit("lowmemws runs on Linux only: its runtime is built on epoll, accept4 and eventfd.")

setup(
    cffi_modules=["src/lowmemws/_build_native.py:ffibuilder"],
    cmdclass={"build_ext": BuildExtWithClearError},
)
