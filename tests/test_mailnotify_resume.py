"""The demo page (lowmemws.js in headless Chromium) across crashes and lost history (issue 12).

Two demo nodes share a real redis-server. The page is signed in on node A; node A is killed
with SIGKILL while mails are posted to node B, then started again on the same port: the page
reconnects, resumes from the last mail it showed, and lists every mail once, in order, with
the right unread count. When Redis loses the history (FLUSHALL), the page is told to
refresh and refetches its count. And the page starts from the positions /session read with
its unread count: a mail posted between that read and the first connection is shown, also
when that connection drops before its first sync.
"""

from __future__ import annotations

import os
import signal

from tests.support.chromium import Chromium
from tests.test_mailnotify import (
    Demo,
    demo,  # noqa: F401 (fixture)
    demo_browser,  # noqa: F401 (fixture)
    mail,
    redis_url,  # noqa: F401 (fixture)
    sign_in,
    wait_connected,
    wait_for,
    wait_mail,
    wait_unread,
)

#: Run in the page before its own script: the first /session answer that signs the user in
#: is handed to the page only once the test calls window.__release() (window.__sessionRead
#: tells it was read), and the page's first WebSocket is closed as soon as it opens, before
#: anything it receives is handled (so before its first sync).
HOLD_STATE_AND_DROP_FIRST_CONNECTION = """
(() => {
  let release;
  const held = new Promise((resolve) => { release = resolve; });
  window.__release = () => release();
  window.__sessionRead = false;
  const realFetch = window.fetch.bind(window);
  window.fetch = async (url, options) => {
    const res = await realFetch(url, options);
    if (String(url) === "/session" && res.ok && !window.__sessionRead) {
      window.__sessionRead = true;
      await held;
    }
    return res;
  };
  const RealWebSocket = window.WebSocket;
  window.__sockets = 0;
  function HeldWebSocket(url, protocols) {
    const ws = new RealWebSocket(url, protocols);
    window.__sockets += 1;
    if (window.__sockets === 1) ws.addEventListener("open", () => ws.close());
    return ws;
  }
  HeldWebSocket.prototype = RealWebSocket.prototype;
  for (const name of ["CONNECTING", "OPEN", "CLOSING", "CLOSED"]) {
    HeldWebSocket[name] = RealWebSocket[name];
  }
  window.WebSocket = HeldWebSocket;
})();
"""

SUBJECTS = "Array.from(document.querySelectorAll('#notifications .subject'), e => e.textContent)"


def test_the_page_shows_each_mail_once_in_order_after_its_gateway_crashed(
    demo_browser: Chromium,  # noqa: F811
    demo: Demo,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    a = demo("--redis", redis_url)
    b = demo("--redis", redis_url)
    sign_in(demo_browser, a, "hana")
    assert mail(b, "hana", "before the crash") == 1
    wait_mail(demo_browser, "before the crash")
    os.kill(a.proc.pid, signal.SIGKILL)
    a.proc.wait(timeout=10)
    wait_for(
        demo_browser,
        "document.querySelector('#status').textContent.startsWith('reconnecting')",
        "#status reconnecting",
    )
    subjects = [f"while down {n}" for n in range(5)]
    assert [mail(b, "hana", s) for s in subjects] == [2, 3, 4, 5, 6]
    demo("--redis", redis_url, port=a.port)  # node A again, on the page's address
    wait_connected(demo_browser, timeout=30)
    wait_mail(demo_browser, subjects[-1])
    wait_unread(demo_browser, 6)
    shown = demo_browser.evaluate(SUBJECTS)
    assert shown == [*reversed(subjects), "before the crash"]  # newest first, each once
    assert mail(b, "hana", "after") == 7  # and live again
    wait_mail(demo_browser, "after")
    assert demo_browser.evaluate(SUBJECTS)[0] == "after"
    assert demo_browser.evaluate(SUBJECTS).count("after") == 1


def test_the_page_refetches_when_the_history_was_lost(
    demo_browser: Chromium,  # noqa: F811
    demo: Demo,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    import redis

    a = demo("--redis", redis_url)
    sign_in(demo_browser, a, "ivan")
    assert mail(a, "ivan", "kept") == 1
    wait_mail(demo_browser, "kept")
    demo_browser.evaluate("client.dropLink(); true")
    # the history (and the counts, which the demo keeps in the same Redis) are lost ...
    redis.Redis.from_url(redis_url).flushall()
    assert mail(a, "ivan", "after the loss") == 1
    # ... so the page, back, is told to refresh: it says so and refetches the count
    wait_for(
        demo_browser,
        "document.querySelector('#notifications').textContent.includes('could not be recovered')",
        "the refresh notice",
    )
    wait_connected(demo_browser)
    wait_unread(demo_browser, 1)


def test_the_page_shows_a_mail_posted_between_its_state_and_its_first_connection(
    demo_browser: Chromium,  # noqa: F811
    demo: Demo,  # noqa: F811
    redis_url: str,  # noqa: F811
) -> None:
    a = demo("--redis", redis_url)
    source = {"source": HOLD_STATE_AND_DROP_FIRST_CONNECTION}
    demo_browser.send("Page.addScriptToEvaluateOnNewDocument", source)
    demo_browser.navigate(f"http://{a.host}:{a.port}/")
    wait_for(demo_browser, "!document.querySelector('#signin').hidden", "the sign-in form")
    demo_browser.evaluate(
        "document.querySelector('#login input[name=user]').value = 'june';"
        "document.querySelector('#login button').click()"
    )
    wait_for(demo_browser, "window.__sessionRead", "the page's state read (/session)")
    assert mail(a, "june", "between the state and the connection") == 1
    demo_browser.evaluate("window.__release(); true")
    wait_connected(demo_browser, timeout=30)
    wait_mail(demo_browser, "between the state and the connection")
    wait_unread(demo_browser, 1)
    assert demo_browser.evaluate("window.__sockets") >= 2  # the first one dropped
    assert mail(a, "june", "live") == 2
    wait_mail(demo_browser, "live")
    wait_unread(demo_browser, 2)
    assert demo_browser.evaluate(SUBJECTS) == ["live", "between the state and the connection"]
