"""wss:// served by the gateway itself (docs/tls.md): interop with independent TLS peers (Python's
ssl, which is OpenSSL, and tlslite-ng, pure Python), large messages across many records,
KeyUpdate, close_notify both ways, and a defined outcome for every bad input, with the server
serving everyone else afterwards."""

from __future__ import annotations

import asyncio
import socket
import ssl
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tlslite import HandshakeSettings, TLSConnection
from tlslite.constants import AlertDescription, AlertLevel, ContentType, KeyUpdateMessageType
from tlslite.errors import TLSAbruptCloseError, TLSRemoteAlert
from tlslite.messages import Alert, Message
from wsproto.events import BytesMessage, Ping, Pong

from lowmemws import Accept, Config, Connection, Gateway, Request, TLSError, tls_available
from tests.support.ci import skip_or_fail
from tests.support.servers import StartServer
from tests.support.tls import (
    CertificateSet,
    TLSWebSocket,
    make_certificates,
    open_ssl,
    raw_twin,
    read_until_closed,
)
from tests.support.waiting import wait_until

TLS13 = ssl.TLSVersion.TLSv1_3
TLS12 = ssl.TLSVersion.TLSv1_2


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> CertificateSet:
    if not tls_available():
        skip_or_fail("lowmemws was built without OpenSSL (install libssl-dev and rebuild)")
    return make_certificates(tmp_path_factory.mktemp("tls"))


class TLSGateway:
    """TLSGateway: an echo gateway serving TLS, the closes it saw, and its TLS counters."""

    def __init__(self, certs: CertificateSet) -> None:
        self.gateway = Gateway(
            "127.0.0.1",
            0,
            config=Config(certfile=str(certs.cert), keyfile=str(certs.key), ping_interval=0),
        )
        self.closes: list[int] = []
        self.gateway.on_connect(lambda request: Accept(topics=("news",)))

        @self.gateway.on_message
        def echo(conn: Connection, message: str | bytes) -> None:
            conn.send(message)

        @self.gateway.on_close
        def closed(conn: Connection, code: int) -> None:
            self.closes.append(code)

    @property
    def port(self) -> int:
        return self.gateway.port

    def tls(self) -> dict[str, int]:
        counters: dict[str, int] = self.gateway.stats()["tls"]
        return counters

    def wait_tls(self, outcome: str, at_least: int) -> None:
        wait_until(lambda: self.tls()[outcome] >= at_least, timeout=10, what=outcome)


@pytest.fixture(scope="module")
def server(certs: CertificateSet) -> Iterator[TLSGateway]:
    tg = TLSGateway(certs)
    tg.gateway.start()
    try:
        yield tg
    finally:
        tg.gateway.stop(timeout=10)


def ssl_client(certs: CertificateSet, port: int, version: ssl.TLSVersion = TLS13) -> TLSWebSocket:
    return TLSWebSocket(open_ssl(certs, port, version), "127.0.0.1", port)


def assert_still_serving(certs: CertificateSet, port: int) -> None:
    ws = ssl_client(certs, port)
    ws.send("still here")
    assert ws.recv() == "still here"
    assert ws.close() == 1000


def tlslite_client(port: int, cipher: str | None = None) -> TLSConnection:
    """tlslite_client is a TLS 1.3 connection made by tlslite-ng (no certificate check: it is
    the peer's record layer under test, and Python's ssl checks the chain elsewhere)."""
    conn = TLSConnection(socket.create_connection(("127.0.0.1", port), timeout=10))
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    if cipher:
        settings.cipherNames = [cipher]
    conn.handshakeClientCert(settings=settings)
    return conn


def send_tlslite_records(conn: TLSConnection, *messages: Message) -> None:
    """send_tlslite_records sends protected records of any content type, in one TCP write."""
    conn.sock.buffer_writes = True
    for message in messages:
        for _ in conn._sendMsg(message):
            pass
    conn.sock.flush()
    conn.sock.buffer_writes = False


def expect_alert(conn: TLSConnection) -> int:
    """expect_alert reads until the server's alert; returns its description."""
    with pytest.raises(TLSRemoteAlert) as caught:
        for _ in range(100):
            conn.read()
    return int(caught.value.description)


# ---------------------------------------------------------------- interop


@pytest.mark.parametrize("version", [TLS13, TLS12], ids=["tls1.3", "tls1.2"])
def test_python_ssl_echoes_small_and_large_messages(
    certs: CertificateSet, server: TLSGateway, version: ssl.TLSVersion
) -> None:
    """Messages from 0 bytes to 1 MiB (64 records of 16 KiB) come back intact, text and binary."""
    before = server.tls()
    ws = ssl_client(certs, server.port, version)
    assert isinstance(ws.stream, ssl.SSLSocket) and ws.stream.version() == (
        "TLSv1.3" if version == TLS13 else "TLSv1.2"
    )
    for message in ["", "hi", "é" * 40_000, bytes(range(256)) * 4096, "x" * (1 << 20)]:
        ws.send(message)
        assert ws.recv() == message
    assert ws.close() == 1000
    after = server.tls()
    assert after["handshakes"] == before["handshakes"] + 1
    assert after["version_1_2"] == before["version_1_2"] + (version == TLS12)


def test_many_messages_sent_at_once_come_back_in_order(
    certs: CertificateSet, server: TLSGateway
) -> None:
    """200 messages written before reading any: records split across reads, replies queued."""
    ws = ssl_client(certs, server.port)
    messages = [f"message {i} " * (i % 50) for i in range(200)]
    ws.stream.sendall(b"".join(ws.ws.send(_text(m)) for m in messages))
    assert [ws.recv() for _ in messages] == messages
    ws.close()


def _text(message: str) -> Any:
    from wsproto.events import TextMessage

    return TextMessage(data=message)


@pytest.mark.parametrize("cipher", ["aes128gcm", "aes256gcm", "chacha20-poly1305"])
def test_tlslite_peer_echoes_with_each_cipher_suite(server: TLSGateway, cipher: str) -> None:
    conn = tlslite_client(server.port, cipher)
    ws = TLSWebSocket(conn, "127.0.0.1", server.port)
    for message in ["hello", b"\x00" * 70_000]:
        ws.send(message)
        assert ws.recv() == message
    assert ws.close() == 1000


def test_client_key_update_many_times(server: TLSGateway) -> None:
    """The client updates its keys 40 times, half of them asking for the server's update
    (RFC 8446 section 4.6.3): the echo keeps working across every change of key both ways."""
    before = server.tls()["key_updates"]
    conn = tlslite_client(server.port)
    ws = TLSWebSocket(conn, "127.0.0.1", server.port)
    for i in range(40):
        kind = KeyUpdateMessageType.update_requested if i % 2 else 0
        for _ in conn.send_keyupdate_request(kind):
            pass
        ws.send(f"after update {i}")
        assert ws.recv() == f"after update {i}"
    assert ws.close() == 1000
    assert server.tls()["key_updates"] == before + 40


class TrickleSocket:
    """TrickleSocket sends in 7-byte TCP segments once trickle is set: every record arrives in
    pieces, so the server keeps partial records between reads."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.trickle = False
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def sendall(self, data: bytes) -> None:
        step = 7 if self.trickle else len(data) or 1
        for i in range(0, len(data), step):
            self.sock.sendall(data[i : i + step])
            if self.trickle:
                time.sleep(0.0005)

    def send(self, data: bytes) -> int:
        self.sendall(data)
        return len(data)

    def recv(self, n: int) -> bytes:
        return self.sock.recv(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


def test_records_arriving_in_pieces(server: TLSGateway) -> None:
    """Records split across many reads are kept partial (like a partial frame) and complete."""
    raw = TrickleSocket(socket.create_connection(("127.0.0.1", server.port), timeout=10))
    conn = TLSConnection(raw)
    settings = HandshakeSettings()
    settings.minVersion = settings.maxVersion = (3, 4)
    conn.handshakeClientCert(settings=settings)
    raw.trickle = True
    ws = TLSWebSocket(conn, "127.0.0.1", server.port)
    for message in ["a" * 3000, b"\x01" * 20_000]:
        ws.send(message)
        assert ws.recv() == message
    assert ws.close() == 1000


def test_https_request_on_the_tls_port(certs: CertificateSet, server: TLSGateway) -> None:
    """Plain HTTP over TLS reaches the HTTP routes (https://.../healthz)."""
    tls = open_ssl(certs, server.port, TLS13)
    tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n\r\n")
    reply = b""
    while b"\r\n\r\n" not in reply:
        reply += tls.recv(4096)
    assert reply.startswith(b"HTTP/1.1 200")


def test_metrics_count_tls_outcomes(certs: CertificateSet, server: TLSGateway) -> None:
    """GET /metrics over https lists every TLS outcome counter."""
    tls = open_ssl(certs, server.port, TLS13)
    tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
    body = read_until_closed(tls).decode()
    assert 'lowmemws_tls_total{outcome="handshakes"} ' in body
    assert 'lowmemws_tls_total{outcome="bad_record_mac"} ' in body


def test_publish_reaches_every_tls_member(certs: CertificateSet, server: TLSGateway) -> None:
    """One publish, built once, sealed per member: each gets it under its own keys."""
    clients = [ssl_client(certs, server.port) for _ in range(5)]
    wait_until(lambda: server.gateway.topic_size("news") >= 5, timeout=10, what="subscribed")
    server.gateway.publish("news", "breaking")
    assert [ws.recv() for ws in clients] == ["breaking"] * 5
    for ws in clients:
        ws.close()


# ---------------------------------------------------------------- close_notify


def test_websocket_close_is_followed_by_close_notify(
    certs: CertificateSet, server: TLSGateway
) -> None:
    ws = ssl_client(certs, server.port)
    assert ws.close(1000) == 1000
    assert isinstance(ws.stream, ssl.SSLSocket)
    ws.stream.unwrap()  # returns only once the server's close_notify came


def test_client_close_notify_is_answered_and_closes(
    certs: CertificateSet, server: TLSGateway
) -> None:
    before = server.tls()["close_notify"]
    closes = len(server.closes)
    ws = ssl_client(certs, server.port)
    ws.send("bye")
    assert ws.recv() == "bye"
    assert isinstance(ws.stream, ssl.SSLSocket)
    plain = ws.stream.unwrap()  # our close_notify, then the server's
    assert read_until_closed(plain) == b""
    server.wait_tls("close_notify", before + 1)
    wait_until(lambda: len(server.closes) > closes, timeout=10, what="on_close")
    assert 1006 in server.closes[closes:]


# ---------------------------------------------------------------- bad input


def _ssl_alert_of(tls: ssl.SSLSocket) -> str:
    with pytest.raises((ssl.SSLError, ConnectionError)) as caught:
        for _ in range(10):
            if not tls.recv(4096):
                raise ConnectionError("closed without an alert")
    return str(caught.value).lower().replace("_", " ")


def test_bad_record_mac(certs: CertificateSet, server: TLSGateway) -> None:
    before = server.tls()["bad_record_mac"]
    ws = ssl_client(certs, server.port)
    raw_twin(ws.stream).sendall(bytes([23, 3, 3, 0, 32]) + bytes(32))  # a forged record
    assert "bad record mac" in _ssl_alert_of(ws.stream)  # type: ignore[arg-type]
    assert server.tls()["bad_record_mac"] == before + 1
    assert_still_serving(certs, server.port)


def test_oversized_record(certs: CertificateSet, server: TLSGateway) -> None:
    before = server.tls()["record_overflow"]
    ws = ssl_client(certs, server.port)
    too_long = (1 << 14) + 257  # RFC 8446 5.2: at most 2^14 + 256
    raw_twin(ws.stream).sendall(bytes([23, 3, 3, too_long >> 8, too_long & 255]))
    assert "record overflow" in _ssl_alert_of(ws.stream)  # type: ignore[arg-type]
    assert server.tls()["record_overflow"] == before + 1
    assert_still_serving(certs, server.port)


def test_unexpected_handshake_message(certs: CertificateSet, server: TLSGateway) -> None:
    """A handshake message other than KeyUpdate after the handshake (here a ClientHello
    header): unexpected_message."""
    before = server.tls()["unexpected_message"]
    conn = tlslite_client(server.port)
    send_tlslite_records(conn, Message(ContentType.handshake, bytearray(b"\x01\x00\x00\x00")))
    assert expect_alert(conn) == AlertDescription.unexpected_message
    assert server.tls()["unexpected_message"] == before + 1
    assert_still_serving(certs, server.port)


def test_malformed_key_update(certs: CertificateSet, server: TLSGateway) -> None:
    before = server.tls()["decode_error"]
    conn = tlslite_client(server.port)
    send_tlslite_records(conn, Message(ContentType.handshake, bytearray(b"\x18\x00\x00\x01\x07")))
    assert expect_alert(conn) == AlertDescription.illegal_parameter
    assert server.tls()["decode_error"] == before + 1
    assert_still_serving(certs, server.port)


def test_record_after_close_notify(certs: CertificateSet, server: TLSGateway) -> None:
    """close_notify and then a data record in the same segment: the record is discarded and
    counted, close_notify is answered, the connection ends."""
    before = server.tls()
    conn = tlslite_client(server.port)
    ws = TLSWebSocket(conn, "127.0.0.1", server.port)
    close_notify = Alert().create(AlertDescription.close_notify, AlertLevel.warning)
    late = Message(ContentType.application_data, bytearray(ws.ws.send(_text("too late"))))
    send_tlslite_records(conn, close_notify, late)
    with pytest.raises((TLSAbruptCloseError, ConnectionError, OSError)):
        for _ in range(10):
            if not conn.read():
                raise ConnectionError("closed")  # the server's close_notify
    server.wait_tls("after_close", before["after_close"] + 1)
    assert server.tls()["close_notify"] == before["close_notify"] + 1
    assert_still_serving(certs, server.port)


def test_plaintext_http_on_the_tls_port(certs: CertificateSet, server: TLSGateway) -> None:
    before = server.tls()["plaintext"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
        reply = read_until_closed(plain)
    assert reply.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert reply.endswith(b"This port speaks TLS: use https:// or wss://")
    assert server.tls()["plaintext"] == before + 1
    assert_still_serving(certs, server.port)


def test_garbage_instead_of_a_client_hello(certs: CertificateSet, server: TLSGateway) -> None:
    """Bytes that are neither TLS nor HTTP: OpenSSL refuses the handshake (its alert), closed."""
    before = server.tls()["handshake_failed"]
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as plain:
        plain.sendall(bytes([22, 3, 1, 0, 5]) + b"hello")
        reply = read_until_closed(plain)
    assert reply[:1] in (b"", bytes([21]))  # nothing, or a plaintext alert record
    assert server.tls()["handshake_failed"] == before + 1
    assert_still_serving(certs, server.port)


def test_untrusted_client_gets_no_connection_but_others_do(
    certs: CertificateSet, server: TLSGateway, tmp_path: Path
) -> None:
    """A client that refuses the certificate ends the handshake with its own alert."""
    other = make_certificates(tmp_path)
    with pytest.raises(ssl.SSLCertVerificationError):
        open_ssl(other, server.port, TLS13)
    server.wait_tls("handshake_failed", 1)
    assert_still_serving(certs, server.port)


# ---------------------------------------------------------------- configuration


def test_reload_certificate_without_restart(certs: CertificateSet, tmp_path: Path) -> None:
    tg = TLSGateway(certs)
    tg.gateway.start()
    try:
        kept = ssl_client(certs, tg.port)
        renewed = make_certificates(tmp_path)
        with pytest.raises(TLSError, match="certificate .*missing.pem"):
            tg.gateway.reload_certificate(str(tmp_path / "missing.pem"), str(renewed.key))
        assert_still_serving(certs, tg.port)  # a failed reload keeps the old one
        tg.gateway.reload_certificate(str(renewed.cert), str(renewed.key))
        assert_still_serving(renewed, tg.port)
        with pytest.raises(ssl.SSLCertVerificationError):
            open_ssl(certs, tg.port, TLS13)
        kept.send("established connections keep theirs")
        assert kept.recv() == "established connections keep theirs"
    finally:
        tg.gateway.stop(timeout=10)


def test_unusable_key_is_a_clear_error(certs: CertificateSet, tmp_path: Path) -> None:
    other = make_certificates(tmp_path)
    config = Config(certfile=str(certs.cert), keyfile=str(other.key))
    gateway = Gateway("127.0.0.1", 0, config=config)
    with pytest.raises(TLSError, match="private key .*server.key: .*key values mismatch"):
        gateway.start()
    gateway.stop()


def test_certfile_needs_keyfile() -> None:
    with pytest.raises(ValueError, match="go together"):
        Config(certfile="cert.pem")


def test_upgrade_hook_sees_requests_over_tls(certs: CertificateSet) -> None:
    seen: list[str] = []
    done = threading.Event()
    gateway = Gateway(
        "127.0.0.1", 0, config=Config(certfile=str(certs.cert), keyfile=str(certs.key))
    )

    @gateway.on_connect
    def connect(request: Request) -> Accept:
        seen.append(request.path)
        done.set()
        return Accept()

    gateway.start()
    try:
        ws = TLSWebSocket(open_ssl(certs, gateway.port, TLS13), "127.0.0.1", gateway.port)
        assert done.wait(10) and seen == ["/"]
        ws.close()
    finally:
        gateway.stop(timeout=10)


def test_cli_echo_serves_wss(certs: CertificateSet, start_server: StartServer) -> None:
    """python -m lowmemws echo --certfile C --keyfile K announces wss:// and echoes over TLS."""
    server = start_server(
        [sys.executable, "-m", "lowmemws", "echo"],
        ["--certfile", str(certs.cert), "--keyfile", str(certs.key)],
    )
    assert server.ready_line == f"listening on wss://127.0.0.1:{server.port}"
    ws = ssl_client(certs, server.port)
    ws.send("over the CLI")
    assert ws.recv() == "over the CLI"
    assert ws.close() == 1000


def test_cli_echo_over_tls_with_worker_processes(
    certs: CertificateSet, start_server: StartServer
) -> None:
    """Each SO_REUSEPORT worker loads the certificate and serves TLS."""
    server = start_server(
        [sys.executable, "-m", "lowmemws", "echo"],
        ["--processes", "2", "--certfile", str(certs.cert), "--keyfile", str(certs.key)],
    )
    for i in range(10):
        ws = ssl_client(certs, server.port)
        ws.send(f"message {i}")
        assert ws.recv() == f"message {i}"
        assert ws.close() == 1000


def test_output_queued_for_a_slow_reader_is_sealed_in_order(
    certs: CertificateSet, tmp_path: Path
) -> None:
    """A client that does not read while megabytes are published to it: what the kernel does not
    take is queued and sealed as it leaves, so the records stay in sequence (every message
    arrives whole and in order, and the pong to a ping sent meanwhile too)."""
    config = Config(certfile=str(certs.cert), keyfile=str(certs.key), write_limit=16 << 20)
    gateway = Gateway("127.0.0.1", 0, config=config)
    gateway.on_connect(lambda request: Accept(topics=("feed",)))
    gateway.start()
    try:
        ws = ssl_client(certs, gateway.port)
        wait_until(lambda: gateway.topic_size("feed") == 1, timeout=10, what="subscribed")
        messages: list[bytes] = []
        for i in range(2048):  # 16 KiB each, until the kernel takes no more (then 64 more)
            messages.append(f"{i:05d}".encode() * 3277)
            gateway.publish("feed", messages[-1])
            queued = gateway.stats()["pending_write_bytes"] > 0
            if queued and len(messages) >= 64 and i % 64 == 0:
                break
        assert gateway.stats()["pending_write_bytes"] > 0  # the kernel did not take it all
        ws.send_event(Ping(payload=b"are you there"))
        got: list[bytes] = []
        part = b""
        pong_after = -1
        while len(got) < len(messages):
            event = ws.next_event()
            if isinstance(event, Pong):
                pong_after = len(got)
            if isinstance(event, BytesMessage):  # wsproto hands over pieces as they come
                part += bytes(event.data)
                if event.message_finished:
                    got.append(part)
                    part = b""
        assert got == messages
        while pong_after < 0:  # the pong, sealed in its place among the queued records
            pong_after = len(got) if isinstance(ws.next_event(), Pong) else -1
        assert ws.close() == 1000
    finally:
        gateway.stop(timeout=10)


def test_async_upgrade_hook_parks_a_tls_handshake(certs: CertificateSet) -> None:
    """An async on_connect parks the upgrade (issue 11) on a TLS connection too: the 101 is
    sealed when the hook answers."""
    gateway = Gateway(
        "127.0.0.1", 0, config=Config(certfile=str(certs.cert), keyfile=str(certs.key))
    )

    @gateway.on_connect
    async def connect(request: Request) -> Accept:
        await asyncio.sleep(0.05)
        return Accept()

    gateway.on_message(lambda conn, message: conn.send(message))
    gateway.start()
    try:
        ws = ssl_client(certs, gateway.port)
        ws.send("after a parked upgrade")
        assert ws.recv() == "after a parked upgrade"
        assert ws.close() == 1000
    finally:
        gateway.stop(timeout=10)
