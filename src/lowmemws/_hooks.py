"""Hooks: the application's callbacks of one gateway, set with the Gateway decorators.

Any hook may be a plain function or an ``async def`` coroutine function; which one is
decided once, when the hook is set (inspect.iscoroutinefunction), never per call.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from .connection import Connection
    from .handshake import Accept, Reject, Request, Response

Decision = Union["Accept", "Reject", None]
ConnectHook = Callable[["Request"], "Decision | Awaitable[Decision]"]
MessageHook = Callable[["Connection", "str | bytes"], "None | Awaitable[None]"]
CloseHook = Callable[["Connection", int], "None | Awaitable[None]"]
OpenHook = Callable[["Connection"], "None | Awaitable[None]"]
HttpHook = Callable[["Request"], "Response | None | Awaitable[Response | None]"]

HOOK_NAMES = ("connect", "open", "message", "close", "http")


def is_coroutine_hook(fn: Callable[..., Any]) -> bool:
    """is_coroutine_hook: fn is an ``async def`` function, or an object whose __call__ is."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - a callable object's async __call__
    )


@dataclass
class Hooks:
    """Hooks holds one callback per event; None means the built-in behaviour.

    Shared by the Gateway (which sets them) and its event loop (which calls them), so a
    hook set after start() takes effect from the next event on. ``coroutine`` names the
    hooks that are coroutine functions.
    """

    connect: ConnectHook | None = None
    open: OpenHook | None = None
    message: MessageHook | None = None
    close: CloseHook | None = None
    http: HttpHook | None = None
    coroutine: frozenset[str] = field(default_factory=frozenset)

    def set(self, name: str, fn: Callable[..., Any]) -> None:
        """set stores fn as the hook called name and notes whether it is a coroutine one.

        Raises:
            TypeError: fn is not callable.
        """
        if not callable(fn):
            raise TypeError(f"on_{name} needs a function, not {type(fn).__name__}")
        setattr(self, name, fn)
        names = set(self.coroutine)
        if is_coroutine_hook(fn):
            names.add(name)
        else:
            names.discard(name)
        self.coroutine = frozenset(names)
