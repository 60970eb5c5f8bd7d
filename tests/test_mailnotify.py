"""examples/mailnotify.py end to end: a real browser signs in, connects and gets its mail.

Each demo runs as a child process on a loopback port with a known secret and is stopped by
PID. Headless Chromium (tests/support/chromium.py) drives the page; wsproto clients and raw
sockets check what the page cannot see (401 on the upgrade, byte-for-byte broadcasts). The
scale-out cases run the demo with ``--processes 2`` and as two processes sharing a real
redis-server. Set MAILNOTIFY_SCREENSHOT=docs/screenshot-mailnotify.png to refresh the README's
screenshot from the first test.
"""

from __future__ import annotations

import base64
import http.client
import json
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from examples.mailnotify import token_for
from tests.support.chromium import Chromium, find_chromium
from tests.support.ci import skip_or_fail
from tests.support.redis_server import RedisServer, require_redis
from tests.support.servers import LOOPBACK, ServerProcess, free_port
from tests.support.wire import read_until
from tests.support.wsproto_client import WsprotoClient

DEMO = Path(__file__).resolve().parents[1] / "examples" / "mailnotify.py"
SECRET = "test-secret"
READY = "listening on http://"
WAIT = 20.0

Demo = Callable[..., ServerProcess]


# -- the demo as a child process ------------------------------------------------------------


def start_demo(*args: str, port: int | None = None) -> ServerProcess:
    """start_demo runs the demo on a loopback port and waits for its ready line."""
    port = port or free_port()
    argv = [sys.executable, str(DEMO), "--host", LOOPBACK, "--port", str(port), "--secret", SECRET]
    server = ServerProcess([*argv, *args], LOOPBACK, port)
    deadline = time.monotonic() + 30
    while READY not in server.output():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            server.stop()
            pytest.fail(f"the demo did not start; its output:\n{server.output()}")
        time.sleep(0.05)
    return server


@pytest.fixture
def demo() -> Iterator[Demo]:
    """demo(*args, port=None) starts a demo; every one is stopped by PID at teardown."""
    started: list[ServerProcess] = []

    def start(*args: str, port: int | None = None) -> ServerProcess:
        started.append(start_demo(*args, port=port))
        return started[-1]

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """redis_url is a throw-away redis-server's URL (CI=true: a missing one fails)."""
    server = RedisServer(require_redis(), tmp_path)
    server.start()
    yield server.url
    server.kill()


@pytest.fixture
def demo_browser() -> Iterator[Chromium]:
    """demo_browser is a fresh headless Chromium (no cookies) with a 900x640 viewport."""
    if find_chromium() is None:
        skip_or_fail("headless Chromium is not installed (Debian: apt-get install chromium)")
    with Chromium() as chromium:
        chromium.send(
            "Emulation.setDeviceMetricsOverride",
            {"width": 900, "height": 640, "deviceScaleFactor": 1, "mobile": False},
        )
        yield chromium


# -- HTTP and WebSocket helpers -------------------------------------------------------------


def request(
    server: ServerProcess,
    method: str,
    path: str,
    body: bytes = b"",
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """request sends one HTTP request to the demo and returns (status, headers, body)."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


def mail(server: ServerProcess, to: str, subject: str, sender: str = "bob") -> int:
    """mail POSTs /mail with the secret and returns the unread count of the answer."""
    body = json.dumps({"to": to, "from": sender, "subject": subject}).encode()
    auth = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    status, _, answer = request(server, "POST", "/mail", body, auth)
    assert status == 202, answer
    return int(json.loads(answer)["unread"])


def upgrade_status(server: ServerProcess, target: str, extra: str = "") -> str:
    """upgrade_status sends a raw Upgrade request and returns the response's status line."""
    key = base64.b64encode(os.urandom(16)).decode()
    head = (
        f"GET {target} HTTP/1.1\r\nHost: {server.host}:{server.port}\r\n"
        f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
        f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
    )
    with socket.create_connection((server.host, server.port), timeout=10) as sock:
        sock.sendall(head.encode())
        answer = read_until(sock, b"\r\n")
    return answer.split(b"\r\n", 1)[0].decode()


def ws_client(server: ServerProcess, user: str) -> WsprotoClient:
    """ws_client connects as user (query credentials) and consumes the hello."""
    client = WsprotoClient(server.host, server.port, f"/ws?user={user}&token={token(user)}")
    hello = json.loads(client.receive_message())
    assert hello["type"] == "hello" and hello["user"] == user
    return client


def token(user: str) -> str:
    return token_for(SECRET, user)


# -- browser helpers ------------------------------------------------------------------------


def wait_for(browser: Chromium, expression: str, what: str, timeout: float = WAIT) -> Any:
    """wait_for polls a JavaScript expression until it is truthy and returns its value."""
    deadline = time.monotonic() + timeout
    value: Any = None
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.05)
    status = browser.evaluate("document.querySelector('#status')?.textContent")
    pytest.fail(f"timed out waiting for {what} (last value {value!r}, #status {status!r})")


def text(browser: Chromium, selector: str) -> str:
    return str(browser.evaluate(f"document.querySelector({selector!r}).textContent"))


def sign_in(browser: Chromium, server: ServerProcess, user: str) -> None:
    """sign_in opens the page, signs in through its form and waits for #status connected."""
    browser.navigate(f"http://{server.host}:{server.port}/")
    wait_for(browser, "!document.querySelector('#signin').hidden", "the sign-in form")
    browser.evaluate(
        f"document.querySelector('#login input[name=user]').value = {user!r};"
        "document.querySelector('#login button').click()"
    )
    wait_connected(browser)
    assert text(browser, "#user") == user


def wait_connected(browser: Chromium, timeout: float = WAIT) -> None:
    expression = "document.querySelector('#status').textContent === 'connected'"
    wait_for(browser, expression, "#status 'connected'", timeout)


def wait_mail(browser: Chromium, subject: str) -> None:
    expression = f"document.querySelector('#notifications').textContent.includes({subject!r})"
    wait_for(browser, expression, f"a notification with the subject {subject!r}")


def wait_unread(browser: Chromium, count: int) -> None:
    expression = f"document.querySelector('#unread').textContent === {str(count)!r}"
    wait_for(browser, expression, f"#unread {count}")


# -- the single-process demo ----------------------------------------------------------------


def test_sign_in_connect_and_receive_mail(
    demo_browser: Chromium, demo: Demo, tmp_path: Path
) -> None:
    server = demo()
    sign_in(demo_browser, server, "alice")
    assert text(demo_browser, "#unread") == "0"

    assert mail(server, "alice", "Quarterly report") == 1
    wait_mail(demo_browser, "Quarterly report")
    wait_unread(demo_browser, 1)

    demo_browser.evaluate(
        "document.querySelector('#subject').value = 'Lunch on Friday?';"
        "document.querySelector('#compose button').click()"
    )
    wait_mail(demo_browser, "Lunch on Friday?")
    wait_unread(demo_browser, 2)
    entries = demo_browser.evaluate("document.querySelectorAll('#notifications li').length")
    assert entries == 2

    shot = Path(os.environ.get("MAILNOTIFY_SCREENSHOT") or tmp_path / "mailnotify.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert demo_browser.screenshot(shot).read_bytes().startswith(b"\x89PNG")

    demo_browser.navigate(f"http://{server.host}:{server.port}/")  # a reconnect keeps the count
    wait_connected(demo_browser)
    wait_unread(demo_browser, 2)


def test_missing_or_wrong_credentials_get_401_and_no_upgrade(demo: Demo) -> None:
    server = demo()
    wrong = "0" * 64
    assert " 401 " in upgrade_status(server, f"/ws?user=alice&token={wrong}")
    assert " 401 " in upgrade_status(server, "/ws")
    assert " 401 " in upgrade_status(server, "/ws", f"Cookie: session=alice:{wrong}\r\n")
    assert " 401 " in upgrade_status(server, f"/ws?user=mallory&token={token('alice')}")
    assert " 101 " in upgrade_status(server, f"/ws?user=alice&token={token('alice')}")
    assert " 101 " in upgrade_status(server, "/ws", f"Cookie: session=alice:{token('alice')}\r\n")


def test_login_sets_the_session_cookie(demo: Demo) -> None:
    server = demo()
    status, headers, _ = request(
        server,
        "POST",
        "/login",
        b"user=alice",
        {"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 303
    assert headers["Set-Cookie"].startswith(f"session=alice:{token('alice')};")
    cookie = {"Cookie": f"session=alice:{token('alice')}"}
    state = json.loads(request(server, "GET", "/session", headers=cookie)[2])
    assert state["user"] == "alice" and state["unread"] == 0
    # where alice's mail stream stands (no mail yet): the page starts lowmemws.js from it
    [(stream, position)] = state["positions"].items()
    assert stream.startswith("u:") and position == ["", 0]
    assert request(server, "GET", "/session")[0] == 401


def test_http_errors_are_short_json(demo: Demo) -> None:
    server = demo()
    auth = {"Authorization": f"Bearer {SECRET}"}
    cases = [
        (401, "/mail", b'{"to":"a","from":"b","subject":"c"}', {}),
        (401, "/mail", b'{"to":"a","from":"b","subject":"c"}', {"Authorization": "Bearer no"}),
        (401, "/broadcast", b"{}", {}),
        (400, "/mail", b"{not json", auth),
        (400, "/mail", b"[1, 2]", auth),
        (400, "/mail", b'{"to":"a","from":"b"}', auth),
        (400, "/broadcast", b'"a string"', auth),
        (413, "/mail", b"x" * 20_000, auth),
        (401, "/mail/self", b'{"subject":"x"}', {}),
    ]
    for status, path, body, headers in cases:
        got, answer_headers, answer = request(server, "POST", path, body, headers)
        assert got == status, (path, body[:40], answer)
        assert answer_headers["Content-Type"] == "application/json"
        assert set(json.loads(answer)) == {"error"}
    assert request(server, "GET", "/healthz")[:1] == (200,)
    assert b"lowmemws" in request(server, "GET", "/metrics")[2]


def test_broadcast_reaches_every_connection_byte_for_byte(demo: Demo) -> None:
    server = demo()
    clients = [ws_client(server, user) for user in ("ann", "ben", "ben", "cy")]
    body = '{"type": "notice",   "text": "maintenance at 22:00 \u2713", "n": [1,2]}'.encode()
    auth = {"Authorization": f"Bearer {SECRET}", "Content-Type": "application/json"}
    assert request(server, "POST", "/broadcast", body, auth)[0] == 202
    for client in clients:
        assert client.receive_message() == body.decode()
        client.close()


def test_mail_reaches_every_connection_of_its_user_only(demo: Demo) -> None:
    server = demo()
    ben1, ben2, cy = ws_client(server, "ben"), ws_client(server, "ben"), ws_client(server, "cy")
    mail(server, "ben", "for ben")
    expected = {"type": "mail", "from": "bob", "subject": "for ben", "unread": 1}
    assert json.loads(ben1.receive_message()) == expected
    assert json.loads(ben2.receive_message()) == expected
    mail(server, "cy", "for cy")
    assert json.loads(cy.receive_message())["subject"] == "for cy"  # nothing for ben came first
    again = ws_client(server, "ben")  # hello carries the count
    for client in (ben1, ben2, cy, again):
        client.close()


def test_page_reconnects_after_a_server_restart(demo_browser: Chromium, demo: Demo) -> None:
    first = demo()
    sign_in(demo_browser, first, "dana")
    first.stop()
    wait_for(
        demo_browser,
        "document.querySelector('#status').textContent.startsWith('reconnecting')",
        "#status reconnecting",
    )
    second = demo(port=first.port)
    wait_connected(demo_browser, timeout=30)
    mail(second, "dana", "After the restart")
    wait_mail(demo_browser, "After the restart")


# -- scaling out ----------------------------------------------------------------------------


def test_two_processes_deliver_mail_from_either_worker(demo_browser: Chromium, demo: Demo) -> None:
    server = demo("--processes", "2")
    sign_in(demo_browser, server, "erin")
    clients = [ws_client(server, "erin") for _ in range(6)]
    # Each POST and each connection lands on a worker chosen by SO_REUSEPORT: with 6 mails
    # and 7 connections, every worker-to-worker path is taken all but certainly.
    counts = [mail(server, "erin", f"mail {i}") for i in range(6)]
    assert counts == [1, 2, 3, 4, 5, 6]  # one count shared by both workers
    for i in range(6):
        wait_mail(demo_browser, f"mail {i}")
    wait_unread(demo_browser, 6)
    for client in clients:
        got = [json.loads(client.receive_message()) for _ in range(6)]
        assert sorted(m["unread"] for m in got) == counts
        client.close()


def test_two_demo_processes_share_a_redis_server(
    demo_browser: Chromium, demo: Demo, redis_url: str
) -> None:
    a = demo("--redis", redis_url)
    b = demo("--redis", redis_url)
    sign_in(demo_browser, a, "frank")
    on_b = ws_client(b, "frank")
    assert mail(b, "frank", "Sent through node B") == 1
    wait_mail(demo_browser, "Sent through node B")
    assert mail(a, "frank", "Sent through node A") == 2
    wait_mail(demo_browser, "Sent through node A")
    wait_unread(demo_browser, 2)
    assert [json.loads(on_b.receive_message())["unread"] for _ in range(2)] == [1, 2]
    on_b.close()
    demo_browser.navigate(f"http://{b.host}:{b.port}/")  # same secret: the session works on B
    wait_connected(demo_browser)
    wait_unread(demo_browser, 2)


def test_two_processes_on_redis_deliver_mail_from_either_worker(demo: Demo, redis_url: str) -> None:
    server = demo("--processes", "2", "--redis", redis_url)
    clients = [ws_client(server, "gus") for _ in range(8)]
    time.sleep(1.0)  # the workers' Redis links come up after the ready line
    counts = [mail(server, "gus", f"mail {i}") for i in range(6)]
    assert counts == [1, 2, 3, 4, 5, 6]
    for client in clients:
        got = [json.loads(client.receive_message(timeout=5)) for _ in range(6)]
        assert sorted(m["unread"] for m in got) == counts
        client.close()
