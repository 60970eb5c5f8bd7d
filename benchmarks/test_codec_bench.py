"""Codec micro-benchmarks, lowmemws beside wsproto (and websockets' mask) in one run.

Run with: pytest benchmarks/test_codec_bench.py --benchmark-enable
Each group times the same input through each implementation; no timing is asserted,
but every benchmark checks its result so a broken codec cannot look fast.
"""

from __future__ import annotations

import codecs
import os
import sys
from collections.abc import Callable
from typing import Any

import pytest
from wsproto import ConnectionType, WSConnection
from wsproto.events import AcceptConnection, Request, TextMessage
from wsproto.frame_protocol import XorMaskerSimple

from lowmemws._native import ffi, lib
from lowmemws.codec import build_frame, parse_request

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from tests.support.http_samples import BROWSER_REQUEST  # noqa: E402

Bench = Any  # pytest-benchmark's fixture
MASK = b"\x37\xfa\x21\x3d"
PAYLOAD_64K = os.urandom(64 * 1024)
TEXT_64K = ("The quick brown fox jumps over the lazy dog, café € " * 1300)[:65536].encode()[:65536]
SMALL_FRAME = build_frame(1, b"new mail: 3 unread", mask=MASK)


def websockets_apply_mask() -> Callable[[bytes, bytes], bytes] | None:
    try:
        from websockets.speedups import apply_mask
    except ImportError as exc:
        print(f"websockets.speedups.apply_mask not importable ({exc}); column skipped")
        return None
    return apply_mask  # type: ignore[no-any-return]


# ---------------------------------------------------------------------------------------
# Upgrade parse of a ~600 B browser request with cookies
# ---------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="upgrade-parse")
def test_upgrade_parse_lowmemws_c(benchmark: Bench) -> None:
    req = ffi.new("lmw_request *")
    size = len(BROWSER_REQUEST)

    def parse() -> int:
        req.scanned = 0
        return int(lib.lmw_parse_request(BROWSER_REQUEST, size, 8192, req))

    assert benchmark(parse) == size and req.kind == lib.LMW_KIND_UPGRADE


@pytest.mark.benchmark(group="upgrade-parse")
def test_upgrade_parse_lowmemws_codec_py(benchmark: Bench) -> None:
    result = benchmark(parse_request, BROWSER_REQUEST)
    assert result is not None and result.is_upgrade


@pytest.mark.benchmark(group="upgrade-parse")
def test_upgrade_parse_wsproto(benchmark: Bench) -> None:
    def parse() -> object:
        conn = WSConnection(ConnectionType.SERVER)
        conn.receive_data(BROWSER_REQUEST)
        return next(conn.events())

    assert isinstance(benchmark(parse), Request)


# ---------------------------------------------------------------------------------------
# Small masked text frame
# ---------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="small-frame")
def test_small_frame_lowmemws_c(benchmark: Bench) -> None:
    f = ffi.new("lmw_frame *")
    buf = bytearray(SMALL_FRAME)
    ptr = ffi.from_buffer(buf)

    def parse() -> int:
        n = lib.lmw_parse_frame(ptr, len(buf), 0, 1, f)
        lib.lmw_unmask(ptr + n, f.payload_len, f.mask, 0)
        lib.lmw_unmask(ptr + n, f.payload_len, f.mask, 0)  # restore for the next round
        return int(n)

    assert benchmark(parse) == 6


@pytest.mark.benchmark(group="small-frame")
def test_small_frame_wsproto(benchmark: Bench) -> None:
    conn = WSConnection(ConnectionType.SERVER)
    client = WSConnection(ConnectionType.CLIENT)
    conn.receive_data(client.send(Request(host="example.com", target="/")))
    next(conn.events())
    conn.send(AcceptConnection())

    def parse() -> object:
        conn.receive_data(SMALL_FRAME)
        return next(conn.events())

    event = benchmark(parse)
    assert isinstance(event, TextMessage) and event.data == "new mail: 3 unread"


# ---------------------------------------------------------------------------------------
# Unmask 64 KiB
# ---------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="unmask-64k")
def test_unmask_lowmemws(benchmark: Bench) -> None:
    buf = bytearray(PAYLOAD_64K)
    ptr = ffi.from_buffer(buf)
    benchmark(lib.lmw_unmask, ptr, len(buf), MASK, 0)
    assert len(buf) == 65536


@pytest.mark.benchmark(group="unmask-64k")
def test_unmask_wsproto(benchmark: Bench) -> None:
    out = benchmark(lambda: XorMaskerSimple(MASK).process(PAYLOAD_64K))
    assert len(out) == 65536 and out[:1] == bytes([PAYLOAD_64K[0] ^ MASK[0]])


@pytest.mark.benchmark(group="unmask-64k")
def test_unmask_websockets_speedups(benchmark: Bench) -> None:
    apply_mask = websockets_apply_mask()
    if apply_mask is None:
        pytest.skip("websockets.speedups is not installed (pip install -e '.[bench]')")
    out = benchmark(apply_mask, PAYLOAD_64K, MASK)
    assert len(out) == 65536


# ---------------------------------------------------------------------------------------
# UTF-8 validation of 64 KiB of mostly-ASCII text
# ---------------------------------------------------------------------------------------


@pytest.mark.benchmark(group="utf8-64k")
def test_utf8_lowmemws(benchmark: Bench) -> None:
    state = ffi.new("uint32_t *")

    def check() -> int:
        state[0] = 0
        return int(lib.lmw_utf8_check(state, TEXT_64K, len(TEXT_64K)))

    assert benchmark(check) == -1


@pytest.mark.benchmark(group="utf8-64k")
def test_utf8_wsproto_incremental_decoder(benchmark: Bench) -> None:
    # wsproto validates text with Python's incremental UTF-8 decoder.
    def check() -> str:
        return str(codecs.getincrementaldecoder("utf-8")().decode(TEXT_64K, final=False))

    assert len(benchmark(check)) > 60000
