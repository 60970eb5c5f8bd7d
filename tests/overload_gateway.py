"""An echo gateway whose loop can be made busy on demand, started as a child by the overload
tests (tests/test_overload.py) and benchmarks/overload.py.

``python overload_gateway.py --host H --port P --config '{"ping_interval": 2, ...}'`` builds
``lowmemws.Gateway(config=lowmemws.Config(**config))`` that echoes every message and prints
``listening on ws://H:P`` once it accepts connections (the contract of
tests/support/servers.py). Plain HTTP on the same port:

- ``POST /stall?seconds=S``: a slow synchronous hook: sleeps S seconds (at most 30) on the
  loop thread, so the loop polls nothing meanwhile, then answers 200 with the seconds slept
  and the time.monotonic() the sleep began;
- ``GET /stats``: the runtime counters as JSON (``Gateway.stats()``);
- anything else: the built-in ``/healthz`` and ``/metrics``.
"""

from __future__ import annotations

import argparse
import json
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
        conn.send(message)

    @gateway.on_http
    def http(request: Request) -> Response | None:
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
    args = parser.parse_args()
    gateway = build_gateway(args.host, args.port, json.loads(args.config))

    def announce() -> None:
        if gateway.wait_ready(60):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()


if __name__ == "__main__":
    main()
