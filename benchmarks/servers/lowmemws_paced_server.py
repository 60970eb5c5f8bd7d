"""lowmemws_paced_server: the paced fan-out benchmark's server (benchmarks/paced.py, issue 18).

Every ``/ws`` connection is an idle member (no hook at all: upgrades complete in C). A plain
HTTP ``POST /broadcast?size=N&spread=S`` broadcasts one N-byte binary message to every open
connection, spread over S seconds (0: at once, unpaced), and answers ``done M`` at once
(M: the connections of this process it goes to; 0 with worker processes); ``&rate=R``
instead caps it at R deliveries a second over all worker processes (``--processes``).
Heartbeat pings are off (``--ping-interval 0`` is the default here), so the server's CPU is
the fan-out's and its loop's, not the pongs'.
"""

from __future__ import annotations

import threading

from common import parse_args, ready

import lowmemws


def main() -> None:
    args = parse_args(__doc__)
    ping = args.ping_interval if args.ping_interval is not None else 0.0
    config = lowmemws.Config(ping_interval=ping)
    gw = lowmemws.Gateway(host=args.host, port=args.port, processes=args.processes, config=config)

    @gw.on_http
    def on_http(request: lowmemws.Request) -> lowmemws.Response | None:
        if request.method != "POST" or request.path != "/broadcast":
            return None
        payload = b"x" * int(request.params.get("size", "256"))
        spread = float(request.params.get("spread", "0"))
        rate = float(request.params.get("rate", "0"))
        members = gw.broadcast(payload, spread=spread or None, rate=rate or None)
        return lowmemws.Response(200, f"done {members}\n".encode())

    waiter = threading.Thread(target=lambda: gw.wait_ready(120) and ready(args.host, args.port))
    waiter.daemon = True
    waiter.start()
    gw.run()


if __name__ == "__main__":
    main()
