"""Headless Chromium over wss:// to the gateway's own TLS: the page itself comes over https from
the same port, the certificate is made at test time and trusted by its public key
(--ignore-certificate-errors-spki-list), and Chromium's usual offers (permessage-deflate, ALPN)
apply."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lowmemws import Config, Connection, Gateway, Request, Response, tls_available
from tests.support.chromium import Chromium, find_chromium
from tests.support.ci import skip_or_fail
from tests.support.tls import make_certificates

PAGE = "<!doctype html><title>lowmemws over TLS</title><p>secure page"

ECHO_JS = """
(async () => {
  const outgoing = %(outgoing)s;
  const ws = new WebSocket(%(url)s);
  const replies = [];
  const done = new Promise((resolve, reject) => {
    ws.onmessage = (event) => {
      replies.push(event.data);
      if (replies.length === outgoing.length) resolve();
    };
    ws.onclose = (event) => reject(new Error("closed early with code " + event.code));
  });
  await new Promise((resolve, reject) => {
    ws.onopen = resolve;
    ws.onerror = () => reject(new Error("could not connect to " + ws.url));
  });
  for (const m of outgoing) ws.send(m);
  await done;
  const closed = new Promise((resolve) => {
    ws.onclose = (event) => resolve({code: event.code, wasClean: event.wasClean});
  });
  ws.close(1000);
  return {close: await closed, extensions: ws.extensions, secure: window.isSecureContext,
          lengths: replies.map((r) => r.length), same: replies.every((r, i) => r === outgoing[i])};
})()
"""


@pytest.fixture(scope="module")
def tls_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, str]]:
    if not tls_available():
        skip_or_fail("lowmemws was built without OpenSSL (install libssl-dev and rebuild)")
    certs = make_certificates(Path(tmp_path_factory.mktemp("tls-browser")))
    gateway = Gateway(
        "127.0.0.1", 0, config=Config(certfile=str(certs.cert), keyfile=str(certs.key))
    )

    @gateway.on_message
    def echo(conn: Connection, message: str | bytes) -> None:
        conn.send(message)

    @gateway.on_http
    def page(request: Request) -> Response | None:
        return Response(body=PAGE, content_type="text/html") if request.path == "/" else None

    gateway.start()
    try:
        yield gateway, certs.spki_sha256
    finally:
        gateway.stop(timeout=10)


@pytest.fixture(scope="module")
def browser(tls_gateway: tuple[Gateway, str]) -> Iterator[Chromium]:
    if find_chromium() is None:
        skip_or_fail("headless Chromium is not installed (Debian: apt-get install chromium)")
    spki = tls_gateway[1]
    with Chromium(extra_args=(f"--ignore-certificate-errors-spki-list={spki}",)) as chromium:
        yield chromium


def test_chromium_echo_over_wss_from_an_https_page(
    tls_gateway: tuple[Gateway, str], browser: Chromium
) -> None:
    gateway = tls_gateway[0]
    origin = f"https://127.0.0.1:{gateway.port}"
    browser.navigate(origin + "/")
    outgoing = ["hello over TLS", "é" * 100_000, "x" * (1 << 20)]
    script = ECHO_JS % {
        "outgoing": json.dumps(outgoing),
        "url": json.dumps(f"wss://127.0.0.1:{gateway.port}/"),
    }
    result: dict[str, Any] = browser.evaluate(script, timeout=60)
    assert result["secure"] is True
    assert result["same"] is True
    assert result["lengths"] == [len(m) for m in outgoing]
    assert result["close"] == {"code": 1000, "wasClean": True}
    assert "permessage-deflate" in result["extensions"]
    assert gateway.stats()["tls"]["handshakes"] >= 2  # the page, then the WebSocket
