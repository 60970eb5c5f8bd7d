"""websockets_server: the benchmark server on websockets (asyncio API, default settings)."""

from __future__ import annotations

import asyncio
import signal

from common import is_subscriber, parse_args, publish_request, ready, user_id
from websockets.asyncio.server import ServerConnection, broadcast, serve

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


async def main() -> None:
    args = parse_args(__doc__)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    async with serve(handler, args.host, args.port):
        ready(args.host, args.port)
        await stop


if __name__ == "__main__":
    asyncio.run(main())
