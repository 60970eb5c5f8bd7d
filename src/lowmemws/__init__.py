"""lowmemws: a WebSocket gateway where an idle connection costs tens of bytes.

A Gateway holds the connections; hooks decide (on_connect returns Accept(user=..,
topics=..) or Reject(status)) and react (on_message, on_close, on_http); publish,
send_to_user and broadcast work from any thread. See the README for an example.
"""

from ._c_server import tls_available
from ._history import History
from ._user_ids import UserTag
from .bus import Envelope, LocalBus, ProcessBus, RedisBus
from .close_codes import CloseCode
from .config import Config
from .connection import Connection, SendResult
from .errors import (
    BusUnavailable,
    HandshakeError,
    LowMemWSError,
    PresenceTimeout,
    ProtocolError,
    TLSError,
)
from .handshake import Accept, Reject, Request, Response
from .headers import Headers
from .publisher import Publisher
from .server import Gateway, serve

__version__ = "0.1.0"

__all__ = [
    "Accept",
    "BusUnavailable",
    "CloseCode",
    "Config",
    "Connection",
    "Envelope",
    "Gateway",
    "HandshakeError",
    "History",
    "Headers",
    "LocalBus",
    "LowMemWSError",
    "PresenceTimeout",
    "ProcessBus",
    "ProtocolError",
    "Publisher",
    "RedisBus",
    "Reject",
    "Request",
    "Response",
    "SendResult",
    "TLSError",
    "UserTag",
    "serve",
    "tls_available",
]
