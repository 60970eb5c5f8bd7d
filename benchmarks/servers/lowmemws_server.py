"""lowmemws_server: the benchmark server on lowmemws (Gateway, default Config)."""

from __future__ import annotations

import threading

from common import is_subscriber, parse_args, publish_request, ready

import lowmemws


def main() -> None:
    args = parse_args(__doc__)
    config = lowmemws.Config()
    if args.ping_interval is not None:
        config = lowmemws.Config(ping_interval=args.ping_interval)
    gw = lowmemws.Gateway(host=args.host, port=args.port, processes=args.processes, config=config)

    @gw.on_connect
    def on_connect(request: lowmemws.Request) -> lowmemws.Accept:
        if not is_subscriber(request.path):
            return lowmemws.Accept(user=0, topics=())
        return lowmemws.Accept(user=int(request.params.get("user", "0")), topics=("all",))

    @gw.on_message
    def on_message(conn: lowmemws.Connection, message: str | bytes) -> None:
        req = publish_request(message)
        if req is None:
            conn.send(message)
            return
        count, payload = req
        written = sum(gw.publish("all", payload) for _ in range(count))
        conn.send(f"done {written}")

    # The ready line waits until every worker process listens (run() blocks this thread).
    waiter = threading.Thread(target=lambda: gw.wait_ready(120) and ready(args.host, args.port))
    waiter.daemon = True
    waiter.start()
    gw.run()


if __name__ == "__main__":
    main()
