"""The subscriber-side filter of RedisBus (lowmemws._bus_filter, _bus_filter.c): its RESP
framing agrees with hiredis on the same bytes, however the bytes are cut into reads, and it
refuses what hiredis refuses."""

from __future__ import annotations

from typing import Any

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lowmemws._bus_filter import DELIVER, REPLY, UNJUDGED, BusFilter, BusProtocolError

NODE = b"\xee" * 16
ANSWERS = b"lowmemws:answers:" + NODE.hex().encode()
CRLF = b"\r\n"

line_text = st.binary(max_size=20).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b""))


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def simple_values() -> st.SearchStrategy[bytes]:
    return st.one_of(
        line_text.map(lambda s: b"+" + s + CRLF),
        line_text.map(lambda s: b"-ERR " + s + CRLF),
        st.integers(-(2**63), 2**63 - 1).map(lambda n: b":%d\r\n" % n),
        st.binary(max_size=40).map(bulk),
        st.just(b"$-1\r\n"),
        st.just(b"_\r\n"),
        st.just(b"#t\r\n"),  # not #f: hiredis's gets() returns False for "no reply yet"
    )


def aggregate(children: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.tuples(st.sampled_from([b"*", b">"]), st.lists(children, max_size=4)).map(
            lambda t: t[0] + b"%d\r\n" % len(t[1]) + b"".join(t[1])
        ),
        st.lists(
            st.tuples(st.binary(max_size=8), children), max_size=3, unique_by=lambda kv: kv[0]
        ).map(lambda pairs: b"%%%d\r\n" % len(pairs) + b"".join(bulk(k) + v for k, v in pairs)),
    )


replies = st.recursive(simple_values(), aggregate, max_leaves=8)


def messages(index: int) -> st.SearchStrategy[bytes]:
    """A pub/sub message (RESP2 array or RESP3 push): short data, the answer channel, or a
    bus message from an origin of its own, index (all three reach Python)."""
    origin = b"\x01" + index.to_bytes(15, "big")
    data = st.one_of(
        st.binary(max_size=23), st.binary(max_size=30).map(lambda b: origin + b"\0" * 8 + b)
    )
    return st.builds(
        lambda array, kind, channel, body: (
            array + b"3\r\n" + bulk(kind) + bulk(channel) + bulk(body)
        ),
        st.sampled_from([b"*", b">"]),
        st.sampled_from([b"message", b"smessage"]),
        st.sampled_from([b"lowmemws:bus", b"lowmemws:{u:3}", ANSWERS]),
        data,
    )


@st.composite
def streams(draw: st.DrawFn) -> bytes:
    """Replies and messages mixed, each message from an origin of its own."""
    count = draw(st.integers(1, 12))
    return b"".join(draw(st.one_of(replies, messages(i))) for i in range(count))


def normal(reply: Any) -> Any:
    """Replies compared by value (hiredis returns error objects, equal only to themselves)."""
    if isinstance(reply, Exception):
        return ("error", str(reply))
    if isinstance(reply, list):
        return [normal(r) for r in reply]
    if isinstance(reply, dict):
        return {k: normal(v) for k, v in reply.items()}
    return reply


def hiredis_replies(stream: bytes) -> list[Any]:
    reader = hiredis.Reader()
    reader.feed(stream)
    out = []
    while (reply := reader.gets()) is not False:
        out.append(normal(reply))
    return out


def through_filter(stream: bytes, cuts: list[int]) -> list[Any]:
    """Feed stream in reads cut at cuts, carrying the unread rest as the link does; each
    item as hiredis would show it."""
    bus_filter = BusFilter(NODE, ANSWERS)
    seen: list[Any] = []
    partial, last = b"", 0
    for cut in [*sorted(cuts), len(stream)]:
        buf, last = partial + stream[last:cut], cut
        at, more = 0, True
        while more:
            at, items, more = bus_filter.scan(buf, at)
            for kind, channel, data in items:
                if kind == REPLY:
                    (reply,) = hiredis_replies(data)  # one whole frame
                    seen.append(reply)
                else:
                    assert kind in (DELIVER, UNJUDGED)
                    assert kind == (UNJUDGED if channel == ANSWERS or len(data) < 24 else DELIVER)
                    seen.append([b"message", channel, data])
        partial = buf[at:]
    assert partial == b""
    return seen


def as_messages(replies: list[Any]) -> list[Any]:
    """The reference with every message shown as the filter's items are."""
    return [
        [b"message", r[1], r[2]]
        if isinstance(r, list) and len(r) == 3 and r[0] in (b"message", b"smessage")
        else r
        for r in replies
    ]


@settings(max_examples=300, deadline=None)
@given(
    stream=streams(),
    cut_points=st.lists(st.floats(0, 1), max_size=4),
)
def test_the_filter_frames_as_hiredis_parses_whatever_the_reads(
    stream: bytes, cut_points: list[float]
) -> None:
    cuts = [int(f * len(stream)) for f in cut_points]
    assert through_filter(stream, cuts) == as_messages(hiredis_replies(stream))


def test_the_filter_drops_echoes_and_resent_envelopes_and_counts_gaps() -> None:
    bus_filter = BusFilter(NODE, ANSWERS)

    def message(origin: bytes, seq: int) -> bytes:
        data = origin + seq.to_bytes(8, "big") + b"\x01\x02\x01x"
        return b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:bus") + bulk(data)

    other = b"\x01" * 16
    stream = b"".join([message(other, 1), message(NODE, 1), message(other, 4), message(other, 4)])
    at, items, more = bus_filter.scan(stream)
    assert (at, more) == (len(stream), False)
    assert [item[2][16:24] for item in items] == [(1).to_bytes(8, "big"), (4).to_bytes(8, "big")]
    assert bus_filter.take_counts() == (0, 1, 2)  # one re-sent, 2 and 3 missed
    bus_filter.forget([b"lowmemws:bus"])  # unsubscribed: the numbering starts over
    assert len(bus_filter.scan(message(other, 1))[1]) == 1
    assert bus_filter.take_counts() == (0, 0, 0)


def test_stored_history_envelopes_and_read_markers_are_left_to_python() -> None:
    """History's stored envelopes (origin all 0x00) and read markers (all 0xff) all carry
    sequence number 0: judged by sequence they would be dropped as re-sent after the first."""
    from lowmemws._history_redis import MARKER_ORIGIN, STORED_ORIGIN

    bus_filter = BusFilter(NODE, ANSWERS)

    def message(origin: bytes) -> bytes:
        data = origin + bytes(8) + b"\x03stored envelope"
        return b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:{t:7}") + bulk(data)

    stream = b"".join(message(o) for o in (STORED_ORIGIN, STORED_ORIGIN, MARKER_ORIGIN))
    _at, items, _more = bus_filter.scan(stream)
    assert [(item[0], item[2][:16]) for item in items] == [
        (UNJUDGED, STORED_ORIGIN),
        (UNJUDGED, STORED_ORIGIN),
        (UNJUDGED, MARKER_ORIGIN),
    ]
    assert bus_filter.take_counts() == (0, 0, 0)


@pytest.mark.parametrize(
    "junk", [b"?3\r\n", b"$abc\r\n", b"*x\r\n", b"$3\r\nabcde\r\n", b":1\rX", b"+" + b"a" * 70000]
)
def test_the_filter_refuses_what_is_not_resp_as_hiredis_does(junk: bytes) -> None:
    with pytest.raises(BusProtocolError):
        BusFilter(NODE, ANSWERS).scan(junk + CRLF)
    reader = hiredis.Reader()
    reader.feed(junk + CRLF)
    if len(junk) < 1000:  # hiredis has no line bound: the long line is ours alone
        with pytest.raises(hiredis.ProtocolError):  # at that frame or the bytes after it
            while reader.gets() is not False:
                pass


def test_an_incomplete_frame_waits_for_the_next_read() -> None:
    frame = b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:bus") + bulk(b"short")
    bus_filter = BusFilter(NODE, ANSWERS)
    for cut in range(len(frame)):
        at, items, _ = bus_filter.scan(frame[:cut])
        assert (at, items) == (0, [])
    assert bus_filter.scan(frame)[1] == [(UNJUDGED, b"lowmemws:bus", b"short")]


@pytest.mark.parametrize("native", [True, False], ids=["C loop", "Python loop"])
def test_a_link_reads_a_message_larger_than_its_buffer_across_reads(native: bool) -> None:
    import os
    import socket
    import threading
    from types import SimpleNamespace

    from lowmemws._redis_link import SubscriberLink, wait_links

    ours, theirs = socket.socketpair()
    got: list[tuple[bytes, bytes, bool]] = []
    link = SubscriberLink(
        SimpleNamespace(_sock=ours),
        True,
        lambda channel, data, judged: got.append((channel, data, judged)),
        BusFilter(NODE, ANSWERS),
        keepalive=60,
        reply_timeout=5,
    )
    big = b"\x02" * 16 + (1).to_bytes(8, "big") + bytes(range(256)) * 2500  # ~640 KB
    frame = b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:bus") + bulk(big)
    stream = frame + b"+PONG\r\n" + frame.replace(b"\x02" * 16, b"\x03" * 16)
    if not native:  # the path of a TLS link: Python reads, the C filter scans
        link.native = None
    wake_r, wake_w = os.pipe()
    writer = threading.Thread(target=theirs.sendall, args=(stream,))
    writer.start()
    for _ in range(1000):  # bounds the test: a read brings at least one byte
        if len(got) == 2:
            break
        wait_links([link], 10.0, wake_r)
    writer.join()
    os.close(wake_r)
    os.close(wake_w)
    assert got == [
        (b"lowmemws:bus", big, True),
        (b"lowmemws:bus", big.replace(b"\x02" * 16, b"\x03" * 16), True),
    ]
    ours.close()
    theirs.close()


# -- the C wait loop (plain sockets) ---------------------------------------------------------


def socket_link(got: list[tuple[bytes, bytes, bool]]) -> tuple[Any, Any, Any]:
    """A SubscriberLink on one end of a unix socketpair: (link, the other end, our end)."""
    import socket
    from types import SimpleNamespace

    from lowmemws._redis_link import SubscriberLink

    ours, theirs = socket.socketpair()
    link = SubscriberLink(
        SimpleNamespace(_sock=ours),
        True,
        lambda channel, data, judged: got.append((channel, data, judged)),
        BusFilter(NODE, ANSWERS),
        keepalive=60,
        reply_timeout=5,
    )
    return link, theirs, ours


def echo(seq: int) -> bytes:
    """A user envelope of this node's own (the filter drops it as an echo)."""
    data = NODE + seq.to_bytes(8, "big") + bytes([1, 1, 1]) + seq.to_bytes(8, "big") + b"x"
    return b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:{u:17}") + bulk(data)


def test_dropped_messages_never_wake_python_on_a_plain_socket() -> None:
    import os
    import threading

    from lowmemws._redis_link import wait_links

    got: list[tuple[bytes, bytes, bool]] = []
    link, theirs, ours = socket_link(got)
    assert link.native is not None  # a plain socket: the C loop
    fence = b">3\r\n" + bulk(b"smessage") + bulk(ANSWERS) + bulk(b"fence")

    def send() -> None:
        for seq in range(1, 2001):  # in many small writes: many reads in C
            theirs.sendall(echo(seq))
        theirs.sendall(fence)

    wake_r, wake_w = os.pipe()
    writer = threading.Thread(target=send)
    writer.start()
    returns = 0
    while not got and returns < 50:  # bounded: 50 keepalive-free waits of 10 s at most
        wait_links([link], 10.0, wake_r)
        returns += 1
    writer.join()
    assert got == [(ANSWERS, b"fence", False)]
    assert returns == 1  # Python ran once: for the fence, never for the 2,000 drops
    assert link.filter.take_counts() == (0, 0, 0)  # echoes are not counted as unserved
    for fd in (wake_r, wake_w):
        os.close(fd)
    ours.close()
    theirs.close()


def test_the_c_loop_returns_for_a_wake_up_and_ends_a_closed_or_broken_link() -> None:
    import os

    from lowmemws._redis_link import LinkDead, wait_links

    got: list[tuple[bytes, bytes, bool]] = []
    link, theirs, ours = socket_link(got)
    wake_r, wake_w = os.pipe()
    os.write(wake_w, b"!")
    assert wait_links([link], 10.0, wake_r) is True  # woken: Python follows the interest
    os.read(wake_r, 1)
    theirs.sendall(b"?not resp\r\n")
    with pytest.raises(LinkDead, match="not RESP"):
        wait_links([link], 10.0, wake_r)
    link2, theirs2, ours2 = socket_link(got)
    theirs2.close()
    with pytest.raises(LinkDead, match="closed"):
        wait_links([link2], 10.0, wake_r)
    assert got == []
    for fd in (wake_r, wake_w):
        os.close(fd)
    for sock in (ours, theirs, ours2):
        sock.close()


def test_the_c_loop_hands_drop_counts_to_python_while_it_drops() -> None:
    import os

    from lowmemws._bus_filter import WAIT_COUNTED, WAIT_ITEMS

    got: list[tuple[bytes, bytes, bool]] = []
    link, theirs, ours = socket_link(got)
    other = b"\x01" * 16
    first = other + (1).to_bytes(8, "big") + b"\x01\x02\x01x"
    push = b">3\r\n" + bulk(b"smessage") + bulk(b"lowmemws:bus") + bulk(first)
    wake_r, wake_w = os.pipe()
    theirs.sendall(push)
    assert link.filter.wait([link.native], wake_r, 60.0).status == WAIT_ITEMS
    theirs.sendall(push)  # re-sent: dropped in C, counted
    # the stats must not wait for the next kept message or the keepalive (60 s here)
    assert link.filter.wait([link.native], wake_r, 60.0).status == WAIT_COUNTED
    assert link.filter.take_counts() == (0, 1, 0)
    for fd in (wake_r, wake_w):
        os.close(fd)
    ours.close()
    theirs.close()
