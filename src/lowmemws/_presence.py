"""Presence and kick: ``online(user)`` and ``disconnect_user(user)`` asked of every node.

Theory of operation. Nothing records who is connected: each node's C hub already chains a
user's connections by their tag, so a node counts (or closes) them when asked. A query is an
`Envelope` of kind "online" or "kick" whose key is the user tag and whose payload carries a
random 64-bit query id and the asking node's address (`query_envelope`). It travels like any
publish, so a kick keeps its place after the messages the same publisher sent before it.
Every node that gets it answers with an "answer" envelope (its count), which the bus brings
back to the asker (`BusBase.answer`). The asker knows how many answers to wait for from its
bus: 1 for LocalBus, the worker processes for ProcessBus, and for RedisBus the number of
subscribers Redis reported for the PUBLISH of the query itself. A query costs one pending
record on the asking node while it waits (`lowmemws._queries`), nothing anywhere else.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._bus_base import Envelope, Query, query_envelope
from ._queries import new_query_id
from .close_codes import close_reason_bytes
from .errors import PresenceTimeout

if TYPE_CHECKING:
    from ._bus_base import BusBase
    from ._c_server import CServer

__all__ = ["answer_query", "ask_kick", "ask_online"]


def ask_online(bus: BusBase, tag: int, timeout: float) -> int:
    """ask_online is the number of connections tagged tag on every node bus reaches.

    Raises:
        BusUnavailable: the bus cannot take the query.
        PresenceTimeout: not every node answered within timeout seconds.
    """
    envelope = query_envelope("online", tag, new_query_id(), bus.presence_address)
    tally = bus.ask(envelope, timeout)
    if not tally.complete:
        raise PresenceTimeout(tally.count, tally.answered, tally.expected)
    return tally.count


def ask_kick(bus: BusBase, tag: int, code: int, reason: str, timeout: float) -> int:
    """ask_kick closes every connection tagged tag on every node with code and reason, and
    returns how many were closed.

    Raises:
        ValueError: a code that may not be sent, or a reason over 123 bytes of UTF-8.
        BusUnavailable: the bus cannot take the kick (nothing was closed).
        PresenceTimeout: not every node confirmed within timeout seconds (the nodes the
            kick reached close the user's connections all the same).
    """
    raw = close_reason_bytes(code, reason)
    envelope = query_envelope("kick", tag, new_query_id(), bus.presence_address, code, raw)
    tally = bus.ask(envelope, timeout)
    if not tally.complete:
        raise PresenceTimeout(tally.count, tally.answered, tally.expected)
    return tally.count


def answer_query(server: CServer, bus: BusBase | None, envelope: Envelope) -> int:
    """answer_query runs a query on this node (count, or close, the user's connections)
    and answers the asker through bus; returns this node's count."""
    query = Query.parse(envelope)
    if query.kind == "kick":
        count = server.close_user(query.tag, query.code, query.reason)
    else:
        count = server.user_count(query.tag)
    if bus is not None:
        bus.answer(query, count)
    return count
