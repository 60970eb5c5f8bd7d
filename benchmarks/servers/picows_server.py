"""picows_server: the benchmark server on picows (ws_create_server, default settings)."""

from __future__ import annotations

import asyncio
import signal

from common import is_subscriber, parse_args, publish_request, ready, user_id
from picows import WSFrame, WSListener, WSMsgType, WSTransport, WSUpgradeRequest, ws_create_server

users: dict[int, WSTransport] = {}
topics: dict[str, set[WSTransport]] = {"all": set()}


def publish(count: int, payload: bytes) -> int:
    members = topics["all"]
    for _ in range(count):
        for transport in members:
            transport.send(WSMsgType.BINARY, payload)
    return count * len(members)


class Connection(WSListener):
    """Connection is picows's per-connection listener: the user id lives here."""

    def __init__(self, user: int, subscribed: bool) -> None:
        self.user = user
        self.subscribed = subscribed

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.subscribed:
            users[self.user] = transport
            topics["all"].add(transport)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        kind = frame.msg_type
        if kind == WSMsgType.BINARY:
            transport.send(WSMsgType.BINARY, frame.get_payload_as_bytes())
        elif kind == WSMsgType.TEXT:
            req = publish_request(frame.get_payload_as_utf8_text())
            if req is None:
                transport.send(WSMsgType.TEXT, frame.get_payload_as_bytes())
            else:
                transport.send(WSMsgType.TEXT, f"done {publish(*req)}".encode())
        elif kind == WSMsgType.CLOSE:
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if self.subscribed:
            users.pop(self.user, None)
            topics["all"].discard(transport)


def factory(request: WSUpgradeRequest) -> Connection:
    path = request.path.decode()
    return Connection(user_id(path), is_subscriber(path))


async def main() -> None:
    args = parse_args(__doc__)
    server = await ws_create_server(factory, args.host, args.port)
    stop = asyncio.get_running_loop().create_future()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set_result, None)
    ready(args.host, args.port)
    await stop
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
