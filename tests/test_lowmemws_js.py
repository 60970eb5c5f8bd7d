"""lowmemws.js in headless Chromium against a gateway with history on.

The gateway serves the client at /lowmemws.js and a small test page that records what the
client hands over (window.got) and each refresh (window.refreshes). A loopback proxy that
can freeze its links (bytes stop, sockets stay open) stands for a network path that died
silently.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lowmemws import Accept, Config, Gateway, History, Request, Response
from tests.support.chromium import Chromium, find_chromium
from tests.support.ci import skip_or_fail
from tests.test_history import FreezingProxy

WAIT = 20.0  # bounds every wait; not a performance figure

PAGE = b"""<!doctype html><meta charset="utf-8"><script src="/lowmemws.js"></script>
<script>
window.got = []; window.refreshes = []; window.statuses = [];
window.client = new LowMemWS("/ws" + location.search, {
  heartbeatInterval: 300, heartbeatTimeout: 300, backoffBase: 50, backoffCap: 300,
  onmessage: (data, meta) => window.got.push([data, meta.offset]),
  onrefresh: (stream, epoch, offset) => window.refreshes.push([stream, offset]),
  onstatus: (status) => window.statuses.push(status),
});
</script>"""


@pytest.fixture
def browser() -> Iterator[Chromium]:
    if find_chromium() is None:
        skip_or_fail("headless Chromium is not installed (Debian: apt-get install chromium)")
    with Chromium() as chromium:
        yield chromium


def page_gateway(make_gateway: Callable[..., Gateway], **history: int) -> Gateway:
    gateway = make_gateway(Config(history=History(**history)))

    @gateway.on_connect
    def decide(request: Request) -> Accept:
        return Accept(topics=("mail",))

    @gateway.on_http
    def page(request: Request) -> Response | None:
        return Response(200, PAGE, content_type="text/html") if request.path == "/" else None

    return gateway.start()


def wait_for(browser: Chromium, expression: str, what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline:
        value = browser.evaluate(expression)
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"timed out waiting for {what}: {browser.evaluate('JSON.stringify(window.got)')}")


def synced_count(browser: Chromium) -> int:
    return int(browser.evaluate("window.statuses.filter(s => s === 'synced').length"))


def test_the_gateway_serves_the_client_script(make_gateway: Callable[..., Gateway]) -> None:
    import urllib.request

    gateway = page_gateway(make_gateway)
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/lowmemws.js") as answer:
        assert answer.headers["Content-Type"].startswith("text/javascript")
        assert b"LowMemWS" in answer.read()


def test_the_js_client_resumes_each_message_once_in_order(
    browser: Chromium, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = page_gateway(make_gateway)
    browser.navigate(f"http://127.0.0.1:{gateway.port}/")
    wait_for(browser, "window.statuses.includes('synced')", "the first sync")
    gateway.publish("mail", "m1")
    wait_for(browser, "window.got.length === 1", "m1")
    browser.evaluate("window.client.dropLink(); true")
    for n in range(2, 7):
        gateway.publish("mail", f"m{n}")
    wait_for(browser, "window.got.length >= 6", "the replay")
    gateway.publish("mail", "m7")
    wait_for(browser, "window.got.length >= 7", "m7")
    got = browser.evaluate("window.got")
    assert got == [[f"m{n}", n] for n in range(1, 8)]
    assert browser.evaluate("window.client.connects") == 2
    assert browser.evaluate("window.refreshes") == []


def test_the_js_client_is_told_to_refresh_past_the_history(
    browser: Chromium, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = page_gateway(make_gateway, topic_size=3)
    browser.navigate(f"http://127.0.0.1:{gateway.port}/")
    wait_for(browser, "window.statuses.includes('synced')", "the first sync")
    gateway.publish("mail", "m1")
    wait_for(browser, "window.got.length === 1", "m1")
    browser.evaluate("window.client.dropLink(); true")
    for n in range(2, 11):  # 9 missed, 3 kept
        gateway.publish("mail", f"m{n}")
    wait_for(browser, "window.refreshes.length === 1", "the refresh")
    assert browser.evaluate("window.refreshes") == [["t:mail", 10]]
    gateway.publish("mail", "m11")
    wait_for(browser, "window.got.length === 2", "m11")
    assert browser.evaluate("window.got") == [["m1", 1], ["m11", 11]]


def test_the_js_client_replaces_a_silent_link_by_its_heartbeat_deadline(
    browser: Chromium, make_gateway: Callable[..., Gateway]
) -> None:
    gateway = page_gateway(make_gateway)
    loop = asyncio.new_event_loop()
    proxy = FreezingProxy(gateway.port)
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(proxy.start(), loop).result(WAIT)
    try:
        browser.navigate(f"http://127.0.0.1:{proxy.port}/")
        wait_for(browser, "window.statuses.includes('synced')", "the first sync")
        time.sleep(1.5)  # pings every 300 ms of silence, answered: the link stays
        assert browser.evaluate("window.client.connects") == 1
        loop.call_soon_threadsafe(proxy.freeze)  # the path dies silently
        gateway.publish("mail", "lost on the dead link")
        wait_for(browser, "window.got.length === 1", "the message, replayed on a new link")
        assert browser.evaluate("window.got") == [["lost on the dead link", 1]]
        assert browser.evaluate("window.client.connects") == 2
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(WAIT)


def test_the_js_client_dropped_during_paced_sends_gets_each_once_in_order(
    browser: Chromium, make_gateway: Callable[..., Gateway]
) -> None:
    """Paced sends with history (stored at the call, then paced): raw members connected
    first hold the lower fds, so the steps reach the page last; it drops meanwhile, resumes
    them by replay, and drops what a step may still bring again."""
    import websocket

    gateway = page_gateway(make_gateway)
    crowd = [websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/ws") for _ in range(20)]
    browser.navigate(f"http://127.0.0.1:{gateway.port}/")
    wait_for(browser, "window.statuses.includes('synced')", "the first sync")
    for n in range(1, 6):
        gateway.publish("mail", f"p{n}", spread=0.5)
    browser.evaluate("window.client.dropLink(); true")
    wait_for(browser, "window.got.length >= 5", "the paced messages")
    deadline = time.monotonic() + WAIT
    while gateway.stats()["paced_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    gateway.publish("mail", "m6")  # anything a step brought again came before it
    wait_for(browser, "window.got.length >= 6", "m6")
    assert browser.evaluate("window.got") == [[f"p{n}", n] for n in range(1, 6)] + [["m6", 6]]
    assert browser.evaluate("window.refreshes") == []
    assert browser.evaluate("window.client.connects") == 2
    for member in crowd:
        member.close()


def test_the_js_client_started_from_the_state_positions_misses_nothing(
    browser: Chromium, make_gateway: Callable[..., Gateway]
) -> None:
    """A page that gets its state with Gateway.positions and hands them to LowMemWS gets
    what was published after the state was read, before the page connected."""
    import json

    gateway = make_gateway(Config(history=History()))

    @gateway.on_connect
    def decide(request: Request) -> Accept:
        return Accept(topics=("mail",))

    @gateway.on_http
    def page(request: Request) -> Response | None:
        if request.path != "/":
            return None
        state = json.dumps(gateway.positions(topics=("mail",))).encode()
        gateway.publish("mail", "after the state")  # as if it came while the page loads
        with_positions = PAGE.replace(
            b"heartbeatInterval", b"positions: " + state + b", heartbeatInterval"
        )
        return Response(200, with_positions, content_type="text/html")

    gateway.start()
    gateway.publish("mail", "in the state")
    browser.navigate(f"http://127.0.0.1:{gateway.port}/")
    wait_for(browser, "window.got.length >= 1", "the message published after the state")
    gateway.publish("mail", "live")
    wait_for(browser, "window.got.length >= 2", "the live one")
    assert browser.evaluate("window.got") == [["after the state", 2], ["live", 3]]
