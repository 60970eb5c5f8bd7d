"""permessage-deflate (RFC 7692): what a client sees when it offers compression.

The server accepts an offer only with no context takeover both ways (it always answers
server_no_context_takeover and client_no_context_takeover, section 7.1.1), declines offers it
cannot honour without failing the handshake, decompresses within max_message_size (1009 for a
bomb, 1007 for bad data), and compresses a publish once for all its compressed recipients.
wsproto, an independent implementation, is the reference client.
"""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import zlib
from collections.abc import Iterator

import pytest
from wsproto.extensions import PerMessageDeflate

import lowmemws
from lowmemws.codec import build_101, negotiate_deflate
from tests.support.waiting import wait_until
from tests.support.wire import read_until
from tests.support.wsproto_client import WsprotoClient

ACCEPT = 128  # LMW_PMD_ACCEPT
RESPONSE = b"permessage-deflate; server_no_context_takeover; client_no_context_takeover"


# ---------------------------------------------------------------------------- negotiation


@pytest.mark.parametrize(
    ("offers", "result"),
    [
        (b"permessage-deflate", ACCEPT),
        (b"permessage-deflate; client_max_window_bits", ACCEPT),  # Chrome
        (b"permessage-deflate; client_max_window_bits=10", ACCEPT),
        (b'permessage-deflate; client_max_window_bits="12"', ACCEPT),
        (b"permessage-deflate;server_no_context_takeover;client_no_context_takeover", ACCEPT),
        (b"permessage-deflate; server_max_window_bits=9", ACCEPT | 9),
        (b"permessage-deflate; server_max_window_bits=8", ACCEPT | 8),
        (b"permessage-deflate; server_max_window_bits=15", ACCEPT | 15),
        (b"x-webkit-deflate-frame, permessage-deflate", ACCEPT),
        (b"permessage-deflate; server_max_window_bits=7, permessage-deflate", ACCEPT),
        (b"permessage-deflate; foo, permessage-deflate; server_max_window_bits=10", ACCEPT | 10),
        (b", ,permessage-deflate", ACCEPT),
        (b"  permessage-deflate  ;  client_max_window_bits  ", ACCEPT),
    ],
)
def test_offers_that_can_be_honoured_are_accepted(offers: bytes, result: int) -> None:
    assert negotiate_deflate(offers) == result


@pytest.mark.parametrize(
    "offers",
    [
        b"",
        b"x-webkit-deflate-frame",
        b"permessage-deflate; foo",  # a parameter not defined for offers (section 5)
        b"permessage-deflate; server_max_window_bits",  # needs a value
        b"permessage-deflate; server_max_window_bits=16",
        b"permessage-deflate; server_max_window_bits=7",
        b"permessage-deflate; server_max_window_bits=010",  # leading zero
        b"permessage-deflate; client_max_window_bits=20",
        b"permessage-deflate; server_no_context_takeover=1",
        b"permessage-deflate; client_no_context_takeover; client_no_context_takeover",
        b"permessage-deflate; server_max_window_bits=9; server_max_window_bits=10",
        b'permessage-deflate; client_max_window_bits="10',  # unterminated: syntax error
        b"permessage-deflate; ; client_max_window_bits",
        b"permessage-deflate x",
        b"PERMESSAGE-DEFLATE-X",
    ],
)
def test_offers_that_cannot_be_honoured_are_declined(offers: bytes) -> None:
    assert negotiate_deflate(offers) == 0


def test_the_101_answers_both_no_context_takeover_parameters() -> None:
    key = b"dGhlIHNhbXBsZSBub25jZQ=="
    assert b"Sec-WebSocket-Extensions" not in build_101(key)
    assert b"Sec-WebSocket-Extensions: " + RESPONSE + b"\r\n" in build_101(key, pmd=ACCEPT)
    answer = build_101(key, b"chat", ACCEPT | 12)
    assert b"Sec-WebSocket-Extensions: " + RESPONSE + b"; server_max_window_bits=12\r\n" in answer
    assert answer.endswith(b"\r\n\r\n")


# ---------------------------------------------------------------------------- a gateway


def _echo_gateway(**config: object) -> lowmemws.Gateway:
    gw = lowmemws.Gateway("127.0.0.1", 0, config=lowmemws.Config(**config))  # type: ignore[arg-type]

    @gw.on_message
    def echo(conn: lowmemws.Connection, message: str | bytes) -> None:
        conn.send(message)

    return gw


@pytest.fixture
def echo() -> Iterator[lowmemws.Gateway]:
    gw = _echo_gateway(compression_min_size=16).start()
    try:
        yield gw
    finally:
        gw.stop()


class RawClient:
    """RawClient speaks frames by hand, to send what wsproto never would."""

    def __init__(self, port: int, extensions: str | None = "permessage-deflate") -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        key = base64.b64encode(os.urandom(16)).decode()
        head = (
            f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
        )
        if extensions is not None:
            head += f"Sec-WebSocket-Extensions: {extensions}\r\n"
        self.sock.sendall((head + "\r\n").encode())
        answer = read_until(self.sock, b"\r\n\r\n")
        head, _, self.rest = answer.partition(b"\r\n\r\n")
        self.head = head + b"\r\n"
        assert self.head.startswith(b"HTTP/1.1 101")

    def send_frame(self, opcode: int, payload: bytes, fin: bool = True, rsv1: bool = False) -> None:
        mask = os.urandom(4)
        b0 = (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        n = len(payload)
        if n < 126:
            header = struct.pack("!BB", b0, 0x80 | n)
        elif n < 65536:
            header = struct.pack("!BBH", b0, 0x80 | 126, n)
        else:
            header = struct.pack("!BBQ", b0, 0x80 | 127, n)
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(header + mask + masked)

    def _read(self, n: int) -> bytes:
        while len(self.rest) < n:
            got = self.sock.recv(65536)
            if not got:
                raise EOFError
            self.rest += got
        out, self.rest = self.rest[:n], self.rest[n:]
        return out

    def read_frame(self) -> tuple[int, bool, bytes]:
        """read_frame returns (opcode, rsv1, payload) of the next server frame."""
        b0, b1 = self._read(2)
        n = b1 & 127
        if n == 126:
            (n,) = struct.unpack("!H", self._read(2))
        elif n == 127:
            (n,) = struct.unpack("!Q", self._read(8))
        return b0 & 15, bool(b0 & 0x40), self._read(n)

    def close_code(self) -> int:
        while True:
            opcode, _, payload = self.read_frame()
            if opcode == 8:
                return int(struct.unpack("!H", payload[:2])[0])


def deflate(data: bytes, wbits: int = 15) -> bytes:
    """deflate compresses one message as RFC 7692 section 7.2.1 says (tail removed)."""
    z = zlib.compressobj(6, zlib.DEFLATED, -wbits)
    out = z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)
    assert out.endswith(b"\x00\x00\xff\xff")
    return out[:-4]


def inflate(data: bytes) -> bytes:
    return zlib.decompressobj(-15).decompress(data + b"\x00\x00\xff\xff")


OFFERS = {
    "default": PerMessageDeflate(),
    "client_no_context_takeover": PerMessageDeflate(client_no_context_takeover=True),
    "server_no_context_takeover": PerMessageDeflate(server_no_context_takeover=True),
    "client_max_window_bits=9": PerMessageDeflate(client_max_window_bits=9),
    "server_max_window_bits=9": PerMessageDeflate(server_max_window_bits=9),
    "both windows 10, both no takeover": PerMessageDeflate(
        client_no_context_takeover=True,
        client_max_window_bits=10,
        server_no_context_takeover=True,
        server_max_window_bits=10,
    ),
}

MESSAGES: list[str | bytes] = [
    "",
    "short",
    "héllo wörld € " * 40,
    os.urandom(3000),  # incompressible: sent as it is
    b"\x00" * 70000,
    ("{'user': 42, 'unread': 7} " * 40000)[: 1 << 20],
]


@pytest.mark.parametrize("offer", list(OFFERS), ids=list(OFFERS))
def test_wsproto_negotiates_each_offer_and_echoes_every_size(
    echo: lowmemws.Gateway, offer: str
) -> None:
    with WsprotoClient("127.0.0.1", echo.port, extensions=[OFFERS[offer]]) as client:
        (accepted,) = client.accepted.extensions
        assert isinstance(accepted, PerMessageDeflate)
        assert accepted.client_no_context_takeover and accepted.server_no_context_takeover
        for message in MESSAGES:
            client.send_message(message)
            assert client.receive_message() == message
    stats = echo.stats()
    assert stats["messages_inflated_total"] >= 4
    assert stats["messages_deflated_total"] >= 3
    assert stats["deflate_out_bytes_total"] < stats["deflate_in_bytes_total"]


def test_small_messages_go_uncompressed_and_other_peers_plain(echo: lowmemws.Gateway) -> None:
    raw = RawClient(echo.port)
    assert b"Sec-WebSocket-Extensions: " + RESPONSE + b"\r\n" in raw.head
    raw.send_frame(1, b"tiny")  # an uncompressed message on a deflate connection is fine
    assert raw.read_frame() == (1, False, b"tiny")
    text = b"compress me " * 100
    raw.send_frame(1, deflate(text), rsv1=True)
    opcode, rsv1, payload = raw.read_frame()
    assert (opcode, rsv1, inflate(payload)) == (1, True, text)
    plain = RawClient(echo.port, extensions=None)
    assert b"Sec-WebSocket-Extensions" not in plain.head
    plain.send_frame(2, text)
    assert plain.read_frame() == (2, False, text)


def test_a_declined_offer_still_upgrades(echo: lowmemws.Gateway) -> None:
    raw = RawClient(echo.port, "permessage-deflate; server_max_window_bits=16")
    assert b"Sec-WebSocket-Extensions" not in raw.head
    raw.send_frame(1, b"x" * 200)
    assert raw.read_frame() == (1, False, b"x" * 200)


def test_compression_off_declines_every_offer() -> None:
    gw = _echo_gateway(compression=False).start()
    try:
        raw = RawClient(gw.port)
        assert b"Sec-WebSocket-Extensions" not in raw.head
        raw.send_frame(1, deflate(b"a" * 100), rsv1=True)
        assert raw.close_code() == 1002
    finally:
        gw.stop()


def test_a_client_asking_for_an_8_bit_window_gets_one(echo: lowmemws.Gateway) -> None:
    raw = RawClient(echo.port, "permessage-deflate; server_max_window_bits=8")
    assert b"server_max_window_bits=8" in raw.head
    far = os.urandom(200)  # repeats 450 bytes apart: too far back for a 256-byte window
    text = (b"lowmemws " * 50 + far + os.urandom(50)) * 10
    raw.send_frame(2, text)
    opcode, rsv1, payload = raw.read_frame()
    assert rsv1 and len(payload) < len(text)
    assert zlib.decompressobj(-8).decompress(payload + b"\x00\x00\xff\xff") == text


def test_a_compressed_message_in_fragments_is_joined_then_inflated(echo: lowmemws.Gateway) -> None:
    raw = RawClient(echo.port)
    text = "fragmentiert ünd komprimiert ".encode() * 500
    z = deflate(text)
    parts = [z[:10], z[10:11], b"", z[11:]]
    raw.send_frame(1, parts[0], fin=False, rsv1=True)
    raw.send_frame(9, b"ping in between")
    for part in parts[1:-1]:
        raw.send_frame(0, part, fin=False)
    raw.send_frame(0, parts[-1])
    assert raw.read_frame() == (10, False, b"ping in between")
    opcode, rsv1, payload = raw.read_frame()
    assert (opcode, rsv1, inflate(payload)) == (1, True, text)


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        ([(9, b"p", True, True)], 1002),  # RSV1 on a control frame
        ([(1, deflate(b"a" * 50), False, True), (0, b"", True, True)], 1002),  # on a continuation
        ([(2, b"\xff\xff\xff\xff not deflate", True, True)], 1007),  # corrupted data
        ([(2, deflate(b"ok") + b"\x03\x00garbage", True, True)], 1007),  # data past a final block
        ([(1, deflate(b"\xc3\x28 invalid utf-8" * 10), True, True)], 1007),
    ],
)
def test_bad_compressed_input_closes_with_its_code(
    echo: lowmemws.Gateway, frames: list[tuple[int, bytes, bool, bool]], code: int
) -> None:
    raw = RawClient(echo.port)
    for opcode, payload, fin, rsv1 in frames:
        raw.send_frame(opcode, payload, fin=fin, rsv1=rsv1)
    assert raw.close_code() == code


def test_rsv1_without_the_extension_stays_a_protocol_error(echo: lowmemws.Gateway) -> None:
    raw = RawClient(echo.port, extensions=None)
    raw.send_frame(1, deflate(b"a" * 100), rsv1=True)
    assert raw.close_code() == 1002


def test_a_decompression_bomb_gets_1009_without_a_large_allocation() -> None:
    gw = _echo_gateway(max_message_size=64 * 1024, spill_budget=1 << 20).start()
    try:
        bomb = deflate(b"\x00" * (32 << 20))  # 32 MiB of zeros in ~32 KiB: 1000x
        assert len(bomb) < 64 * 1024
        raw = RawClient(gw.port)
        raw.send_frame(2, bomb, rsv1=True)
        assert raw.close_code() == 1009
        stats = gw.stats()
        assert stats["spill_bytes"] == 0
        exact = RawClient(gw.port)  # exactly max_message_size is still fine
        exact.send_frame(2, deflate(b"\x01" * (64 * 1024)), rsv1=True)
        opcode, rsv1, payload = exact.read_frame()
        assert (opcode, rsv1, len(inflate(payload))) == (2, True, 64 * 1024)
    finally:
        gw.stop()


def test_a_publish_is_compressed_once_for_all_its_deflate_members() -> None:
    gw = lowmemws.Gateway("127.0.0.1", 0)

    @gw.on_connect
    def join(request: lowmemws.Request) -> lowmemws.Accept:
        return lowmemws.Accept(user=7, topics=("news",))

    gw.start()
    try:
        deflating = [RawClient(gw.port) for _ in range(5)]
        plain = [RawClient(gw.port, extensions=None) for _ in range(3)]
        windowed = RawClient(gw.port, "permessage-deflate; server_max_window_bits=9")
        assert b"server_max_window_bits=9" in windowed.head
        message = '{"type": "mail", "from": "bob", "subject": "Quarterly report"} ' * 64
        wait_until(lambda: gw.topic_size("news") == 9, "9 members", 5)
        before = gw.stats()["messages_deflated_total"]
        assert gw.publish("news", message) == 9
        assert gw.stats()["messages_deflated_total"] == before + 2  # one per window size
        for client in (*deflating, windowed):
            opcode, rsv1, payload = client.read_frame()
            assert (opcode, rsv1, inflate(payload).decode()) == (1, True, message)
        for client in plain:
            assert client.read_frame() == (1, False, message.encode())
        assert gw.send_to_user(7, message.encode()) == 9
        assert gw.broadcast(message) == 9
        assert gw.stats()["messages_deflated_total"] == before + 6
    finally:
        gw.stop()


def test_the_zlib_pool_stays_bounded_however_many_connections_compress() -> None:
    gw = _echo_gateway(compression_min_size=16).start()
    try:
        clients = [RawClient(gw.port) for _ in range(40)]
        text = b"the same pool for every connection " * 20
        for client in clients:
            client.send_frame(1, deflate(text), rsv1=True)
        for client in clients:
            opcode, rsv1, payload = client.read_frame()
            assert (opcode, rsv1, inflate(payload)) == (1, True, text)
        stats = gw.stats()
        assert stats["messages_inflated_total"] == stats["messages_deflated_total"] == 40
        assert stats["deflate_streams"] == 2  # one deflater, one inflater: none per connection
        assert stats["spill_bytes"] == 0
    finally:
        gw.stop()


@pytest.mark.parametrize(
    "settings",
    [{"compression_level": 0}, {"compression_level": 10}, {"compression_min_size": -1}],
)
def test_compression_settings_are_checked(settings: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        lowmemws.Config(**settings)  # type: ignore[arg-type]


def test_an_upgrade_parked_for_an_async_hook_keeps_its_negotiation() -> None:
    gw = _echo_gateway(compression_min_size=16)

    @gw.on_connect
    async def slow(request: lowmemws.Request) -> lowmemws.Accept:
        await asyncio.sleep(0.05)  # the upgrade waits parked in C meanwhile
        return lowmemws.Accept(user=5)

    gw.start()
    try:
        raw = RawClient(gw.port, "permessage-deflate; server_max_window_bits=10")
        assert b"Sec-WebSocket-Extensions: " + RESPONSE + b"; server_max_window_bits=10" in raw.head
        text = b"parked, then compressed " * 30
        raw.send_frame(2, deflate(text), rsv1=True)
        opcode, rsv1, payload = raw.read_frame()
        assert (opcode, rsv1, inflate(payload)) == (2, True, text)
    finally:
        gw.stop()


def test_paced_and_batch_sends_are_compressed_once_too() -> None:
    gw = lowmemws.Gateway("127.0.0.1", 0)

    @gw.on_connect
    def join(request: lowmemws.Request) -> lowmemws.Accept:
        return lowmemws.Accept(user=int(request.params.get("u", "1")), topics=("news",))

    gw.start()
    try:
        deflating = [RawClient(gw.port) for _ in range(4)]
        plain = [RawClient(gw.port, extensions=None) for _ in range(2)]
        wait_until(lambda: gw.topic_size("news") == 6, "6 members", 5)
        message = '{"type": "digest", "items": ["a", "b", "c"]} ' * 40
        before = gw.stats()["messages_deflated_total"]
        gw.publish("news", message, spread=0.3)
        gw.send_to_users([1, 2], message.encode())
        for client in deflating:  # the paced one comes within 0.3 s, in any order
            got = sorted((o, r, inflate(p)) for o, r, p in (client.read_frame() for _ in "12"))
            assert got == [(1, True, message.encode()), (2, True, message.encode())]
        for client in plain:
            got = sorted(client.read_frame() for _ in "12")
            assert got == [(1, False, message.encode()), (2, False, message.encode())]
        assert gw.stats()["messages_deflated_total"] == before + 2  # once per send
    finally:
        gw.stop()
