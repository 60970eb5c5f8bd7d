"""aiohttp_server: the benchmark server on aiohttp's web.WebSocketResponse (defaults)."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import WSMsgType, web
from common import is_subscriber, parse_args, publish_request, ready

users: dict[int, web.WebSocketResponse] = {}
topics: dict[str, set[web.WebSocketResponse]] = {"all": set()}


async def publish(count: int, payload: bytes) -> int:
    members = list(topics["all"])
    for _ in range(count):
        for ws in members:
            await ws.send_bytes(payload)
    return count * len(members)


async def ws_handler(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse()
    await ws.prepare(request)
    subscribed = is_subscriber(request.path)
    user = int(request.query.get("user", "0"))
    if subscribed:
        users[user] = ws
        topics["all"].add(ws)
    try:
        async for msg in ws:
            if msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data)
            elif msg.type == WSMsgType.TEXT:
                req = publish_request(msg.data)
                if req is None:
                    await ws.send_str(msg.data)
                else:
                    await ws.send_str(f"done {await publish(*req)}")
    finally:
        if subscribed:
            users.pop(user, None)
            topics["all"].discard(ws)
    return ws


async def main() -> None:
    args = parse_args(__doc__)
    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    app.router.add_get("/control", ws_handler)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, args.host, args.port).start()
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    ready(args.host, args.port)
    await stop
    await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
