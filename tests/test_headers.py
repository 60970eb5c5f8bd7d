"""Headers: a request's header fields as a read-only, case-insensitive mapping."""

from __future__ import annotations

import pytest

from lowmemws import Headers

FIELDS = [("Host", "a"), ("X-Tag", "one"), ("Accept", "*/*"), ("x-tag", "two")]


def test_lookup_ignores_case_and_gives_the_first_value() -> None:
    headers = Headers(FIELDS)
    assert headers["x-TAG"] == "one"
    assert headers.get("HOST") == "a"
    assert headers.get("missing") is None
    with pytest.raises(KeyError):
        headers["missing"]


def test_every_value_and_every_field_in_order() -> None:
    headers = Headers(FIELDS)
    assert headers.get_all("X-Tag") == ["one", "two"]
    assert headers.get_all("missing") == []
    assert headers.raw_items() == tuple(FIELDS)


def test_each_name_once_as_first_spelled() -> None:
    headers = Headers(FIELDS)
    assert list(headers) == ["Host", "X-Tag", "Accept"]
    assert len(headers) == 3
    assert "ACCEPT" in headers and 1 not in headers
    assert dict(headers.items()) == {"Host": "a", "X-Tag": "one", "Accept": "*/*"}


def test_it_cannot_be_changed() -> None:
    headers = Headers(FIELDS)
    with pytest.raises(TypeError):
        headers["Host"] = "b"  # type: ignore[index]
    assert not hasattr(headers, "__setitem__")
