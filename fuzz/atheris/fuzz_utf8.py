"""atheris target: lmw_utf8_check against Python's strict UTF-8 decoder.

The input is cut into fuzzer-chosen chunks and validated piece by piece, carrying the
state. Invariants: the verdict (valid, ends inside a character, invalid) equals that of
bytes.decode("utf-8") on the whole input; the reported offset is exactly the first byte
that no well-formed sequence allows (Unicode table 3-7, computed here independently), and
it lies inside Python's reported error span.
"""

from __future__ import annotations

import sys
from itertools import pairwise

from _harness import native, run

ffi, lib = native()

# For each lead byte: (sequence length, allowed range of the second byte).
LEADS: dict[int, tuple[int, int, int]] = {}
for _b in range(0xC2, 0xE0):
    LEADS[_b] = (2, 0x80, 0xBF)
for _b in range(0xE0, 0xF0):
    LEADS[_b] = (3, 0xA0 if _b == 0xE0 else 0x80, 0x9F if _b == 0xED else 0xBF)
for _b in range(0xF0, 0xF5):
    LEADS[_b] = (4, 0x90 if _b == 0xF0 else 0x80, 0x8F if _b == 0xF4 else 0xBF)


def first_invalid(data: bytes) -> tuple[int, bool]:
    """first_invalid returns (offset of the first invalid byte or -1, ends inside a char)."""
    i = 0
    n = len(data)
    while i < n:
        b = data[i]
        if b < 0x80:
            i += 1
            continue
        if b not in LEADS:
            return i, False
        size, lo, hi = LEADS[b]
        for k in range(1, size):
            if i + k >= n:
                return -1, True
            c = data[i + k]
            if not ((lo <= c <= hi) if k == 1 else (0x80 <= c <= 0xBF)):
                return i + k, False
        i += size
    return -1, False


def cuts(fdp_bytes: bytes, n: int) -> list[int]:
    """cuts turns control bytes into sorted chunk boundaries inside [0, n]."""
    points = {0, n}
    for b in fdp_bytes:
        if n:
            points.add(b * n // 255)
    return sorted(points)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    ncut = data[0] % 8
    control, text = data[1 : 1 + ncut], data[1 + ncut :]
    bounds = cuts(control, len(text))
    state = ffi.new("uint32_t *", 0)
    buf = ffi.from_buffer(text) if text else ffi.NULL
    bad = -1
    for a, b in pairwise(bounds):
        r = lib.lmw_utf8_check(state, buf + a if text else buf, b - a)
        assert r == -1 or 0 <= r < b - a, (r, a, b)
        if r >= 0:
            bad = a + r
            break
    expected, truncated = first_invalid(text)
    assert bad == expected, (bad, expected, text)
    try:
        text.decode("utf-8")
    except UnicodeDecodeError as exc:
        if bad < 0:
            assert truncated and exc.end == len(text), (exc, text)
            assert state[0] != lib.LMW_UTF8_ACCEPT
        else:
            assert exc.start <= bad <= exc.end, (exc.start, exc.end, bad, text)
    else:
        assert bad == -1 and state[0] == lib.LMW_UTF8_ACCEPT, (bad, state[0], text)


if __name__ == "__main__":
    sys.exit(run(test_one_input))  # type: ignore[func-returns-value]
