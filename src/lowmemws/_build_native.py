"""cffi build script (out-of-line API mode) for lowmemws._lowmemws.

lmw.h is both the C header and the cdef: lines starting with '#' are dropped, except
'#define NAME <integer>' which cffi understands as a constant.
"""

import os
import re

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    "_frame.c",
    "_slot.c",
    "_hub.c",
    "_interest.c",
    "_output.c",
    "_spill.c",
    "_deflate.c",
    "_conn.c",
    "_input.c",
    "_fanout.c",
    "_paced.c",
    "_presence.c",
    "_server.c",
]
LIBRARIES = ["z"]  # zlib, a system library, for permessage-deflate (_deflate.c)
_INT_DEFINE = re.compile(r"^#define\s+\w+\s+-?\d+\s*(/\*.*\*/)?\s*$")


def cdef_text() -> str:
    """cdef_text returns lmw.h reduced to what cffi's cdef parser accepts."""
    with open(os.path.join(HERE, "lmw.h")) as header:
        lines = header.read().splitlines()
    kept = [line for line in lines if not line.startswith("#") or _INT_DEFINE.match(line)]
    return "\n".join(kept)


ffibuilder = FFI()
ffibuilder.cdef(cdef_text())
ffibuilder.set_source(
    "lowmemws._lowmemws",
    '#include "lmw.h"',
    sources=[os.path.relpath(os.path.join(HERE, name)) for name in SOURCES],
    include_dirs=[os.path.relpath(HERE)],
    libraries=LIBRARIES,
    extra_compile_args=["-O2", "-std=gnu11", "-Wall", "-Wextra", "-Wno-unused-parameter"]
    + os.environ.get("LOWMEMWS_CFLAGS", "").split(),
    extra_link_args=os.environ.get("LOWMEMWS_LDFLAGS", "").split(),
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
