"""A build without OpenSSL (what `pip install .` makes when libssl-dev is missing; forced here
with LOWMEMWS_TLS=0): plain TCP works as always, and asking for TLS is a clear TLSError."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "lowmemws"

BUILD = """
import importlib.util
spec = importlib.util.spec_from_file_location("build", "lowmemws/_build_native.py")
build = importlib.util.module_from_spec(spec)
spec.loader.exec_module(build)
assert build.SOURCES[-1] == "_tls_off.c", build.SOURCES
build.ffibuilder.compile(tmpdir=".")
"""

USE = """
import ssl, websocket
import lowmemws
assert not lowmemws.tls_available()
gateway = lowmemws.Gateway("127.0.0.1", 0)
gateway.on_message(lambda conn, message: conn.send(message))
with gateway:
    ws = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=10)
    ws.send("plain TCP still works")
    assert ws.recv() == "plain TCP still works"
    ws.close()
tls = lowmemws.Gateway("127.0.0.1", 0, config=lowmemws.Config(certfile="c.pem", keyfile="k.pem"))
try:
    tls.start()
except lowmemws.TLSError as exc:
    print(exc)
finally:
    tls.stop()
"""


def test_build_without_openssl_serves_plain_tcp_and_refuses_tls(tmp_path: Path) -> None:
    shutil.copytree(SRC, tmp_path / "lowmemws", ignore=shutil.ignore_patterns("*.so", "*.o"))
    env = {**os.environ, "LOWMEMWS_TLS": "0"}
    subprocess.run([sys.executable, "-c", BUILD], cwd=tmp_path, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    used = subprocess.run([sys.executable, "-c", USE], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)  # fmt: skip
    assert used.returncode == 0, used.stderr
    assert used.stdout.strip() == (
        "lowmemws was built without OpenSSL: install libssl-dev (Debian/Ubuntu) or "
        "openssl-devel, then reinstall lowmemws"
    )
