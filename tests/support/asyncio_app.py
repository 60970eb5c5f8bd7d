"""An asyncio application holding a lowmemws gateway, started by the tests as a child process.

``python -m tests.support.asyncio_app --host H --port P [--config JSON]`` runs, on one asyncio
loop (``asyncio.run``):

- the gateway, with ``await gateway.serve()`` (it stops on SIGTERM/SIGINT: clients get 1001,
  then serve returns and the process exits 0, printing ``stopped``). Its hooks are all
  ``async def``: on_connect accepts with ``?user=N`` as the user and ``?topic=T`` as its topic;
  on_message echoes;
- a plain HTTP application on an asyncio server of its own (a free port, printed as
  ``http on 127.0.0.1:Q`` before the ready line): ``POST /publish?topic=T`` publishes the body
  with ``await gateway.apublish`` and answers the number reached; ``GET /stats`` answers the
  gateway's counters as JSON.

It prints ``listening on ws://H:P`` once both listen (the contract of tests/support/servers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from urllib.parse import parse_qs, urlsplit

import lowmemws
from lowmemws import Accept, Connection, Request


def build_gateway(host: str, port: int, config: dict[str, object]) -> lowmemws.Gateway:
    """build_gateway is the gateway with its async hooks (not started)."""
    gateway = lowmemws.Gateway(host, port, config=lowmemws.Config(**config))  # type: ignore[arg-type]

    @gateway.on_connect
    async def connect(request: Request) -> Accept:
        await asyncio.sleep(0)  # a real await: the decision comes back from the loop
        topic = request.params.get("topic")
        return Accept(user=int(request.params.get("user", "0")), topics=(topic,) if topic else ())

    @gateway.on_message
    async def echo(conn: Connection, message: str | bytes) -> None:
        conn.send(message)

    return gateway


async def http_app(gateway: lowmemws.Gateway) -> asyncio.Server:
    """http_app starts the HTTP application (one request per connection)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = lines[0].split(" ", 2)
            headers = {
                name.strip().lower(): value.strip()
                for name, _, value in (line.partition(":") for line in lines[1:] if line)
            }
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            url = urlsplit(target)
            params = {name: values[0] for name, values in parse_qs(url.query).items()}
            if method == "POST" and url.path == "/publish":
                status, answer = 200, str(await gateway.apublish(params["topic"], body)).encode()
            elif method == "GET" and url.path == "/stats":
                status, answer = 200, json.dumps(gateway.stats()).encode()
            else:
                status, answer = 404, b"not found\n"
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Length: {len(answer)}\r\n"
                f"Connection: close\r\n\r\n".encode("latin-1")
                + answer
            )
            await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


async def main(host: str, port: int, config: dict[str, object]) -> None:
    gateway = build_gateway(host, port, config)
    serving = asyncio.create_task(gateway.serve())
    ready = await asyncio.to_thread(gateway.wait_ready, 30.0)
    if not ready:
        raise SystemExit("the gateway did not become ready")
    server = await http_app(gateway)
    http_port = server.sockets[0].getsockname()[1]
    print(f"http on 127.0.0.1:{http_port}", flush=True)
    print(f"listening on ws://{host}:{gateway.port}", flush=True)
    async with server:
        await serving
    print("stopped", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--config", default="{}", help="Config fields as a JSON object")
    args = parser.parse_args()
    asyncio.run(main(args.host, args.port, json.loads(args.config)))
    sys.exit(0)
