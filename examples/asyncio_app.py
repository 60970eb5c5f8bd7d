"""asyncio_app: an aiohttp application and a lowmemws gateway sharing one asyncio loop.

    python examples/asyncio_app.py --ws-port 8081 --http-port 8080

    websocat 'ws://127.0.0.1:8081/?token=alice-token'           # user 1
    curl -d 'you have mail' 'http://127.0.0.1:8080/notify?user=1'  # reaches alice's tabs

The gateway's on_connect is ``async def``: it awaits a session store without stalling any
other connection (while it runs, the upgrade waits parked in C under handshake_timeout).
The aiohttp handlers publish with ``gateway.send_to_user``/``gateway.publish`` directly:
with the default LocalBus that is a call into C, no thread hop. The sockets of the
WebSocket clients are served by the gateway's own thread in C, so a busy aiohttp handler
never delays their heartbeats or fan-out. SIGTERM/SIGINT: clients get close 1001, then the
HTTP side stops.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

import lowmemws

# A stand-in for Redis or a database: session token -> user id.
SESSIONS = {"alice-token": 1, "bob-token": 2}


async def user_for(token: str) -> int | None:
    """user_for looks a token up in the "store"; the sleep stands for its round trip."""
    await asyncio.sleep(0.005)  # a real store: `await redis.get(f"session:{token}")`
    return SESSIONS.get(token)


def make_gateway(host: str, port: int) -> lowmemws.Gateway:
    """make_gateway is a gateway whose upgrades are authorised by an async hook."""
    gateway = lowmemws.Gateway(host, port)

    @gateway.on_connect
    async def authenticate(request: lowmemws.Request) -> lowmemws.Accept | lowmemws.Reject:
        # request stays valid until this coroutine returns, across its awaits
        user = await user_for(request.params.get("token", ""))
        if user is None:
            return lowmemws.Reject(401)
        return lowmemws.Accept(user=user, topics=("announcements",))

    @gateway.on_open
    def greet(conn: lowmemws.Connection) -> None:  # a plain def is fine: it never blocks
        conn.send(f"hello user {conn.user}")

    return gateway


def make_app(gateway: lowmemws.Gateway) -> web.Application:
    """make_app is the HTTP side: POST /notify?user=ID and POST /announce, body = text."""

    async def notify(request: web.Request) -> web.Response:
        user = request.query.get("user", "")
        if not user.isdigit() or not 0 < int(user) < 1 << 64:
            raise web.HTTPBadRequest(text="?user=<user id> is required\n")
        text = await request.text()
        delivered = gateway.send_to_user(int(user), text)  # straight into C, from this loop
        return web.json_response({"delivered": delivered}, status=202)

    async def announce(request: web.Request) -> web.Response:
        delivered = gateway.publish("announcements", await request.text())
        return web.json_response({"delivered": delivered}, status=202)

    app = web.Application(client_max_size=64 * 1024)
    app.add_routes([web.post("/notify", notify), web.post("/announce", announce)])
    return app


async def main(host: str, ws_port: int, http_port: int) -> None:
    gateway = make_gateway(host, ws_port)
    runner = web.AppRunner(make_app(gateway))
    await runner.setup()
    # serve() runs until SIGTERM/SIGINT (it installs the handlers: this is the main thread)
    # or gateway.stop(), closes every client with 1001, then returns.
    serving = asyncio.create_task(gateway.serve())
    try:
        await asyncio.sleep(0)  # serve() binds its port before its first await ...
        if serving.done():
            serving.result()  # ... so a port in use raises here
        await web.TCPSite(runner, host, http_port).start()
        print(f"listening on ws://{host}:{gateway.port} and http://{host}:{http_port}", flush=True)
        await serving
    finally:
        gateway.stop()  # on this loop it does not wait: serve() returns once clients are closed
        await asyncio.wait([serving])  # (its own error, if any, was raised above)
        await runner.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="lowmemws in an aiohttp application")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--ws-port", type=int, default=8081)
    parser.add_argument("--http-port", type=int, default=8080)
    args = parser.parse_args()
    asyncio.run(main(args.host, args.ws_port, args.http_port))
