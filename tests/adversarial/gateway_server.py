"""An echo gateway with chosen Config values, started by the adversarial tests as a child.

``python gateway_server.py --host H --port P --config '{"handshake_timeout": 1.0, ...}'``
builds ``lowmemws.Gateway(config=lowmemws.Config(**config))`` that echoes every message and
prints ``listening on ws://H:P`` once it accepts connections (the contract of
tests/support/servers.py). Plain HTTP on the same port:

- ``POST /echo``: answers 200 with the request body;
- ``POST /broadcast?policy=drop|close``: sends the body as a binary message to every open
  connection and answers with the number reached;
- ``POST /stall?seconds=S``: a slow synchronous hook (the overload tests): sleeps S seconds
  (at most 30) on the loop thread, so the loop polls nothing meanwhile, then answers 200 with
  the seconds slept and the time.monotonic() the sleep began;
- ``GET /stats``: the runtime counters as JSON (``Gateway.stats()``);
- anything else: the built-in ``/healthz`` and ``/metrics``.

Two text messages are commands instead of being echoed:

- ``big:N``: the server sends a binary message of N zero bytes (a view of untouched anonymous
  pages, which cost no RSS) and then answers ``sent:<SENT|DROPPED|GONE>:<seconds conn.send took>``;
- ``close-me``: the server starts the closing handshake (``conn.close()``, code 1000).

``--nofile N`` lowers RLIMIT_NOFILE to N before the gateway is built (so the default
max_connections, RLIMIT_NOFILE minus 64, follows it).
"""

from __future__ import annotations

import argparse
import json
import mmap
import resource
import threading
import time

import lowmemws
from lowmemws.handshake import Request, Response

MAX_STALL = 30.0


def build_gateway(host: str, port: int, config: dict[str, object]) -> lowmemws.Gateway:
    """build_gateway returns the echo gateway with its HTTP hook (not started)."""
    gateway = lowmemws.Gateway(host, port, config=lowmemws.Config(**config))  # type: ignore[arg-type]

    @gateway.on_message
    def echo(conn: lowmemws.Connection, message: str | bytes) -> None:
        if isinstance(message, str) and message.startswith("big:"):
            size = int(message[4:])
            with mmap.mmap(-1, size) as pages:
                view = memoryview(pages)
                started = time.monotonic()
                sent = conn.send(view)
                took = time.monotonic() - started
                view.release()
            conn.send(f"sent:{sent.name}:{took:.3f}")
            return
        if message == "close-me":
            conn.close()
            return
        conn.send(message)

    @gateway.on_http
    def http(request: Request) -> Response | None:
        if request.method == "POST" and request.path == "/echo":
            return Response(200, request.body, content_type="application/octet-stream")
        if request.method == "POST" and request.path == "/broadcast":
            policy = request.params.get("policy", "drop")
            reached = gateway.broadcast(request.body, policy=policy)  # type: ignore[arg-type]
            return Response(200, str(reached))
        if request.method == "POST" and request.path == "/stall":
            seconds = min(max(float(request.params.get("seconds", "1")), 0.0), MAX_STALL)
            started = time.monotonic()
            time.sleep(seconds)  # on the loop thread: nothing is polled meanwhile
            return Response(200, f"{time.monotonic() - started:.3f} {started:.6f}")
        if request.method == "GET" and request.path == "/stats":
            return Response(200, json.dumps(gateway.stats()), content_type="application/json")
        return None

    return gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--config", default="{}", help="Config keyword arguments as JSON")
    parser.add_argument("--nofile", type=int, default=0, help="RLIMIT_NOFILE (soft) to set")
    args = parser.parse_args()
    if args.nofile:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (args.nofile, hard))
    gateway = build_gateway(args.host, args.port, json.loads(args.config))

    def announce() -> None:
        if gateway.wait_ready(60):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()


if __name__ == "__main__":
    main()
