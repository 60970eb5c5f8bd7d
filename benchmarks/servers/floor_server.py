"""floor_server: the raw fan-out floor, not a usable server.

It speaks just enough WebSocket (RFC 6455 section 4.2 handshake, unmasked server frames) for
the benchmark load clients, keeps its connections as plain ``socket.socket`` objects in a list,
and answers ``!publish K SIZE`` on ``/control`` with a plain Python loop of non-blocking
``send()`` of one pre-built frame over every subscriber socket, K times. That loop is the floor
any server's fan-out is compared with: it does nothing per connection but the system call.
"""

from __future__ import annotations

import base64
import hashlib
import select
import signal
import socket
import zlib

from common import is_subscriber, parse_args, publish_request, ready, wants_compressed

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
subscribers: dict[int, socket.socket] = {}


def server_frame(opcode: int, payload: bytes, rsv1: bool = False) -> bytes:
    n = len(payload)
    b0 = 0x80 | (0x40 if rsv1 else 0) | opcode
    head = bytes([b0, n]) if n < 126 else bytes([b0, 126]) + n.to_bytes(2)
    return head + payload


def compressed(payload: bytes) -> bytes:
    """compressed is the permessage-deflate payload lowmemws sends (zlib level 1, raw, the
    sync-flush tail removed: RFC 7692 7.2.1)."""
    z = zlib.compressobj(1, zlib.DEFLATED, -15)
    return (z.compress(payload) + z.flush(zlib.Z_SYNC_FLUSH))[:-4]


def publish(count: int, payload: bytes, deflate: bool = False) -> int:
    frame = server_frame(2, compressed(payload), True) if deflate else server_frame(2, payload)
    written = 0
    for _ in range(count):
        for sock in subscribers.values():
            try:
                written += sock.send(frame) == len(frame)
            except OSError:
                pass
    return written


def handshake(sock: socket.socket, data: bytes) -> bool:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    key = next(
        v.split(":", 1)[1].strip() for v in head if v.lower().startswith("sec-websocket-key")
    )
    accept = base64.b64encode(hashlib.sha1(key.encode() + GUID).digest()).decode()
    sock.send(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        + f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode()
    )
    return is_subscriber(head[0].split()[1])


def unmask(data: bytes, key: bytes) -> bytes:
    return bytes(b ^ key[i % 4] for i, b in enumerate(data))


def on_frames(sock: socket.socket, data: bytes) -> bool:
    """on_frames handles small client frames (control, ping, close); False closes the socket."""
    while len(data) >= 6:
        opcode, length = data[0] & 0x0F, data[1] & 0x7F
        head = 8 if length == 126 else 6
        if length == 126:
            length = int.from_bytes(data[2:4])
        payload = unmask(data[head : head + length], data[head - 4 : head])
        data = data[head + length :]
        if opcode == 8:
            sock.send(server_frame(8, payload[:2]))
            return False
        if opcode == 9:
            sock.send(server_frame(10, payload))
        elif opcode == 1 and (req := publish_request(payload.decode())) is not None:
            written = publish(*req, wants_compressed(payload.decode()))
            sock.send(server_frame(1, f"done {written}".encode()))
    return True


def main() -> None:
    args = parse_args(__doc__)
    listener = socket.create_server((args.host, args.port), backlog=4096)
    listener.setblocking(False)
    ep = select.epoll()
    ep.register(listener.fileno(), select.EPOLLIN)
    socks: dict[int, socket.socket] = {}
    upgraded: set[int] = set()
    running = [True]
    signal.signal(signal.SIGTERM, lambda *_: running.__setitem__(0, False))
    ready(args.host, args.port)
    while running[0]:
        for fd, _ in ep.poll(0.5):
            if fd == listener.fileno():
                while True:
                    try:
                        sock, _ = listener.accept()
                    except BlockingIOError:
                        break
                    sock.setblocking(False)
                    socks[sock.fileno()] = sock
                    ep.register(sock.fileno(), select.EPOLLIN)
                continue
            sock = socks[fd]
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if data and fd not in upgraded:
                upgraded.add(fd)
                if handshake(sock, data):
                    subscribers[fd] = sock
                continue
            if not data or not on_frames(sock, data):
                ep.unregister(fd)
                upgraded.discard(fd)
                subscribers.pop(fd, None)
                del socks[fd]
                sock.close()


if __name__ == "__main__":
    main()
