"""Values that C and Python share, read from the compiled module: C is their one source.

lmw.h exports them as ``#define`` constants (cffi turns each into an attribute of lib) or
as functions that answer for a value (lmw_close_code_index, lmw_reject_response). Python
keeps no literal copy; the few names Python needs (policy names, metric labels, header
names) are derived from the C names, and a mismatch fails at import, not at run time.
"""

from __future__ import annotations

from typing import Literal, get_args

from ._native import ffi, lib

Policy = Literal["drop", "close", "latest"]
"""Policy is what a fan-out does to a connection whose output is past its write limit:
"drop" the message (counted), "close" the connection with 1008, or keep only the
"latest" pending message of that topic (LMW_POLICY_* in lmw.h; checked at import)."""

OP_TEXT: int = lib.LMW_OP_TEXT
"""OP_TEXT is the opcode of a text frame (RFC 6455 section 5.2)."""
OP_BINARY: int = lib.LMW_OP_BINARY
"""OP_BINARY is the opcode of a binary frame (RFC 6455 section 5.2)."""

CLOSE_REASON_MAX: int = lib.LMW_CLOSE_REASON_MAX
"""CLOSE_REASON_MAX is the longest close reason in bytes (RFC 6455 section 5.5.1)."""


def _suffixes(prefix: str, count_name: str) -> dict[str, int]:
    """_suffixes maps the lower-cased rest of every lib constant named prefix + X (except
    the count) to its value."""
    return {
        name[len(prefix) :].lower(): int(getattr(lib, name))
        for name in dir(lib)
        if name.startswith(prefix) and name != count_name
    }


def _policies() -> dict[Policy, int]:
    found = _suffixes("LMW_POLICY_", "")
    if set(found) != set(get_args(Policy)):
        raise ImportError(f"lowmemws: the C policies {sorted(found)} differ from Policy")
    return {name: found[name] for name in get_args(Policy)}


POLICIES: dict[Policy, int] = _policies()
"""POLICIES maps each slow-consumer policy name to its LMW_POLICY_* value."""


def _by_value(names: dict[str, int], count: int, what: str) -> tuple[str, ...]:
    ordered = tuple(sorted(names, key=names.__getitem__))
    if [names[n] for n in ordered] != list(range(count)):
        raise ImportError(f"lowmemws: the C {what} are not numbered 0..{count - 1}")
    return ordered


DROP_REASONS: tuple[str, ...] = _by_value(
    _suffixes("LMW_DROP_", "LMW_DROP_REASONS"), lib.LMW_DROP_REASONS, "drop reasons"
)
"""DROP_REASONS names lmw_stats.dropped[i], e.g. "write_limit" for LMW_DROP_WRITE_LIMIT."""

ERROR_KINDS: tuple[str, ...] = _by_value(
    _suffixes("LMW_ERR_", "LMW_ERRORS"), lib.LMW_ERRORS, "error kinds"
)
"""ERROR_KINDS names lmw_stats.errors[i], e.g. "nomem" for LMW_ERR_NOMEM."""

TLS_OUTCOMES: tuple[str, ...] = _by_value(
    _suffixes("LMW_TLS_", "LMW_TLS_COUNTERS"), lib.LMW_TLS_COUNTERS, "TLS outcomes"
)
"""TLS_OUTCOMES names lmw_stats.tls[i], e.g. "bad_record_mac" for LMW_TLS_BAD_RECORD_MAC."""

KNOWN_HEADERS: dict[str, int] = {
    name.replace("_", "-"): index for name, index in _suffixes("LMW_H_", "LMW_H_COUNT").items()
}
"""KNOWN_HEADERS maps a lower-case header name to its index in lmw_request.headers."""
_by_value(KNOWN_HEADERS, lib.LMW_H_COUNT, "known headers")


def _close_code_labels() -> tuple[str, ...]:
    """_close_code_labels asks lmw_close_code_index which code each slot of
    lmw_stats.closes counts; every close code is in 1000-4999 (RFC 6455 section 7.4)."""
    other = lib.LMW_CLOSE_CODES - 1
    labels = ["other"] * lib.LMW_CLOSE_CODES
    for code in range(1000, 5000):
        index = lib.lmw_close_code_index(code)
        if index != other:
            labels[index] = str(code)
    if "other" in labels[:other]:
        raise ImportError("lowmemws: a slot of lmw_stats.closes counts no close code")
    return tuple(labels)


CLOSE_CODE_LABELS: tuple[str, ...] = _close_code_labels()
"""CLOSE_CODE_LABELS names lmw_stats.closes[i]: a close code, then "other" for the rest."""


def _reject_statuses() -> frozenset[int]:
    """_reject_statuses asks lmw_reject_response which statuses have a prebuilt response."""
    length = ffi.new("size_t *")
    return frozenset(s for s in range(100, 600) if lib.lmw_reject_response(s, length) != ffi.NULL)


REJECT_STATUSES: frozenset[int] = _reject_statuses()
"""REJECT_STATUSES are the HTTP statuses lmw_reject_response has built at start-up."""


def _check_array_lengths() -> None:
    """The cdef's array lengths must be the counts lmw.h defines for them."""
    expected = {
        ("lmw_request", "headers"): lib.LMW_H_COUNT,
        ("lmw_stats", "closes"): lib.LMW_CLOSE_CODES,
        ("lmw_stats", "dropped"): lib.LMW_DROP_REASONS,
        ("lmw_stats", "errors"): lib.LMW_ERRORS,
    }
    for (struct, field), count in expected.items():
        length = dict(ffi.typeof(struct).fields)[field].type.length
        if length != count:
            raise ImportError(f"lowmemws: {struct}.{field} has {length} slots, not {count}")


_check_array_lengths()
