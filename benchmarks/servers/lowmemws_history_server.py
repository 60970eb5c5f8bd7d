"""lowmemws_history_server: the lowmemws benchmark server with history on (issue 12).

The same server as lowmemws_server.py, with ``Config(history=History())``: every publish to
"all" is stored in the in-memory history first and gets its position, and its envelope
(for clients of lowmemws.v1) is built once; the load clients are raw and get raw frames.
"""

from __future__ import annotations

import functools

import lowmemws

lowmemws.Config = functools.partial(lowmemws.Config, history=lowmemws.History())  # type: ignore[misc]

from lowmemws_server import main  # noqa: E402

if __name__ == "__main__":
    main()
