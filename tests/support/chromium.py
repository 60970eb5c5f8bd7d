"""A small driver for headless Chromium over the DevTools protocol (CDP).

Used by the interop tests and the demo: launch Debian's ``chromium`` headless with a fresh
profile directory, open one page, run JavaScript in it, navigate, take screenshots, and end
the browser by PID. It speaks CDP over one WebSocket (websocket-client) in "flat" session
mode: commands for the page carry its ``sessionId`` on the browser connection.

Example::

    with Chromium() as browser:
        browser.navigate("http://127.0.0.1:8080/")
        title = browser.evaluate("document.title")
        browser.screenshot("page.png")

Everything is synchronous and every wait is bounded by a timeout. Events that arrive while
waiting for a command's reply are queued (a bounded number) for ``wait_event``.
"""

from __future__ import annotations

import base64
import collections
import contextlib
import itertools
import json
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import websocket

from .processes import end_process

CHROMIUM_ENV = "LOWMEMWS_CHROMIUM"
"""CHROMIUM_ENV names an environment variable that overrides the browser executable."""

_CANDIDATES = ("/usr/bin/chromium", "chromium", "chromium-browser", "google-chrome")
_DEVTOOLS_LINE = re.compile(r"DevTools listening on (ws://\S+)")
_STDERR_LINES_KEPT = 100
_EVENTS_KEPT = 1000

LAUNCH_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--remote-debugging-port=0",
)
"""LAUNCH_FLAGS are passed to every launch; --user-data-dir is added with a fresh directory."""


class ChromiumError(RuntimeError):
    """ChromiumError: the browser could not start, a CDP command failed or timed out."""


class JavaScriptError(ChromiumError):
    """JavaScriptError: the evaluated expression threw or its promise was rejected."""


def find_chromium() -> str | None:
    """find_chromium returns the browser executable to use, or None when there is none.

    $LOWMEMWS_CHROMIUM wins when set; then /usr/bin/chromium (Debian), then the usual names
    on PATH.
    """
    configured = os.environ.get(CHROMIUM_ENV)
    if configured:
        return shutil.which(configured)
    for candidate in _CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    return None


class Chromium(contextlib.AbstractContextManager["Chromium"]):
    """Chromium is one headless browser process with one page open.

    It is started by the constructor and must be closed (``close`` or a ``with`` block), which
    ends the process by PID and removes its profile directory.
    """

    def __init__(
        self,
        executable: str | None = None,
        *,
        extra_args: tuple[str, ...] = (),
        start_url: str = "about:blank",
        startup_timeout: float = 30.0,
        command_timeout: float = 60.0,
    ) -> None:
        found = executable or find_chromium()
        if found is None:
            raise ChromiumError(
                "no Chromium found: install Debian's 'chromium' package or set $" + CHROMIUM_ENV
            )
        self.executable = found
        self.command_timeout = command_timeout
        self.profile_dir = Path(tempfile.mkdtemp(prefix="lowmemws-chromium-"))
        self._ids = itertools.count(1)
        self._events: collections.deque[dict[str, Any]] = collections.deque(maxlen=_EVENTS_KEPT)
        self._stderr: collections.deque[str] = collections.deque(maxlen=_STDERR_LINES_KEPT)
        self._devtools_url: str | None = None
        self._url_found = threading.Event()
        self._ws: websocket.WebSocket | None = None
        self.session_id = ""
        argv = [self.executable, *LAUNCH_FLAGS, f"--user-data-dir={self.profile_dir}", *extra_args]
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,
        )
        threading.Thread(target=self._drain_stderr, name="chromium-stderr", daemon=True).start()
        try:
            self._connect(startup_timeout)
            self._open_page(start_url)
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        """pid is the process id of the browser's main process."""
        return self.proc.pid

    def stderr_tail(self) -> str:
        """stderr_tail returns the browser's last lines of standard error, for diagnostics."""
        return "".join(self._stderr)

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            match = _DEVTOOLS_LINE.search(line)
            if match and self._devtools_url is None:
                self._devtools_url = match.group(1)
                self._url_found.set()
        self._url_found.set()  # the browser exited: wake the waiter

    def _connect(self, timeout: float) -> None:
        self._url_found.wait(timeout)
        if self._devtools_url is None:
            raise ChromiumError(
                f"{self.executable} printed no 'DevTools listening on' line within {timeout:.0f} s"
                f" (exit code {self.proc.poll()}); stderr:\n{self.stderr_tail()}"
            )
        # suppress_origin: Chromium refuses DevTools clients that send an Origin header.
        self._ws = websocket.create_connection(
            self._devtools_url, timeout=timeout, suppress_origin=True
        )

    def _open_page(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url}, session=False)
        attached = self.send(
            "Target.attachToTarget",
            {"targetId": target["targetId"], "flatten": True},
            session=False,
        )
        self.session_id = attached["sessionId"]
        self.send("Page.enable")
        self.send("Runtime.enable")

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        session: bool = True,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """send runs one CDP command and returns its result; ChromiumError on error or timeout.

        With session=True (the default) the command goes to the page, otherwise to the browser.
        """
        if self._ws is None:
            raise ChromiumError("the browser is closed")
        message: dict[str, Any] = {"id": next(self._ids), "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session_id
        self._ws.send(json.dumps(message))
        deadline = time.monotonic() + (timeout or self.command_timeout)
        while True:
            reply = self._receive(deadline, f"the reply to {method}")
            if reply.get("id") != message["id"]:
                if "method" in reply:
                    self._events.append(reply)
                continue
            if "error" in reply:
                raise ChromiumError(f"{method} failed: {reply['error']}")
            result: dict[str, Any] = reply.get("result", {})
            return result

    def _receive(self, deadline: float, waiting_for: str) -> dict[str, Any]:
        assert self._ws is not None
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ChromiumError(f"timed out waiting for {waiting_for}")
        self._ws.settimeout(remaining)
        try:
            raw = self._ws.recv()
        except websocket.WebSocketTimeoutException as exc:
            raise ChromiumError(f"timed out waiting for {waiting_for}") from exc
        except (websocket.WebSocketException, OSError) as exc:
            raise ChromiumError(
                f"DevTools connection lost while waiting for {waiting_for}: {exc!r}; "
                f"stderr:\n{self.stderr_tail()}"
            ) from exc
        parsed: dict[str, Any] = json.loads(raw)
        return parsed

    def wait_event(self, method: str, timeout: float | None = None) -> dict[str, Any]:
        """wait_event returns the params of the next page event named method (queued first)."""
        for event in list(self._events):
            if event["method"] == method and event.get("sessionId") == self.session_id:
                self._events.remove(event)
                return dict(event.get("params", {}))
        deadline = time.monotonic() + (timeout or self.command_timeout)
        while True:
            event = self._receive(deadline, f"the event {method}")
            if event.get("method") == method and event.get("sessionId") == self.session_id:
                return dict(event.get("params", {}))
            if "method" in event:
                self._events.append(event)

    def navigate(self, url: str, timeout: float | None = None) -> None:
        """navigate loads url in the page and returns once its load event has fired."""
        self._events.clear()
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise ChromiumError(f"navigation to {url} failed: {result['errorText']}")
        self.wait_event("Page.loadEventFired", timeout)

    def evaluate(
        self, expression: str, *, await_promise: bool = True, timeout: float | None = None
    ) -> Any:
        """evaluate runs JavaScript in the page and returns its value, converted from JSON.

        With await_promise=True a returned promise is awaited and its fulfilled value returned.
        A thrown exception or a rejected promise raises JavaScriptError with its description.
        """
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": await_promise, "returnByValue": True},
            timeout=timeout,
        )
        details = result.get("exceptionDetails")
        if details is not None:
            exception = details.get("exception", {})
            description = exception.get("description") or exception.get("value") or details
            raise JavaScriptError(f"JavaScript error: {description}")
        return result.get("result", {}).get("value")

    def screenshot(self, path: str | os.PathLike[str], *, full_page: bool = False) -> Path:
        """screenshot saves the page as a PNG file at path and returns the path."""
        params: dict[str, Any] = {"format": "png"}
        if full_page:
            params["captureBeyondViewport"] = True
        result = self.send("Page.captureScreenshot", params)
        target = Path(path)
        target.write_bytes(base64.b64decode(result["data"]))
        return target

    def close(self, timeout: float = 10.0) -> None:
        """close ends the browser by PID (SIGTERM, then SIGKILL) and removes its profile."""
        if self._ws is not None:
            try:
                self._ws.close(timeout=1)
            except (websocket.WebSocketException, OSError):
                pass
            self._ws = None
        end_process(self.proc, timeout)
        shutil.rmtree(self.profile_dir, ignore_errors=True)

    def __exit__(self, *exc: object) -> None:
        self.close()
