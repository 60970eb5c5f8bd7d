"""The envelope subprotocol ``lowmemws.v1``: what a client that asks for positions receives.

The format is documented in docs/envelope.md. In short, every data message to such a client
is one text frame holding a JSON object:

- a message: ``{"s": stream, "e": epoch, "o": offset, "d": text}`` (``"b"``: base64 instead
  of ``"d"`` for a binary payload); ``s``, ``e`` and ``o`` are absent for a message that was
  not stored (a broadcast, a direct send);
- the outcome of a resume, one per stream named: ``{"resumed": stream, "e": epoch, "o":
  offset}`` (the replay is complete: the client is at that position) or ``{"refresh":
  stream, "e": epoch, "o": offset}`` (history could not fill the gap: reload your state;
  ``e``/``o`` are the stream's position now, "" and 0 when it has none);
- ``{"resync": true}``: this gateway may have missed stored messages (its Redis link was
  down): resume every stream now, in band;
- ``{"synced": true}`` once every stream of a resume has its outcome: a client that sent
  ``lmw_resume`` (``{}`` the first time) knows from then on a position for each of its
  streams, even those that had no message yet.

A browser cannot see WebSocket pings, so a client may send ``{"lmw_ping": 1}``: the gateway
answers ``{"pong": true}`` (its own heartbeat deadline then tells a dead link).

A client names its positions with the query parameter ``lmw_resume`` of the Upgrade
request, a JSON object ``{stream: [epoch, offset], ...}`` (URL-encoded), or later in a text
message ``{"lmw_resume": {stream: [epoch, offset], ...}}`` (a gap it noticed).

An envelope is built once per message: every client of the stream gets the same bytes.
"""

from __future__ import annotations

import base64
import json
from typing import Any

from ._constants import OP_TEXT

__all__ = [
    "ENVELOPE_PROTOCOL",
    "PING_PREFIX",
    "PONG_FRAME",
    "RESUME_PARAM",
    "RESUME_PREFIX",
    "RESYNC_FRAME",
    "SYNCED_FRAME",
    "ResumeRequest",
    "message_frame",
    "outcome_frame",
    "parse_resume",
    "resume_message",
]

#: ENVELOPE_PROTOCOL is the Sec-WebSocket-Protocol a client offers to get envelopes.
ENVELOPE_PROTOCOL = "lowmemws.v1"
#: RESUME_PARAM is the Upgrade request's query parameter naming the client's positions.
RESUME_PARAM = "lmw_resume"
#: RESUME_PREFIX starts every in-band resume request (the loop looks no further otherwise).
RESUME_PREFIX = b'{"lmw_resume"'
_MAX_STREAMS = 256  # streams one resume may name
_MAX_STREAM_CHARS = 65536 + 2

#: ResumeRequest maps a stream to the client's last (epoch, offset) in it.
ResumeRequest = dict[str, tuple[str, int]]


def message_frame(
    opcode: int, payload: bytes, stream: str | None = None, epoch: str = "", offset: int = 0
) -> bytes:
    """message_frame is the envelope of one message (UTF-8 JSON, sent as a text frame)."""
    body: dict[str, Any] = {}
    if stream is not None and epoch:
        body = {"s": stream, "e": epoch, "o": offset}
    if opcode == OP_TEXT:
        body["d"] = payload.decode("utf-8", "replace")
    else:
        body["b"] = base64.b64encode(payload).decode("ascii")
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def outcome_frame(resumed: bool, stream: str, epoch: str, offset: int) -> bytes:
    """outcome_frame tells the client how the resume of stream ended (see the module doc)."""
    body = {"resumed" if resumed else "refresh": stream, "e": epoch, "o": offset}
    return json.dumps(body, separators=(",", ":")).encode("utf-8")


#: PING_PREFIX starts a client's heartbeat message; PONG_FRAME answers it.
PING_PREFIX = b'{"lmw_ping"'
PONG_FRAME = b'{"pong":true}'
#: RESYNC_FRAME asks every envelope client to resume in band (see the module doc).
RESYNC_FRAME = b'{"resync":true}'
#: SYNCED_FRAME ends the outcomes of a resume (see the module doc).
SYNCED_FRAME = b'{"synced":true}'


def parse_resume(text: str) -> ResumeRequest:
    """parse_resume reads a JSON object {stream: [epoch, offset], ...}.

    Raises:
        ValueError: not such an object, a stream other than "t:..." or "u:<tag>", an
            epoch that is not a short ASCII str, an offset that is not an int >= 0, or more
            than 256 streams.
    """
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"lmw_resume is not JSON: {exc}") from None
    if not isinstance(value, dict) or len(value) > _MAX_STREAMS:
        raise ValueError("lmw_resume is an object of at most 256 streams")
    request: ResumeRequest = {}
    for stream, position in value.items():
        if not _valid_stream(stream):
            raise ValueError(f"lmw_resume: {stream[:40]!r} is not a stream name")
        if not (isinstance(position, list) and len(position) == 2):
            raise ValueError("lmw_resume: a position is [epoch, offset]")
        epoch, offset = position
        if not (isinstance(epoch, str) and epoch.isascii() and len(epoch) <= 64):
            raise ValueError("lmw_resume: an epoch is an ASCII str of at most 64 characters")
        if not (isinstance(offset, int) and not isinstance(offset, bool) and 0 <= offset < 2**63):
            raise ValueError("lmw_resume: an offset is an int >= 0")
        request[stream] = (epoch, offset)
    return request


def resume_message(message: str) -> ResumeRequest | None:
    """resume_message reads a client's in-band resume request; None when message is not one.

    Raises:
        ValueError: it is one, but malformed (see parse_resume).
    """
    if not message.startswith(RESUME_PREFIX.decode()):
        return None
    try:
        inner = json.loads(message)["lmw_resume"]
    except (json.JSONDecodeError, RecursionError, TypeError, KeyError):
        raise ValueError("lmw_resume message is not a JSON object") from None
    return parse_resume(json.dumps(inner))


def _valid_stream(stream: str) -> bool:
    if len(stream) > _MAX_STREAM_CHARS:
        return False
    if stream.startswith("t:"):
        return True
    tag = stream[2:]
    return stream.startswith("u:") and tag.isdigit() and tag.isascii() and int(tag) < 2**64
