"""cffi build script (out-of-line API mode) for lowmemws._lowmemws.

lmw.h is both the C header and the cdef: lines starting with '#' are dropped, except
'#define NAME <integer>' which cffi understands as a constant.
"""

import os
import re
import shlex
import subprocess
import sysconfig
import tempfile

from cffi import FFI

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = [
    "_frame.c",
    "_slot.c",
    "_hub.c",
    "_interest.c",
    "_bus_filter.c",
    "_bus_wait.c",
    "_output.c",
    "_spill.c",
    "_deflate.c",
    "_conn.c",
    "_input.c",
    "_fanout.c",
    "_paced.c",
    "_presence.c",
    "_user_names.c",
    "_server.c",
]
LIBRARIES = ["z"]  # zlib, a system library, for permessage-deflate (_deflate.c)
# TLS (docs/tls.md) needs OpenSSL >= 3.0's headers (Debian: libssl-dev); without them the
# build still succeeds, with _tls_off.c in their place (plain TCP only).
TLS_SOURCES = ["_tls_keys.c", "_tls_record.c", "_tls_pages.c", "_tls_conn.c", "_tls_input.c"]
TLS_LIBRARIES = ["ssl", "crypto"]
_OPENSSL_PROBE = """#include <openssl/ssl.h>
#if OPENSSL_VERSION_NUMBER < 0x30000000L
#error OpenSSL 3.0 or later is needed
#endif
int main(void) { return SSL_CTX_set_num_tickets(SSL_CTX_new(TLS_server_method()), 0) != 1; }
"""
_INT_DEFINE = re.compile(r"^#define\s+\w+\s+-?\d+\s*(/\*.*\*/)?\s*$")


def cdef_text() -> str:
    """cdef_text returns lmw.h reduced to what cffi's cdef parser accepts."""
    with open(os.path.join(HERE, "lmw.h")) as header:
        lines = header.read().splitlines()
    kept = [line for line in lines if not line.startswith("#") or _INT_DEFINE.match(line)]
    return "\n".join(kept)


def openssl_found() -> bool:
    """openssl_found tells whether a program using OpenSSL 3 compiles and links here.

    LOWMEMWS_TLS=0 in the environment builds without TLS even when OpenSSL is present.
    """
    if os.environ.get("LOWMEMWS_TLS") == "0":
        return False
    compiler = shlex.split(sysconfig.get_config_var("CC") or "cc")
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as probe:
            probe.write(_OPENSSL_PROBE)
        command = [*compiler, source, "-o", os.path.join(tmp, "probe"), "-lssl", "-lcrypto"]
        try:
            return subprocess.run(command, capture_output=True).returncode == 0
        except OSError:
            return False


if openssl_found():
    SOURCES += TLS_SOURCES
    LIBRARIES += TLS_LIBRARIES
else:
    SOURCES.append("_tls_off.c")

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
