"""The TLS 1.3 key schedule of the record layer against RFC 8448 section 3 ("Simple 1-RTT
Handshake"): HKDF-Expand-Label (RFC 8446 section 7.1) of the application traffic secrets to
their write key and IV (section 7.3)."""

from __future__ import annotations

import hashlib
import hmac

import pytest

from lowmemws import tls_available
from lowmemws._native import ffi, lib
from tests.support.ci import skip_or_fail

# RFC 8448 section 3, {client} and {server} "derive write traffic keys for application data"
CLIENT_AP_SECRET = "9e40646ce79a7f9dc05af8889bce6552875afa0b06df0087f792ebb7c17504a5"
SERVER_AP_SECRET = "a11af9f05531f856ad47116b45a950328204b4f44bfb6b3a4b4f1f3fcb631643"
VECTORS = [
    (CLIENT_AP_SECRET, "key", 16, "17422dda596ed5d9acd890e3c63f5051"),
    (CLIENT_AP_SECRET, "iv", 12, "5b78923dee08579033e523d9"),
    (SERVER_AP_SECRET, "key", 16, "9f02283b6c9c07efc26bb9f2ac92e356"),
    (SERVER_AP_SECRET, "iv", 12, "cf782b88dd83549aadf1e984"),
]


@pytest.fixture(autouse=True)
def _needs_tls() -> None:
    if not tls_available():
        skip_or_fail("lowmemws was built without OpenSSL (install libssl-dev and rebuild)")


def expand_label(secret: bytes, label: str, length: int, sha384: bool = False) -> bytes:
    out = ffi.new("uint8_t[]", length)
    label_c = ffi.new("char[]", label.encode())
    r = lib.lmw_tls_expand_label(
        int(sha384), secret, len(secret), label_c, ffi.NULL, 0, out, length
    )
    assert r == 0
    return bytes(ffi.buffer(out, length))


def reference_expand_label(secret: bytes, label: str, length: int, digest: str) -> bytes:
    """HKDF-Expand-Label written from RFC 5869 and RFC 8446 7.1 with Python's hmac."""
    full = b"tls13 " + label.encode()
    info = length.to_bytes(2, "big") + bytes([len(full)]) + full + b"\x00"
    out, block = b"", b""
    for i in range(1, 256):
        if len(out) >= length:
            break
        block = hmac.new(secret, block + info + bytes([i]), digest).digest()
        out += block
    return out[:length]


@pytest.mark.parametrize("secret, label, length, expected", VECTORS)
def test_rfc8448_application_traffic_keys(
    secret: str, label: str, length: int, expected: str
) -> None:
    assert expand_label(bytes.fromhex(secret), label, length).hex() == expected


@pytest.mark.parametrize("sha384", [False, True])
def test_key_update_secret_matches_the_rfc_construction(sha384: bool) -> None:
    """application_traffic_secret_N+1 = HKDF-Expand-Label(secret_N, "traffic upd", "", Hash
    length) (RFC 8446 7.2), for SHA-256 and SHA-384 suites."""
    digest = "sha384" if sha384 else "sha256"
    size = hashlib.new(digest).digest_size
    secret = bytes(range(size))
    got = expand_label(secret, "traffic upd", size, sha384)
    assert got == reference_expand_label(secret, "traffic upd", size, digest)


def test_expand_label_refuses_oversized_labels() -> None:
    out = ffi.new("uint8_t[]", 16)
    label = ffi.new("char[]", b"x" * 250)
    assert lib.lmw_tls_expand_label(0, b"k" * 32, 32, label, ffi.NULL, 0, out, 16) == -1
