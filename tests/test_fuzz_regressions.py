"""Inputs the fuzzers found, replayed through the normal lowmemws module.

fuzz/regressions/<target>/<name> are fuzzer inputs kept after a finding; each is fed to
the same harness the atheris target uses (fuzz/atheris/fuzz_<target>.py), here on top of
the installed extension instead of the sanitizer build. The direct tests below state
each finding without the harness.
"""

from __future__ import annotations

import importlib
import os
import socket
import sys
from collections.abc import Iterator

import pytest

from lowmemws import Config
from lowmemws._c_server import c_config
from lowmemws._native import ffi, lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HARNESS = os.path.join(ROOT, "fuzz", "atheris")
REGRESSIONS = os.path.join(ROOT, "fuzz", "regressions")
KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
HEAD = (
    b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: " + KEY + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
# Known, reported, not yet fixed in the C code: the test fails until then (xfail strict,
# so the fix shows up as XPASS and the marker must go). Empty: all found so far are fixed.
KNOWN: dict[tuple[str, str], str] = {}


def cases() -> Iterator[object]:
    for target in sorted(os.listdir(REGRESSIONS)) if os.path.isdir(REGRESSIONS) else []:
        for name in sorted(os.listdir(os.path.join(REGRESSIONS, target))):
            marks = []
            if (target, name) in KNOWN:
                marks.append(pytest.mark.xfail(reason=KNOWN[(target, name)], strict=True))
            yield pytest.param(target, name, id=f"{target}/{name}", marks=marks)


@pytest.fixture(autouse=True)
def harness_on_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(HARNESS)


@pytest.mark.parametrize(("target", "name"), list(cases()))
def test_replay(target: str, name: str) -> None:
    for module in ("_harness", "fuzz_utf8", f"fuzz_{target}"):
        sys.modules.pop(module, None)  # STRICT is read at import
    harness = importlib.import_module(f"fuzz_{target}")
    with open(os.path.join(REGRESSIONS, target, name), "rb") as f:
        data = f.read()
    harness.test_one_input(data)


def masked(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    mask = b"\x11\x22\x33\x44"
    body = bytes(x ^ mask[i & 3] for i, x in enumerate(payload))
    return bytes([(0x80 if fin else 0) | opcode, 0x80 | len(payload)]) + mask + body


def run_server(frames: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """run_server sends an upgrade and frames over a socketpair; returns events and output."""
    cfg = Config(max_connections=64, read_buffer_size=4096, read_buffers=2, ping_interval=0)
    server = lib.lmw_server_new(c_config(cfg, auto_upgrade=True), ffi.NULL)
    ours, theirs = socket.socketpair()
    try:
        theirs.setblocking(False)
        assert lib.lmw_adopt(server, theirs.detach()) == 0
        ours.sendall(HEAD + frames)
        events: list[tuple[int, int, bytes]] = []
        out = ffi.new("lmw_event **")
        for _ in range(4):
            n = lib.lmw_poll(server, 20, out, 16)
            for i in range(n):
                e = out[0][i]
                data = bytes(ffi.buffer(e.data, e.len)) if e.type == lib.LMW_EV_MESSAGE else b""
                events.append((e.type, e.code, data))
        ours.settimeout(1)
        return events, ours.recv(65536)
    finally:
        lib.lmw_server_free(server)
        ours.close()


@pytest.mark.parametrize(
    "frames",
    [masked(1, b"ok\xd6"), masked(1, b"ok", fin=False) + masked(0, b"\xe2\x82")],
    ids=["single", "fragmented"],
)
def test_text_ending_inside_a_character_is_not_delivered(frames: bytes) -> None:
    # RFC 6455 8.1: a text message that is not valid UTF-8 fails the connection (1007); the
    # application must not receive it (found by fuzz_session: a MESSAGE event with b"\xd6").
    events, output = run_server(frames)
    assert output.endswith(b"\x88\x02\x03\xef")  # close 1007
    messages = [data for kind, _, data in events if kind == lib.LMW_EV_MESSAGE]
    assert messages == []
