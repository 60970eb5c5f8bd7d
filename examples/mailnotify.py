"""mailnotify: "you have new mail" notifications over WebSocket, the lowmemws demo.

    python examples/mailnotify.py [--host H] [--port P] [--secret S] [--processes N] [--redis URL]

Open http://127.0.0.1:8080/, sign in with any name, then send that name a mail:

    curl -H "Authorization: Bearer $SECRET" -d '{"to":"alice","from":"bob","subject":"hi"}' \\
        http://127.0.0.1:8080/mail

Endpoints (errors are short JSON objects: {"error": "..."}):
  GET  /            the page
  POST /login       form field ``user``; sets the cookie ``session=USER:TOKEN``
  GET  /session     {"user": U, "unread": N, "positions": P} for a valid session cookie,
                    else 401; P (Gateway.positions) is where the user's mail stream stood
                    just before N was read: the page starts lowmemws.js from it
  GET  /unread      {"unread": N} for a valid session cookie (a tab told to refresh), else 401
  POST /logout      clears the cookie
  GET  /ws          the WebSocket; credentials from ?user=U&token=T or the session cookie
  POST /mail        Bearer SECRET; {"to": U, "from": F, "subject": X} -> 202
  POST /mail/self   session cookie; {"subject": X}: a test mail to yourself -> 202
  POST /broadcast   Bearer SECRET; any JSON object, sent to every connection as is -> 202
  GET  /healthz, GET /metrics   built into lowmemws

A token is the hex HMAC-SHA256 of the user name keyed with the secret, so every process and
node that shares the secret checks it without a session store. A user's connections carry a
64-bit tag derived from the name (no per-connection Python object, no per-user topic), and
``send_to_user`` reaches them on every process (``--processes``) and node (``--redis``).

History is on: every mail is stored (in Redis Streams with ``--redis``, else in the memory of
the supervising process) before it is sent, with its position in the user's stream. The page
uses lowmemws.js (served by the gateway at /lowmemws.js), which resumes from the last mail
it showed after any disconnect: each mail appears once, in order, even when the gateway
crashed and another node took the mail meanwhile; a tab that cannot resume refetches. The
page's first connection resumes too: it starts from the positions /session read with the
unread count, so a mail posted between that read and the connection is shown, also when
the first connection drops before its first ``synced``.

Unread counts live in Redis with ``--redis`` (they survive restarts and are shared by nodes);
otherwise in a small table of shared memory that the worker processes of one machine share
(lost when the demo stops).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import mmap
import multiprocessing
import re
import secrets
import struct
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl

import lowmemws

PAGE = Path(__file__).with_name("mailnotify_page.html")
MAX_BODY = 16 * 1024
MAX_FIELD = 200
USER_NAME = re.compile(r"[A-Za-z0-9._@-]{1,64}")
JSON_TYPE = "application/json"

log = logging.getLogger("mailnotify")


# -- identities ---------------------------------------------------------------------------


def token_for(secret: str, user: str) -> str:
    """token_for is the user's token: lowercase hex HMAC-SHA256 of the name, keyed by secret."""
    return hmac.new(secret.encode(), user.encode(), hashlib.sha256).hexdigest()


def user_tag(user: str) -> int:
    """user_tag maps a name to its key in the shared unread table (same in every worker)."""
    return int.from_bytes(hashlib.sha256(user.encode()).digest()[:8], "big") or 1  # 0: empty


# -- unread counts ------------------------------------------------------------------------


class StoreUnavailable(Exception):
    """StoreUnavailable: the unread counts cannot be read or changed right now."""


class Counts(Protocol):
    """Counts keeps the number of unread mails per user; errors raise StoreUnavailable."""

    def get(self, user: str) -> int: ...

    def incr(self, user: str) -> int: ...


class SharedCounts:
    """SharedCounts is a fixed hash table of (tag, count) in shared anonymous memory.

    Created before the gateway forks its workers, so they all see one table; a lock shared
    the same way makes each increment atomic. Pages are touched only as users get mail.
    """

    SLOT = struct.Struct("<QQ")

    def __init__(self, slots: int = 1 << 16) -> None:
        self.slots = slots
        self.table = mmap.mmap(-1, slots * self.SLOT.size)
        self.lock = multiprocessing.get_context("fork").Lock()

    def _find(self, tag: int) -> int:
        """_find returns the offset of tag's slot or of the empty slot where it belongs."""
        index = tag % self.slots
        for _ in range(self.slots):
            offset = index * self.SLOT.size
            found, _count = self.SLOT.unpack_from(self.table, offset)
            if found in (tag, 0):
                return offset
            index = (index + 1) % self.slots
        raise StoreUnavailable("the unread table is full")

    def get(self, user: str) -> int:
        tag = user_tag(user)
        with self.lock:
            found, count = self.SLOT.unpack_from(self.table, self._find(tag))
        return int(count) if found == tag else 0

    def incr(self, user: str) -> int:
        tag = user_tag(user)
        with self.lock:
            offset = self._find(tag)
            _found, count = self.SLOT.unpack_from(self.table, offset)
            self.SLOT.pack_into(self.table, offset, tag, count + 1)
        return int(count) + 1


class RedisCounts:
    """RedisCounts keeps the counts in Redis: ``mailnotify:unread:<user>``."""

    def __init__(self, url: str) -> None:
        import redis

        self.client = redis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
        self.errors = (redis.RedisError, OSError)

    def get(self, user: str) -> int:
        try:
            return int(self.client.get(f"mailnotify:unread:{user}") or 0)
        except self.errors as exc:
            raise StoreUnavailable(str(exc)) from exc

    def incr(self, user: str) -> int:
        try:
            return int(self.client.incr(f"mailnotify:unread:{user}"))
        except self.errors as exc:
            raise StoreUnavailable(str(exc)) from exc


# -- HTTP helpers -------------------------------------------------------------------------


class HttpError(Exception):
    """HttpError ends a request with status and a short JSON error."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def json_response(
    status: int, value: object, headers: dict[str, str] | None = None
) -> lowmemws.Response:
    return lowmemws.Response(
        status, json.dumps(value), content_type=JSON_TYPE, headers=headers or {}
    )


def json_object(body: bytes) -> dict[str, Any]:
    """json_object parses a request body that must be one JSON object."""
    try:
        value = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise HttpError(400, "body is not valid JSON") from exc
    if not isinstance(value, dict):
        raise HttpError(400, "body must be a JSON object")
    return value


def text_field(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_FIELD:
        raise HttpError(400, f'"{name}" must be a string of 1 to {MAX_FIELD} characters')
    return value


def user_field(value: object) -> str:
    if not isinstance(value, str) or not USER_NAME.fullmatch(value):
        raise HttpError(400, "user names are 1-64 of A-Z a-z 0-9 . _ @ -")
    return value


# -- the demo -----------------------------------------------------------------------------


class MailNotify:
    """MailNotify wires the demo's hooks into a lowmemws Gateway."""

    def __init__(self, gateway: lowmemws.Gateway, secret: str, counts: Counts) -> None:
        self.gateway = gateway
        self.secret = secret
        self.counts = counts
        self.page = PAGE.read_bytes()
        self.greetings: dict[str, str] = {}  # user -> hello, from on_connect to on_open
        self.routes: dict[tuple[str, str], Callable[[lowmemws.Request], lowmemws.Response]] = {
            ("GET", "/"): self.serve_page,
            ("POST", "/login"): self.login,
            ("GET", "/session"): self.session,
            ("GET", "/unread"): self.unread,
            ("POST", "/logout"): self.logout,
            ("POST", "/mail"): self.mail,
            ("POST", "/mail/self"): self.mail_self,
            ("POST", "/broadcast"): self.broadcast,
        }
        gateway.on_connect(self.on_connect)
        gateway.on_open(self.on_open)
        gateway.on_http(self.on_http)

    # authentication

    def valid(self, user: str | None, token: str | None) -> bool:
        if not user or not token or not USER_NAME.fullmatch(user):
            return False
        return hmac.compare_digest(token.encode(), token_for(self.secret, user).encode())

    def session_user(self, request: lowmemws.Request) -> str | None:
        """session_user is the user of a valid ``session=USER:TOKEN`` cookie, else None."""
        user, _, token = request.cookies.get("session", "").rpartition(":")
        return user if self.valid(user, token) else None

    def require_secret(self, request: lowmemws.Request) -> None:
        expected = f"Bearer {self.secret}"
        if not hmac.compare_digest(
            (request.header("authorization") or "").encode(), expected.encode()
        ):
            raise HttpError(401, "wrong or missing Authorization: Bearer <secret>")

    # WebSocket

    def on_connect(self, request: lowmemws.Request) -> lowmemws.Accept | lowmemws.Reject:
        if request.path != "/ws":
            return lowmemws.Reject(404)
        params = request.params
        user: str | None = params.get("user")
        if not self.valid(user, params.get("token")):
            user = self.session_user(request)
        if user is None:
            return lowmemws.Reject(401)
        try:
            unread = self.counts.get(user)
        except StoreUnavailable as exc:
            log.warning("mailnotify: cannot read the unread count: %s", exc)
            return lowmemws.Reject(503)
        self.greetings[user] = json.dumps({"type": "hello", "user": user, "unread": unread})
        return lowmemws.Accept(user=user)  # a str id: nothing kept per connection for it

    def on_open(self, conn: lowmemws.Connection) -> None:
        hello = self.greetings.pop(str(conn.user), None)
        if hello is not None:
            conn.send(hello)

    # plain HTTP

    def on_http(self, request: lowmemws.Request) -> lowmemws.Response | None:
        handler = self.routes.get((request.method, request.path))
        if handler is None:
            if any(path == request.path for _method, path in self.routes):
                return json_response(405, {"error": "method not allowed"})
            return None  # /healthz, /metrics, else 404
        try:
            if len(request.body) > MAX_BODY:
                raise HttpError(413, f"body is larger than {MAX_BODY} bytes")
            return handler(request)
        except HttpError as exc:
            return json_response(exc.status, {"error": str(exc)})
        except (lowmemws.BusUnavailable, StoreUnavailable):
            return json_response(503, {"error": "try again later"})

    def serve_page(self, request: lowmemws.Request) -> lowmemws.Response:
        return lowmemws.Response(200, self.page, content_type="text/html; charset=utf-8")

    def login(self, request: lowmemws.Request) -> lowmemws.Response:
        form = dict(parse_qsl(request.body.decode("utf-8", "replace")))
        user = user_field(form.get("user", "").strip())
        cookie = f"session={user}:{token_for(self.secret, user)}; Path=/; HttpOnly; SameSite=Strict"
        return lowmemws.Response(303, b"", headers={"Location": "/", "Set-Cookie": cookie})

    def session(self, request: lowmemws.Request) -> lowmemws.Response:
        """The page's state: the user, the unread count, and the positions read just before
        it (a mail posted in between is then counted and replayed: the page keeps the larger
        count, never a smaller one)."""
        user = self.session_user(request)
        if user is None:
            raise HttpError(401, "not signed in")
        positions = self.gateway.positions(user=user)
        unread = self.counts.get(user)
        return json_response(200, {"user": user, "unread": unread, "positions": positions})

    def unread(self, request: lowmemws.Request) -> lowmemws.Response:
        user = self.session_user(request)
        if user is None:
            raise HttpError(401, "not signed in")
        return json_response(200, {"unread": self.counts.get(user)})

    def logout(self, request: lowmemws.Request) -> lowmemws.Response:
        cookie = "session=; Path=/; Max-Age=0; HttpOnly; SameSite=Strict"
        return lowmemws.Response(303, b"", headers={"Location": "/", "Set-Cookie": cookie})

    def mail(self, request: lowmemws.Request) -> lowmemws.Response:
        self.require_secret(request)
        body = json_object(request.body)
        to = user_field(body.get("to"))
        return self.deliver(to, text_field(body, "from"), text_field(body, "subject"))

    def mail_self(self, request: lowmemws.Request) -> lowmemws.Response:
        user = self.session_user(request)
        if user is None:
            raise HttpError(401, "not signed in")
        return self.deliver(user, user, text_field(json_object(request.body), "subject"))

    def deliver(self, to: str, sender: str, subject: str) -> lowmemws.Response:
        """deliver counts the mail and notifies every connection of ``to``, everywhere."""
        unread = self.counts.incr(to)
        note = {"type": "mail", "from": sender, "subject": subject, "unread": unread}
        self.gateway.send_to_user(to, json.dumps(note))
        return json_response(202, {"unread": unread})

    def broadcast(self, request: lowmemws.Request) -> lowmemws.Response:
        self.require_secret(request)
        body = request.body
        json_object(body)
        self.gateway.broadcast(body.decode("utf-8"))  # text frame, the very bytes received
        return json_response(202, {"ok": True})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="lowmemws mail-notification demo")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--secret", default=None, help="default: a random one, printed")
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument(
        "--redis", default=None, metavar="URL", help="e.g. redis://127.0.0.1:6379/0"
    )
    parser.add_argument("--certfile", default=None, help="PEM certificate chain: serve https/wss")
    parser.add_argument("--keyfile", default=None, help="PEM private key of --certfile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")

    secret = args.secret or secrets.token_hex(16)
    counts: Counts = RedisCounts(args.redis) if args.redis else SharedCounts()
    bus = lowmemws.RedisBus(args.redis) if args.redis else None
    # With Redis, on_connect, GET /session and POST /mail wait for it (a blocking client);
    # with worker processes, GET /session waits for the parent (Gateway.positions asks the
    # history it keeps): such hooks run on hook threads, so a wait delays only that request,
    # never the other connections. One process without Redis never waits: hooks run inline,
    # the fastest way.
    blocking = bool(args.redis) or args.processes > 1
    config = lowmemws.Config(
        max_http_body=4 * MAX_BODY,
        hook_threads=8 if blocking else 0,
        history=lowmemws.History(user_size=200, user_ttl=24 * 3600.0),
        certfile=args.certfile,
        keyfile=args.keyfile,
    )
    gateway = lowmemws.Gateway(
        args.host, args.port, processes=args.processes, config=config, bus=bus
    )
    MailNotify(gateway, secret, counts)

    def announce() -> None:
        ready = gateway.wait_ready(60)
        if bus is not None and args.processes == 1:
            ready = ready and bus.wait_ready(10)  # the Redis links are up too
        if ready:
            print(f"secret: {secret}", flush=True)
            scheme = "https" if args.certfile else "http"
            print(f"listening on {scheme}://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()


if __name__ == "__main__":
    main()
