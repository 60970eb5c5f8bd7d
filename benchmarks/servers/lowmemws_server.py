"""lowmemws_server: the benchmark server on lowmemws (Gateway, default Config).

``--hook async`` declares on_connect as ``async def`` (issue 11); ``--hook-delay S`` makes it
wait S seconds before accepting: ``await asyncio.sleep(S)`` when async, ``time.sleep(S)`` (a
blocking lookup) when sync. ``--hook-threads N`` sets ``Config.hook_threads``, ``--backlog N``
``Config.backlog``; ``--message-hook async`` makes the echo an ``async def`` on_message;
``--user-ids str`` or ``long-str`` accepts each connection with a str user id (issue 12);
``--certfile C --keyfile K`` serve TLS.
Every option left out keeps the library's default.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

from common import is_subscriber, parse_args, publish_request, ready

import lowmemws

USER_ID_FORMS = {
    "int": int,
    # the load clients number users from 2**40: "u" and the last 8 digits stay within the 9
    # characters a tag keeps reversibly ("u" + all 13 digits would be a long, hashed id)
    "str": lambda n: f"u{n % 10**8:08d}",
    "long-str": lambda n: f"user-{n}@mail.example.com",  # a keyed hash, its name kept
    "uuid": lambda n: str(uuid.UUID(int=n)),  # 36 characters: a keyed hash, its name kept
}
user_id_form = USER_ID_FORMS["int"]


def accept(request: lowmemws.Request) -> lowmemws.Accept:
    """accept gives a /ws connection its user id (in the form --user-ids names) and the
    topic "all" (see common.py)."""
    if not is_subscriber(request.path):
        return lowmemws.Accept(user=0, topics=())
    return lowmemws.Accept(user=user_id_form(int(request.params.get("user", "0"))), topics=("all",))


def main() -> None:
    global user_id_form
    args = parse_args(__doc__)
    user_id_form = USER_ID_FORMS[args.user_ids]
    options: dict[str, Any] = {}
    if args.ping_interval is not None:
        options["ping_interval"] = args.ping_interval
    if args.hook_threads is not None:
        options["hook_threads"] = args.hook_threads
    if args.backlog is not None:
        options["backlog"] = args.backlog
    if args.certfile is not None:
        options["certfile"], options["keyfile"] = args.certfile, args.keyfile
    config = lowmemws.Config(**options)
    gw = lowmemws.Gateway(host=args.host, port=args.port, processes=args.processes, config=config)
    delay = args.hook_delay

    if args.hook == "async":

        @gw.on_connect
        async def on_connect_async(request: lowmemws.Request) -> lowmemws.Accept:
            answer = accept(request)
            if delay > 0:
                await asyncio.sleep(delay)
            return answer

    else:

        @gw.on_connect
        def on_connect(request: lowmemws.Request) -> lowmemws.Accept:
            if delay > 0:
                time.sleep(delay)
            return accept(request)

    def echo(conn: lowmemws.Connection, message: str | bytes) -> None:
        req = publish_request(message)
        if req is None:
            conn.send(message)
            return
        count, payload = req
        written = sum(gw.publish("all", payload) for _ in range(count))
        conn.send(f"done {written}")

    if args.message_hook == "async":

        @gw.on_message
        async def on_message_async(conn: lowmemws.Connection, message: str | bytes) -> None:
            echo(conn, message)

    else:
        gw.on_message(echo)

    # The ready line waits until every worker process listens (run() blocks this thread).
    waiter = threading.Thread(target=lambda: gw.wait_ready(120) and ready(args.host, args.port))
    waiter.daemon = True
    waiter.start()
    gw.run()


if __name__ == "__main__":
    main()
