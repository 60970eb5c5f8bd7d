"""lowmemws: a WebSocket gateway where an idle connection costs tens of bytes.

    gateway = lowmemws.Gateway("127.0.0.1", 8080)

    @gateway.on_connect
    def auth(request):                 # a borrowed view: valid only during the call
        return lowmemws.Accept(user=42, topics=("news",))

    gateway.run()                      # publish("news", ...) from any thread
"""

from .bus import Envelope, LocalBus, ProcessBus, RedisBus
from .config import Config
from .connection import Connection
from .errors import BusUnavailable, HandshakeError, LowMemWSError, ProtocolError
from .handshake import Accept, Reject, Request, Response
from .server import Gateway, serve

__version__ = "0.1.0"

__all__ = [
    "Accept",
    "BusUnavailable",
    "Config",
    "Connection",
    "Envelope",
    "Gateway",
    "HandshakeError",
    "LocalBus",
    "LowMemWSError",
    "ProcessBus",
    "ProtocolError",
    "RedisBus",
    "Reject",
    "Request",
    "Response",
    "serve",
]
