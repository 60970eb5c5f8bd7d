"""The application's view of a request, and its answers: Accept, Reject, Response.

RFC 6455 section 4.2 (the opening handshake) and RFC 7230 (HTTP/1.1 messages).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie
from typing import Any
from urllib.parse import parse_qsl

from ._constants import KNOWN_HEADERS, REJECT_STATUSES
from ._native import ffi, lib
from ._user_ids import INT_USER_MAX, check_str_user
from ._wire_envelope import ENVELOPE_PROTOCOL, RESUME_PARAM, parse_resume
from .headers import Headers


class Request:
    """Request is the view of a request head (and body) given to on_connect and on_http.

    VALID ONLY DURING THE HOOK: for a plain hook run on the loop thread it is a zero-copy
    view of a pooled read buffer; for an ``async def`` hook or one run on a hook thread it
    is a copy of the head (and body), valid until the hook returns. Its strings are decoded
    on access; keep what you need (``str`` values are copies, and so is `headers`), never
    the Request itself.

    Raises:
        RuntimeError: from any property or method used after the hook returned.
    """

    __slots__ = ("_data", "_req", "_head_len", "_valid", "_body_len", "_headers", "_keep")

    def __init__(self, data: Any, head_len: int, req: Any, body_len: int = 0) -> None:
        self._data = ffi.cast("char *", data)
        self._req = req
        self._head_len = head_len
        self._body_len = body_len
        self._valid = True
        self._headers: Headers | None = None
        self._keep: Any = None

    @classmethod
    def _copy(cls, data: Any, head_len: int, req: Any, body_len: int = 0) -> Request:
        """_copy is a Request over a copy of a borrowed head (+ body) and its parse, for a
        hook that outlives the loop turn (the C side keeps only the handshake waiting)."""
        raw = ffi.new("char[]", max(1, head_len + body_len))
        ffi.memmove(raw, data, head_len + body_len)
        parsed = ffi.new("lmw_request *")
        ffi.memmove(parsed, req, ffi.sizeof("lmw_request"))
        request = cls(raw, head_len, parsed, body_len)
        request._keep = raw  # the cdata owns the bytes the view points into
        return request

    def _check(self) -> None:
        if not self._valid:
            raise RuntimeError(
                "lowmemws: a Request is valid only during the hook it was passed to; "
                "copy what you need (its str values) before returning"
            )

    def _text(self, span: Any) -> str:
        return str(ffi.unpack(self._data + span.off, span.len).decode("latin-1"))

    def _invalidate(self) -> None:
        self._valid = False
        self._data = None
        self._req = None
        self._keep = None

    @property
    def method(self) -> str:
        """method is the request method, e.g. "GET"."""
        self._check()
        return self._text(self._req.method)

    @property
    def path(self) -> str:
        """path is the request target up to '?', e.g. "/ws"."""
        self._check()
        return self._text(self._req.path)

    @property
    def query(self) -> str:
        """query is the raw query string after '?', or ""."""
        self._check()
        return self._text(self._req.query)

    @property
    def params(self) -> dict[str, str]:
        """params is the query string decoded into a dict (last value wins)."""
        query = self.query
        if "%" in query or "+" in query:
            return dict(parse_qsl(query, keep_blank_values=True))
        params = {}
        for pair in query.split("&"):  # the common case, without escapes: a quick split
            if pair:
                key, _, value = pair.partition("=")
                params[key] = value
        return params

    def header(self, name: str) -> str | None:
        """header returns the value of the header called name (case-insensitive), or None.

        For a repeated header other than the WebSocket ones, the first value is returned.
        """
        self._check()
        lname = name.lower()
        known = KNOWN_HEADERS.get(lname)
        if known is not None:
            if not (self._req.present >> known) & 1:
                return None
            return self._text(self._req.headers[known])
        return self.headers.get(lname)

    @property
    def headers(self) -> Headers:
        """headers is every header field, as a read-only case-insensitive mapping.

        It is a copy, made on first access (the head is parsed once more, in C); for one of
        the headers the parser indexes (Host, Origin, Cookie, ...) header() is quicker.
        """
        self._check()
        if self._headers is None:
            self._headers = Headers(self._fields())
        return self._headers

    def _fields(self) -> Iterator[tuple[str, str]]:
        pos = ffi.new("uint32_t *", 0)
        name = ffi.new("lmw_span *")
        value = ffi.new("lmw_span *")
        data = ffi.cast("uint8_t *", self._data)
        while lib.lmw_header_next(data, self._head_len, pos, name, value):
            yield self._text(name), self._text(value)

    @property
    def cookies(self) -> Mapping[str, str]:
        """cookies is the Cookie header decoded into a dict; malformed cookies are skipped."""
        raw = self.header("cookie")
        if not raw:
            return {}
        jar: SimpleCookie = SimpleCookie()
        try:
            jar.load(raw)
        except CookieError:
            return {}
        return {key: morsel.value for key, morsel in jar.items()}

    @property
    def subprotocols(self) -> list[str]:
        """subprotocols lists the Sec-WebSocket-Protocol values the client offered."""
        raw = self.header("sec-websocket-protocol") or ""
        return [p.strip() for p in raw.split(",") if p.strip()]

    @property
    def body(self) -> bytes:
        """body is a copy of the request body (plain HTTP requests; b"" for upgrades)."""
        self._check()
        return bytes(ffi.unpack(self._data + self._head_len, self._body_len))

    def __repr__(self) -> str:
        if not self._valid:
            return "<Request (expired)>"
        return f"<Request {self.method} {self.path}>"


class Accept:
    """Accept answers on_connect: upgrade the connection.

    user: the user id for send_to_user, online and disconnect_user: an int in 0..2**63-1
    (0 = none) or a non-empty str of at most 256 bytes of UTF-8 (see `Connection.user` for
    what it costs); topics: topic names to subscribe to; subprotocol: the
    Sec-WebSocket-Protocol to confirm (one the client offered).
    One is made per upgrade, so it is a plain slotted class: cheap to build.

    Raises:
        ValueError: an int user outside 0..2**63-1 (the upper half of the 64-bit tags is
            for str ids), an empty str or one over 256 bytes of UTF-8.
        TypeError: a user that is neither an int nor a str.
    """

    __slots__ = ("user", "topics", "subprotocol", "resume")

    def __init__(
        self, user: int | str = 0, topics: tuple[str, ...] = (), subprotocol: str | None = None
    ) -> None:
        if isinstance(user, str):
            try:
                check_str_user(user)
            except ValueError as exc:
                raise ValueError(f"Accept.user: {exc}") from None
        elif not isinstance(user, int) or isinstance(user, bool):
            raise TypeError(f"Accept.user is an int or a str, not {type(user).__name__}")
        elif not 0 <= user <= INT_USER_MAX:
            raise ValueError("Accept.user: an int user id lies in 0..2**63-1")
        self.user = user
        self.topics = topics
        self.subprotocol = subprotocol
        self.resume: dict[str, tuple[str, int]] | None = None
        """resume: the positions a client of the envelope subprotocol resumes from (its
        ``lmw_resume`` query parameter), set by the gateway; None for no resume."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Accept) and (self.user, self.topics, self.subprotocol) == (
            other.user,
            other.topics,
            other.subprotocol,
        )

    def __hash__(self) -> int:
        return hash((self.user, self.topics, self.subprotocol))

    def __repr__(self) -> str:
        return (
            f"Accept(user={self.user!r}, topics={self.topics!r}, subprotocol={self.subprotocol!r})"
        )


class Reject:
    """Reject answers on_connect with an HTTP status and no upgrade.

    status must be one of the responses built at start-up (lmw_reject_response): 400,
    401, 403, 404, 405, 408, 413, 426, 429, 431, 500, 501, 503, 505. 429 Too Many Requests
    and 503 carry ``Retry-After: 1``.

    Raises:
        ValueError: a status with no response built at start-up.
    """

    __slots__ = ("status",)

    def __init__(self, status: int = 403) -> None:
        if status not in REJECT_STATUSES:
            raise ValueError(f"Reject status must be one of {sorted(REJECT_STATUSES)}")
        self.status = status

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Reject) and self.status == other.status

    def __hash__(self) -> int:
        return hash(self.status)

    def __repr__(self) -> str:
        return f"Reject({self.status})"


_REASONS = {
    200: "OK",
    201: "Created",
    202: "Accepted",
    204: "No Content",
    301: "Moved Permanently",
    302: "Found",
    303: "See Other",
    304: "Not Modified",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Response:
    """Response answers on_http: status, body and headers; the connection closes after it."""

    status: int = 200
    body: bytes | str = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if any(c in self.content_type for c in "\r\n\0"):
            raise ValueError("Response content_type may not contain CR, LF or NUL")

    def encode(self) -> bytes:
        """encode returns the complete HTTP/1.1 response.

        Raises:
            ValueError: a header name or value contains CR or LF (response splitting).
        """
        body = self.body.encode("utf-8") if isinstance(self.body, str) else self.body
        reason = _REASONS.get(self.status, "Status")
        lines = [
            f"HTTP/1.1 {self.status} {reason}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(body)}",
            "Connection: close",
        ]
        for key, value in self.headers.items():
            if "\r" in key or "\n" in key or "\r" in value or "\n" in value:
                raise ValueError("header names and values may not contain CR or LF")
            lines.append(f"{key}: {value}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


_ACCEPT = Accept()


def check_origin(request: Request, origins: tuple[str, ...] | None) -> Reject | None:
    """check_origin refuses (403) an Origin not in ``origins`` (RFC 6455 section 10.2)."""
    if origins is not None and request.header("origin") not in origins:
        return Reject(403)
    return None


def conclude(request: Request, decision: object, subprotocols: tuple[str, ...]) -> Accept | Reject:
    """conclude checks what on_connect returned and chooses the subprotocol: the one the
    Accept names, else the first of ``subprotocols`` the client offered, else none
    (RFC 6455 section 4.2.2).

    Raises:
        TypeError: the hook returned something other than Accept, Reject or None (a
            coroutine from a plain function is named as such: declare the hook async def).
        ValueError: the Accept names a subprotocol the client did not offer.
    """
    if isinstance(decision, Reject):
        return decision
    if decision is not None and not isinstance(decision, Accept):
        raise TypeError(wrong_type("on_connect", decision, "Accept, Reject or None"))
    accept = _with_subprotocol(request, decision or _ACCEPT, subprotocols)
    return _with_resume(request, accept)


def _with_resume(request: Request, accept: Accept) -> Accept | Reject:
    """_with_resume reads the positions of a client of the envelope subprotocol that
    resumes (docs/envelope.md); a malformed lmw_resume parameter gets HTTP 400."""
    if accept.subprotocol != ENVELOPE_PROTOCOL or RESUME_PARAM not in request.query:
        return accept
    text = request.params.get(RESUME_PARAM)
    if text is None:
        return accept
    try:
        positions = parse_resume(text)
    except ValueError:
        return Reject(400)
    resuming = Accept(accept.user, accept.topics, accept.subprotocol)
    resuming.resume = positions
    return resuming


def check_response(result: object) -> Response | None:
    """check_response checks what on_http returned.

    Raises:
        TypeError: something other than a Response or None.
    """
    if result is not None and not isinstance(result, Response):
        raise TypeError(wrong_type("on_http", result, "a Response or None"))
    return result


def wrong_type(hook: str, result: object, expected: str) -> str:
    """wrong_type is the message for a hook that returned the wrong type."""
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: closed here, so Python does not warn about it
        return (
            f"{hook} returned an awaitable from a plain function: declare the hook itself "
            f"with async def (lowmemws decides how to call a hook when it is set)"
        )
    return f"{hook} returned {type(result).__name__}; it must return {expected}"


def negotiate(
    request: Request,
    on_connect: Callable[[Request], Any] | None,
    origins: tuple[str, ...] | None,
    subprotocols: tuple[str, ...],
) -> Accept | Reject:
    """negotiate decides an upgrade with a plain on_connect: the Origin check, the
    application (None accepts), the subprotocol (see conclude).

    Raises:
        TypeError: on_connect returned something other than Accept, Reject or None.
        ValueError: the Accept names a subprotocol the client did not offer.
    """
    refused = check_origin(request, origins)
    if refused is not None:
        return refused
    decision = on_connect(request) if on_connect is not None else None
    return conclude(request, decision, subprotocols)


def _with_subprotocol(request: Request, accept: Accept, preferred: tuple[str, ...]) -> Accept:
    if accept.subprotocol is None and not preferred:
        return accept
    offered = request.subprotocols
    if accept.subprotocol is not None:
        if accept.subprotocol not in offered:
            raise ValueError("Accept.subprotocol must be one the client offered")
        return accept
    for proto in preferred:
        if proto in offered:
            return Accept(accept.user, accept.topics, proto)
    return accept
