"""Listening sockets: one per address, IPv4 or IPv6, optionally SO_REUSEPORT."""

from __future__ import annotations

import socket
from collections.abc import Sequence


def bind_listeners(
    hosts: Sequence[str], port: int, backlog: int, reuse_port: bool
) -> tuple[list[socket.socket], int]:
    """bind_listeners binds and listens on port at every host; returns the sockets and the
    port (the one the kernel chose when port is 0, shared by every later address).

    "::" and "" listen on IPv6 and IPv4 both (IPV6_V6ONLY off). The sockets are
    non-blocking, ready for lmw_listen_add.

    Raises:
        OSError: an address cannot be bound (in use, not local, no permission).
    """
    socks: list[socket.socket] = []
    try:
        for host in hosts:
            sock = _listener(host, port, backlog, reuse_port)
            socks.append(sock)
            if port == 0:
                port = sock.getsockname()[1]
    except OSError:
        for sock in socks:
            sock.close()
        raise
    return socks, port


def _listener(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:  # worker processes share the port; the kernel spreads connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6 and host in ("::", ""):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock
