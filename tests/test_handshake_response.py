"""Response(content_type=...) cannot smuggle headers (issue 16, defect 8).

A content type with CR or LF was written as it was, so
``content_type="text/plain\\r\\nSet-Cookie: sid=evil"`` became two headers on the wire: the
client saw a cookie the application never set. It is refused like a header value with CR
or LF (and NUL) is.
"""

from __future__ import annotations

import pytest

from lowmemws.handshake import Response


@pytest.mark.parametrize(
    "content_type",
    [
        "text/plain\r\nSet-Cookie: sid=evil",
        "text/plain\nSet-Cookie: sid=evil",
        "text/plain\rSet-Cookie: sid=evil",
        "text/plain\x00",
    ],
)
def test_content_type_with_cr_lf_or_nul_is_refused(content_type: str) -> None:
    """Defect 8: a client would see a second header (Set-Cookie) in the answer."""
    with pytest.raises(ValueError):
        Response(200, b"ok", content_type=content_type).encode()


def test_a_plain_content_type_is_one_header() -> None:
    head = Response(200, b"ok", content_type="application/json; charset=utf-8").encode()
    lines = head.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
    assert lines[1] == b"Content-Type: application/json; charset=utf-8"
    assert not any(line.lower().startswith(b"set-cookie") for line in lines)
