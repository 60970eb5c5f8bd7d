"""tlsclient: one load-client process of benchmarks/tls.py: wss:// connections over Python's ssl.

Started as ``tlsclient.py HOST PORT COUNT SOURCE VERSION`` (VERSION 1.3 or 1.2); it reads
one command per line on stdin and answers one JSON line on stdout:

- ``open``: opens COUNT TLS connections from source address SOURCE (one at a time, each
  handshake and upgrade complete before the next), then leaves them idle;
- ``echo ROUNDS``: ROUNDS times, sends a 64-byte text message on every connection, then reads
  every echo (the server holds one message per connection at a time);
- ``close``: sends a close frame on every connection and closes it.

It exits when stdin closes. The certificate is not checked (the client's CPU is not what is
measured; tests/test_tls.py checks chains).
"""

from __future__ import annotations

import base64
import json
import os
import resource
import socket
import ssl
import sys
import time

IP_BIND_ADDRESS_NO_PORT = 24
MESSAGE = b"x" * 64
MASK = b"\x00\x00\x00\x00"  # a zero mask leaves the payload as it is (RFC 6455 5.3)


def frame(opcode: int, payload: bytes) -> bytes:
    """frame builds a masked client frame of a payload under 126 bytes."""
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + MASK + payload


def read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def upgrade(sock: ssl.SSLSocket, host: str, port: int) -> None:
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        "Sec-WebSocket-Version: 13\r\n\r\n"
    )
    sock.sendall(request.encode())
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError("closed during the upgrade")
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(head[:60].decode(errors="replace"))


def main() -> None:
    host, port, count, source = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    tls12 = sys.argv[5] == "1.2"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.minimum_version = context.maximum_version = (
        ssl.TLSVersion.TLSv1_2 if tls12 else ssl.TLSVersion.TLSv1_3
    )
    conns: list[ssl.SSLSocket] = []
    for line in sys.stdin:
        command = line.split()
        started = time.monotonic()
        if command[0] == "open":
            for _ in range(count):
                raw = socket.socket()
                raw.setsockopt(socket.SOL_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                # as browsers do: the Upgrade right behind Finished is not held by Nagle
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.bind((source, 0))
                raw.settimeout(60)
                raw.connect((host, port))
                tls = context.wrap_socket(raw)
                upgrade(tls, host, port)
                conns.append(tls)
            reply = {"opened": len(conns)}
        elif command[0] == "echo":
            rounds, echoed = int(command[1]), 0
            for _ in range(rounds):
                for tls in conns:
                    tls.sendall(frame(1, MESSAGE))
                for tls in conns:
                    head = read_exactly(tls, 2)
                    echoed += read_exactly(tls, head[1] & 0x7F) == MESSAGE
            reply = {"echoed": echoed}
        else:
            for tls in conns:
                try:
                    tls.sendall(frame(8, b"\x03\xe8"))
                    tls.close()
                except OSError:
                    pass
            reply = {"closed": len(conns)}
            conns = []
        reply["seconds"] = time.monotonic() - started
        print(json.dumps(reply), flush=True)


if __name__ == "__main__":
    main()
