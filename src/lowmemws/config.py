"""Config: every cap and timeout of a gateway, with the defaults the README's limits table lists."""

from __future__ import annotations

import resource
from dataclasses import dataclass, field
from typing import Literal

from ._history import History

#: File descriptors kept free for listeners, logs, the bus and the interpreter.
FD_HEADROOM = 64


@dataclass(frozen=True)
class Config:
    """Config holds every limit of a gateway; memory is bounded by these, never by clients.

    Sizes are bytes, times seconds. Reaching a limit has one documented outcome each (see
    docs/limits.md, "Limits and defaults").
    """

    max_connections: int | None = None
    """Open connections plus handshakes per process; None: RLIMIT_NOFILE minus headroom."""
    max_handshakes: int = 4096
    """Request heads being read at once; at the cap new connections wait in the backlog."""
    max_head: int = 8192
    """Request head cap: a longer head gets HTTP 431."""
    max_http_body: int = 64 * 1024
    """Plain HTTP request body cap: a longer Content-Length gets HTTP 413."""
    max_message_size: int = 1 << 20
    """WebSocket message cap: a longer message closes the connection with 1009."""
    read_buffer_size: int = 64 * 1024
    """Bytes per pooled read buffer."""
    read_buffers: int = 16
    """Pooled read buffers; when all are lent out, reading waits for the next loop turn."""
    spill_budget: int | None = None
    """All incomplete input together, charged for bytes received (never for a declared
    length). A message being received may grow until 3/4 of it is used, then its socket waits
    in the kernel (unless it is the only one held); past 3/4 no socket starts a new spill,
    but whole messages are still served;
    a spill past the budget closes its connection with 1013. None: 8 MiB, or twice
    max_message_size when that is more."""
    write_limit: int = 256 * 1024
    """Pending output per connection before the write policy applies."""
    write_budget: int = 64 << 20
    """Pending output of all connections together before the write policy applies."""
    write_policy: Literal["drop", "close"] = "drop"
    """conn.send past the limit: "drop" the message (counted) or "close" with 1008."""
    handshake_timeout: float = 10.0
    """A head (and body) must arrive within this time, else HTTP 408."""
    ping_interval: float = 30.0
    """Idle connections get a ping after this long; 0 disables heartbeats."""
    ping_timeout: float = 10.0
    """A connection silent this long after a ping is dropped (close code 1006)."""
    message_timeout: float = 60.0
    """A message (or frame) once begun must be complete within this time, else the
    connection closes with 1008: a trickled message cannot hold its spill for ever; 0: off."""
    close_timeout: float = 5.0
    """Deadline for the peer's answer to our close frame, and for lingering closes."""
    accept_batch: int = 64
    """accept4 calls per readable listener per loop turn."""
    max_per_ip: int = 0
    """Connections plus handshakes per client address; 0: no cap. Past it: HTTP 503."""
    hook_threads: int = 0
    """Threads that run the plain (not async def) hooks, for hooks that block. 0 runs them
    inline, on the loop thread (one at a time, never two at once): the fastest for hooks
    that never block, but A PLAIN HOOK THAT BLOCKS WITH hook_threads=0 STALLS EVERY
    CONNECTION OF THE PROCESS. Not processes:
    those are Gateway(processes=N). Coroutine hooks always run on an asyncio loop."""
    hook_queue: int = 1024
    """Hook calls off the loop thread (coroutines and hook-thread calls), running or
    waiting, at most. At the bound nothing is dropped: new hook work is held in order, the
    sockets it came from are not read, and no connection is accepted, until calls finish."""
    max_events: int = 512
    """Messages, upgrades and HTTP requests handed to Python per loop turn."""
    origins: tuple[str, ...] | None = None
    """Allowed Origin values; None allows any. Others get HTTP 403."""
    subprotocols: tuple[str, ...] = field(default_factory=tuple)
    """Subprotocols offered, in order of preference (RFC 6455 section 4.2.2)."""
    shutdown_timeout: float = 5.0
    """On SIGTERM/SIGINT: how long to wait for clients to answer close 1001."""
    backlog: int = 4096
    """listen() backlog of each listening socket (the kernel caps it at somaxconn)."""
    compression: bool = True
    """Accept permessage-deflate (RFC 7692) when a client offers it (browsers always do),
    always with no context takeover both ways: no connection keeps a zlib stream, idle or
    not; a message is compressed once per send, publish, send_to_user or broadcast. False
    declines every offer."""
    compression_level: int = 1
    """zlib level (1 fastest - 9 smallest) of the messages sent compressed."""
    compression_min_size: int = 128
    """Messages shorter than this (bytes) are sent uncompressed, even on a connection that
    negotiated compression (the RFC lets the sender choose per message)."""
    history: History | None = None
    """Stored streams with positions, resume and the envelope subprotocol ``lowmemws.v1``
    (docs/envelope.md); None (the default): fire and forget, no subprotocol added."""
    certfile: str | None = None
    """PEM certificate chain (server certificate first): with keyfile, every connection is
    TLS (wss:// and https://, TLS 1.2 and 1.3; docs/tls.md). None: plain TCP."""
    keyfile: str | None = None
    """PEM private key of certfile's certificate."""

    def __post_init__(self) -> None:
        for name in ("max_message_size", "write_limit", "write_budget", "read_buffer_size"):
            value = getattr(self, name)
            if not 0 < value < 1 << 62:
                raise ValueError(f"Config.{name} must be a positive size below 2**62")
        if not 1 <= self.compression_level <= 9:
            raise ValueError("Config.compression_level must be 1 to 9")
        if not 0 <= self.compression_min_size < 1 << 32:
            raise ValueError("Config.compression_min_size must be 0 to 2**32 - 1")
        if (self.certfile is None) != (self.keyfile is None):
            raise ValueError("Config.certfile and Config.keyfile go together (TLS needs both)")

    def resolved_max_connections(self) -> int:
        """resolved_max_connections returns max_connections, deriving it from RLIMIT_NOFILE."""
        if self.max_connections is not None:
            return self.max_connections
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        return max(1, soft - FD_HEADROOM)

    def resolved_spill_budget(self) -> int:
        """resolved_spill_budget returns spill_budget, deriving it from max_message_size."""
        if self.spill_budget is not None:
            return self.spill_budget
        return max(8 << 20, 2 * self.max_message_size + self.read_buffer_size)
