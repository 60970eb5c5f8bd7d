"""websockets_server: the benchmark server on websockets (asyncio API, default settings).

With ``--hook-delay S`` an ``async def process_request`` awaits ``asyncio.sleep(S)`` before
every handshake goes on (an auth lookup); ``--backlog N`` is passed to the listening socket;
``--certfile C --keyfile K`` serve TLS with an ssl context; ``--ping-interval 0`` turns pings off.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from common import is_subscriber, parse_args, publish_request, ready, user_id
from websockets.asyncio.server import ServerConnection, broadcast, serve
from websockets.http11 import Request

users: dict[int, ServerConnection] = {}
topics: dict[str, set[ServerConnection]] = {"all": set()}


async def handler(ws: ServerConnection) -> None:
    path = ws.request.path
    subscribed = is_subscriber(path)
    user = user_id(path)
    if subscribed:
        users[user] = ws
        topics["all"].add(ws)
    try:
        async for message in ws:
            request = publish_request(message)
            if request is None:
                await ws.send(message)
                continue
            count, payload = request
            members = topics["all"]
            for _ in range(count):
                broadcast(members, payload)
            await ws.send(f"done {count * len(members)}")
    finally:
        if subscribed:
            users.pop(user, None)
            topics["all"].discard(ws)


def auth_hook(delay: float) -> Callable[[ServerConnection, Request], Awaitable[None]] | None:
    """auth_hook returns a process_request that waits ``delay`` seconds, or None for none."""
    if delay <= 0:
        return None

    async def process_request(connection: ServerConnection, request: Request) -> None:
        await asyncio.sleep(delay)

    return process_request


async def main() -> None:
    args = parse_args(__doc__)
    options: dict[str, Any] = {"process_request": auth_hook(args.hook_delay)}
    if args.backlog is not None:
        options["backlog"] = args.backlog
    if args.certfile is not None:  # TLS through Python's ssl module (OpenSSL)
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(args.certfile, args.keyfile)
        options["ssl"] = context
    if args.ping_interval is not None:
        options["ping_interval"] = args.ping_interval or None
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, args.host, args.port, **options):
        ready(args.host, args.port)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
