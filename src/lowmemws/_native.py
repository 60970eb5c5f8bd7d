"""The single import point for the compiled module; everything else imports from here."""

from __future__ import annotations

from typing import Any

try:
    from ._lowmemws import ffi as _ffi
    from ._lowmemws import lib as _lib
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError(
        "lowmemws: the compiled module lowmemws._lowmemws is missing; reinstall lowmemws "
        "with a C compiler available (Debian/Ubuntu: apt-get install gcc python3-dev)"
    ) from exc

ffi: Any = _ffi
lib: Any = _lib

__all__ = ["ffi", "lib"]
