"""common: the behaviour every benchmark server shares, whatever the library.

Every server in this folder does the same thing with its library's defaults:

- ``/ws?user=N``: the connection is given the 64-bit user id N, stored in ``users``, and
  subscribed to the one topic ``"all"``; every message it sends is echoed back.
- ``/control``: a connection that is neither a user nor a subscriber. A text message
  ``!publish K SIZE`` makes the server publish K messages of SIZE bytes (binary) to topic
  ``"all"`` with the library's natural fan-out, then answer ``done N`` (N = frames written);
  ``!publish K SIZE json`` publishes a JSON document of SIZE bytes instead (a notification),
  and a further ``z`` asks the floor to send it compressed (permessage-deflate bytes made
  once: the floor of a server that compresses once per publish).
- it prints ``listening on ws://HOST:PORT`` when ready and stops on SIGTERM / SIGINT.

``--hook-delay SECONDS`` (auth_io.py, issue 11) makes the server's upgrade hook (on_connect,
process_request) wait that long before accepting, like an auth lookup in a session store:
``await asyncio.sleep`` in an async hook, ``time.sleep`` in a sync one. ``--hook`` and
``--message-hook`` and ``--hook-threads`` choose how lowmemws runs
its hooks; ``--backlog`` sets the listen() backlog.
The defaults keep every other benchmark's server as it was.
"""

from __future__ import annotations

import argparse
from urllib.parse import parse_qs, urlsplit

PUBLISH_PREFIX = "!publish "


def parse_args(description: str) -> argparse.Namespace:
    """parse_args reads --host and --port (and --processes, --ping-interval for lowmemws)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8765)
    p.add_argument("--processes", type=int, default=1)
    p.add_argument(
        "--ping-interval",
        type=float,
        default=None,
        help="lowmemws heartbeat interval (scale.py only; default: the library's)",
    )
    p.add_argument(
        "--hook-delay",
        type=float,
        default=0.0,
        help="seconds the upgrade hook waits before accepting (default 0: no wait)",
    )
    p.add_argument(
        "--hook",
        choices=("sync", "async"),
        default="sync",
        help="lowmemws on_connect as a plain function or as async def (default sync)",
    )
    p.add_argument(
        "--message-hook",
        choices=("sync", "async"),
        default="sync",
        help="lowmemws on_message (the echo) as a plain function or as async def",
    )
    p.add_argument(
        "--hook-threads",
        type=int,
        default=None,
        help="lowmemws Config.hook_threads (default: the library's)",
    )
    p.add_argument(
        "--backlog",
        type=int,
        default=None,
        help="listen() backlog (default: the library's; asyncio's is 100, lowmemws' 4096)",
    )
    p.add_argument(
        "--user-ids",
        choices=("int", "str", "long-str", "uuid"),
        default="int",
        help="lowmemws: /ws?user=N accepted as the int N, the str 'uN' (kept in the tag) or "
        "'user-N@mail.example.com' or a UUID (hashed, the name kept per user); default int",
    )
    p.add_argument("--certfile", default=None, help="serve TLS (wss://) with this certificate")
    p.add_argument("--keyfile", default=None, help="the private key of --certfile")
    return p.parse_args()


def user_id(path: str) -> int:
    """user_id returns the ``user`` query parameter of a request path (0 when absent)."""
    values = parse_qs(urlsplit(path).query).get("user")
    return int(values[0]) if values else 0


def is_subscriber(path: str) -> bool:
    """is_subscriber tells a load-client connection (/ws) from the control connection."""
    return not path.startswith("/control")


def publish_request(message: object) -> tuple[int, bytes] | None:
    """publish_request parses ``!publish K SIZE`` into (K, payload), else returns None."""
    if not isinstance(message, str) or not message.startswith(PUBLISH_PREFIX):
        return None
    count, size, *kind = message[len(PUBLISH_PREFIX) :].split()
    if "json" in kind:
        return int(count), json_payload(int(size))
    return int(count), bytes(range(256)) * (int(size) // 256) + b"x" * (int(size) % 256)


def json_payload(size: int) -> bytes:
    """json_payload is a JSON list of mail notifications, exactly size bytes (size >= 2)."""
    items, i = [], 0
    while True:
        item = (
            f'{{"id":{1000 + i},"type":"mail","from":"user{i * 7 % 97}@example.com",'
            f'"subject":"Quarterly report {i}","unread":{i % 13},"ts":{1764400000 + i * 61}}}'
        )
        if len(",".join([*items, item])) + 2 > size:
            break
        items.append(item)
        i += 1
    body = "[" + ",".join(items) + "]"
    return (body + " " * (size - len(body))).encode()


def wants_compressed(message: object) -> bool:
    """wants_compressed: the publish request asks the floor for compressed frames (``z``)."""
    return isinstance(message, str) and message.split()[-1:] == ["z"]


def ready(host: str, port: int) -> None:
    """ready prints the line the benchmark harness waits for."""
    print(f"listening on ws://{host}:{port}", flush=True)
