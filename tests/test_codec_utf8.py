"""Specification of the incremental UTF-8 validator (RFC 3629; RFC 6455 section 8.1).

Python's own decoder is the reference: valid means bytes.decode("utf-8") accepts it, and
"fails at the first bad byte" means the bytes before the reported offset can still be
completed into text Python accepts, while one more byte makes that impossible.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmemws._native import ffi, lib
from lowmemws.codec import Utf8Validator, validate_utf8
from tests.support.guarded_page import GuardedPage


def python_valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


# Second bytes at the edges of every range in Unicode table 3-7: enough to complete any
# prefix that can be completed at all.
_EDGES = (0x80, 0x8F, 0x90, 0x9F, 0xA0, 0xBF)


def continuable(data: bytes) -> bool:
    """continuable: some continuation of data is valid UTF-8 (data has no bad byte yet)."""
    tails = [b""]
    for _ in range(4):
        for tail in tails:
            if python_valid(data + tail):
                return True
        tails = [t + bytes([e]) for t in tails for e in _EDGES]
    return False


def assert_reference(data: bytes, result: int) -> None:
    """assert_reference checks a result of validate_utf8 against Python's decoder."""
    if python_valid(data):
        assert result == -1
    elif result == len(data):
        assert continuable(data)  # ends inside a character
    else:
        assert 0 <= result < len(data)
        assert continuable(data[:result]) and not continuable(data[: result + 1])


VALID = [
    b"",
    b"plain ascii",
    "héllo wörld".encode(),
    "€ 中文 日本語".encode(),
    "😀🚀 emoji".encode(),
    "\u0080\u07ff\u0800\uffff\U00010000\U0010ffff".encode(),
    "\ud7ff\ue000".encode(),  # around the surrogate block
    b"\x00\x7f",
    ("a" * 100 + "é" + "b" * 100).encode(),
]

INVALID = [
    (b"\x80", 0, "lone continuation byte"),
    (b"ab\xbf", 2, "continuation byte after ASCII"),
    (b"\xc0\x80", 0, "overlong NUL (C0)"),
    (b"\xc1\xbf", 0, "overlong (C1)"),
    (b"\xe0\x80\x80", 1, "overlong 3-byte"),
    (b"\xe0\x9f\xbf", 1, "overlong 3-byte, top"),
    (b"\xf0\x80\x80\x80", 1, "overlong 4-byte"),
    (b"\xf0\x8f\xbf\xbf", 1, "overlong 4-byte, top"),
    (b"\xed\xa0\x80", 1, "surrogate U+D800"),
    (b"\xed\xbf\xbf", 1, "surrogate U+DFFF"),
    (b"\xf4\x90\x80\x80", 1, "above U+10FFFF"),
    (b"\xf5\x80\x80\x80", 0, "F5 lead"),
    (b"\xff", 0, "FF"),
    (b"\xfe", 0, "FE"),
    (b"\xc3(", 1, "ASCII where a continuation is due"),
    (b"\xe2\x82(", 2, "truncated 3-byte then ASCII"),
    ("κόσμε".encode() + b"\xce\xbaX\xce", 14, "Autobahn 6.3-like"),
    (b"x" * 40 + b"\xed\xa0\x80", 41, "surrogate after a long ASCII run"),
]


@pytest.mark.parametrize("data", VALID)
def test_valid_text(data: bytes) -> None:
    assert python_valid(data)
    assert validate_utf8(data) == -1


@pytest.mark.parametrize(
    ("data", "offset"), [(d, o) for d, o, _ in INVALID], ids=[n for _, _, n in INVALID]
)
def test_invalid_text_reports_the_first_bad_byte(data: bytes, offset: int) -> None:
    assert not python_valid(data)
    assert validate_utf8(data) == offset
    assert_reference(data, offset)


@pytest.mark.parametrize("data", ["€".encode()[:2], "😀".encode()[:3], b"abc\xc3"])
def test_text_ending_inside_a_character_is_incomplete_not_invalid(data: bytes) -> None:
    validator = Utf8Validator()
    assert validator.feed(data) == -1
    assert not validator.complete
    assert validate_utf8(data) == len(data)


def test_a_failed_validator_stays_failed() -> None:
    validator = Utf8Validator()
    assert validator.feed(b"\xff") == 0
    assert validator.feed(b"ok") == 0
    assert not validator.complete


@pytest.mark.parametrize("data", [d for d in VALID if d] + [d for d, _, _ in INVALID])
def test_byte_by_byte_and_every_split_agree_with_whole(data: bytes) -> None:
    whole = validate_utf8(data)
    for cut in range(len(data) + 1):
        assert split_result(data, [cut]) == whole
    assert split_result(data, list(range(1, len(data)))) == whole


def split_result(data: bytes, cuts: list[int]) -> int:
    """split_result validates data fed in pieces, returning the offset within data."""
    validator = Utf8Validator()
    edges = [0, *sorted(set(cuts)), len(data)]
    for a, b in zip(edges, edges[1:], strict=False):
        offset = validator.feed(data[a:b])
        if offset >= 0:
            return a + offset
    return -1 if validator.complete else len(data)


# ---------------------------------------------------------------------------------------
# Property tests: agreement with Python's decoder in any chunking
# ---------------------------------------------------------------------------------------

# Bytes drawn to hit the interesting ranges often: ASCII, continuations, every lead.
utf8ish = st.lists(
    st.one_of(
        st.integers(0x00, 0x7F),
        st.integers(0x80, 0xBF),
        st.sampled_from([0xC0, 0xC1, 0xC2, 0xDF, 0xE0, 0xED, 0xEF, 0xF0, 0xF4, 0xF5, 0xFF]),
        st.integers(0x80, 0xFF),
    ),
    max_size=64,
).map(bytes)
mostly_valid = st.tuples(st.text(max_size=40), utf8ish, st.text(max_size=40)).map(
    lambda t: t[0].encode("utf-8", "surrogatepass") + t[1] + t[2].encode("utf-8", "surrogatepass")
)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(utf8ish, mostly_valid), st.lists(st.integers(0, 150), max_size=6))
def test_agrees_with_python_in_any_chunking(data: bytes, cuts: list[int]) -> None:
    whole = validate_utf8(data)
    assert_reference(data, whole)
    assert split_result(data, [c for c in cuts if c <= len(data)]) == whole


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_any_python_string_is_valid(text: str) -> None:
    assert validate_utf8(text.encode()) == -1


@settings(max_examples=300, deadline=None)
@given(st.integers(0xD800, 0xDFFF), st.text(max_size=20))
def test_every_surrogate_is_invalid(code: int, prefix: str) -> None:
    data = prefix.encode() + chr(code).encode("utf-8", "surrogatepass")
    assert validate_utf8(data) == len(prefix.encode()) + 1


def test_ascii_fast_path_finds_a_bad_byte_at_every_position() -> None:
    for length in range(1, 80):
        for at in range(length):
            data = bytearray(b"a" * length)
            data[at] = 0xFF
            assert validate_utf8(bytes(data)) == at


def test_state_carries_through_the_c_api() -> None:
    state = ffi.new("uint32_t *", lib.LMW_UTF8_ACCEPT)
    euro = "€".encode()
    assert lib.lmw_utf8_check(state, euro[:1], 1) == -1
    assert state[0] != lib.LMW_UTF8_ACCEPT
    assert lib.lmw_utf8_check(state, euro[1:], 2) == -1
    assert state[0] == lib.LMW_UTF8_ACCEPT


# ---------------------------------------------------------------------------------------
# No over-read: input placed right before a PROT_NONE page
# ---------------------------------------------------------------------------------------


def test_validator_never_reads_past_the_input() -> None:
    guarded = GuardedPage()
    samples = [b"a" * n for n in range(70)] + ["é€😀".encode() * 3, b"x" * 33 + b"\xe2\x82"]
    for data in samples:
        for cut in range(len(data) + 1):
            piece = data[:cut]
            state = ffi.new("uint32_t *", 0)
            result = lib.lmw_utf8_check(state, guarded.place(piece), len(piece))
            assert result == -1
