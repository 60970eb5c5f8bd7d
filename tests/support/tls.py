"""TLS peers for the tests: a test CA and server certificate made at test time (the openssl
command line tool), a blocking WebSocket client over any TLS stream (wsproto over Python's ssl or
tlslite-ng), and raw access to the TCP connection under a TLS one (for bad records).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import shutil
import socket
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from wsproto import ConnectionType, WSConnection
from wsproto.events import (
    AcceptConnection,
    BytesMessage,
    CloseConnection,
    Event,
    Message,
    RejectConnection,
    Request,
    TextMessage,
)

from tests.support.ci import skip_or_fail

_RECV = 65536


@dataclass(frozen=True)
class CertificateSet:
    """CertificateSet: a test CA, a server certificate it signed for 127.0.0.1 and localhost,
    the server's key, and the base64 SHA-256 of the server's public key (Chromium's
    --ignore-certificate-errors-spki-list)."""

    ca: Path
    cert: Path
    key: Path
    spki_sha256: str


def _openssl(*args: str) -> bytes:
    return subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60).stdout


def make_certificates(directory: Path) -> CertificateSet:
    """make_certificates writes a fresh test CA and a server certificate into directory."""
    if shutil.which("openssl") is None:
        skip_or_fail("the openssl command line tool is not installed (Debian: openssl)")
    ca_key, ca = directory / "ca.key", directory / "ca.pem"
    key, csr, cert = directory / "server.key", directory / "server.csr", directory / "server.pem"
    ext = directory / "server.ext"
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
             "-subj", "/CN=lowmemws test CA")  # fmt: skip
    _openssl("req", "-new", *ec, "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text(
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
             "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    public_der = _openssl("pkey", "-in", str(key), "-pubout", "-outform", "DER")
    spki = base64.b64encode(hashlib.sha256(public_der).digest()).decode()
    return CertificateSet(ca=ca, cert=cert, key=key, spki_sha256=spki)


def client_context(
    certs: CertificateSet, version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
) -> ssl.SSLContext:
    """client_context is a Python ssl (OpenSSL) client context trusting the test CA, limited to
    one TLS version."""
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.minimum_version = version
    context.maximum_version = version
    return context


class Stream(Protocol):
    """Stream: what a TLS connection object offers (ssl.SSLSocket, tlslite's TLSConnection)."""

    def sendall(self, data: bytes) -> Any: ...

    def recv(self, n: int) -> bytes: ...


class TLSWebSocket:
    """TLSWebSocket is a blocking WebSocket client (wsproto) over an established TLS stream."""

    def __init__(self, stream: Stream, host: str, port: int, timeout: float = 10.0) -> None:
        self.stream = stream
        self.timeout = timeout
        self.ws = WSConnection(ConnectionType.CLIENT)
        self._events: list[Event] = []
        self.send_event(Request(host=f"{host}:{port}", target="/"))
        event = self.next_event()
        if isinstance(event, RejectConnection):
            raise ConnectionError(f"upgrade refused: HTTP {event.status_code}")
        assert isinstance(event, AcceptConnection), event

    def send_event(self, event: Event) -> None:
        """send_event sends what wsproto makes of event."""
        self.stream.sendall(self.ws.send(event))

    def next_event(self) -> Event:
        """next_event returns the next wsproto event, reading as needed (bounded in time)."""
        deadline = time.monotonic() + self.timeout
        while not self._events:
            if time.monotonic() > deadline:
                raise TimeoutError("no WebSocket event in time")
            data = self.stream.recv(_RECV)
            if not data:
                raise ConnectionError("the server closed the connection")
            self.ws.receive_data(data)
            self._events.extend(self.ws.events())
        return self._events.pop(0)

    def send(self, message: str | bytes) -> None:
        """send sends one text (str) or binary (bytes) message."""
        if isinstance(message, str):
            self.send_event(TextMessage(data=message))
        else:
            self.send_event(BytesMessage(data=message))

    def recv(self) -> str | bytes:
        """recv returns the next whole message (str for text, bytes for binary)."""
        parts: list[Any] = []
        while True:
            event = self.next_event()
            if isinstance(event, CloseConnection):
                raise ConnectionError(f"closed by the server: {event.code}")
            if isinstance(event, Message):
                parts.append(event.data)
                if event.message_finished:
                    first = parts[0]
                    return "".join(parts) if isinstance(first, str) else b"".join(parts)

    def close(self, code: int = 1000) -> int:
        """close runs the closing handshake; returns the code the server echoed."""
        self.send_event(CloseConnection(code=code))
        while True:
            event = self.next_event()
            if isinstance(event, CloseConnection):
                return int(event.code)


def open_ssl(certs: CertificateSet, port: int, version: ssl.TLSVersion) -> ssl.SSLSocket:
    """open_ssl connects to 127.0.0.1:port with Python's ssl and completes the handshake."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    return client_context(certs, version).wrap_socket(raw, server_hostname="localhost")


def raw_twin(tls: socket.socket) -> socket.socket:
    """raw_twin is a plain socket on the same TCP connection as tls, to write bytes under it."""
    return socket.socket(fileno=os.dup(tls.fileno()))


def read_until_closed(sock: socket.socket, timeout: float = 10.0) -> bytes:
    """read_until_closed reads sock until the peer closes it; returns everything read."""
    sock.settimeout(timeout)
    got = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(_RECV):
            got += chunk
    return got
