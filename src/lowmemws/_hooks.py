"""Hooks: the application's callbacks of one gateway, set with the Gateway decorators."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .connection import Connection
    from .handshake import Accept, Reject, Request, Response

ConnectHook = Callable[["Request"], "Accept | Reject | None"]
MessageHook = Callable[["Connection", "str | bytes"], None]
CloseHook = Callable[["Connection", int], None]
OpenHook = Callable[["Connection"], None]
HttpHook = Callable[["Request"], "Response | None"]


@dataclass
class Hooks:
    """Hooks holds one callback per event; None means the built-in behaviour.

    Shared by the Gateway (which sets them) and its event loop (which calls them), so a
    hook set after start() takes effect from the next event on.
    """

    connect: ConnectHook | None = None
    open: OpenHook | None = None
    message: MessageHook | None = None
    close: CloseHook | None = None
    http: HttpHook | None = None
