"""The demo page (lowmemws.js in headless Chromium) across crashes and lost history (issue 12).

Two demo nodes share a real redis-server. The page is signed in on node A; node A is killed
with SIGKILL while mails are posted to node B, then started again on the same port: the page
reconnects, resumes from the last mail it showed, and lists every mail once, in order, with
the right unread count. When Redis loses the history (FLUSHALL), the page is told to
refresh and refetches its count.
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
