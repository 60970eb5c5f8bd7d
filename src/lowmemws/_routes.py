"""The built-in plain HTTP routes, served on the WebSocket port when on_http does not answer."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources

from .handshake import Request, Response

PROMETHEUS_TEXT = "text/plain; version=0.0.4"
#: CLIENT_PATH is where the gateway serves the browser client (lowmemws.js, in the package).
CLIENT_PATH = "/lowmemws.js"
_CLIENT_SCRIPT = resources.files("lowmemws").joinpath("static/lowmemws.js").read_bytes()


def builtin_response(request: Request, metrics_text: Callable[[], str]) -> Response:
    """builtin_response answers GET /healthz (200 "ok"), GET /metrics (the Prometheus text
    exposition), GET /lowmemws.js (the browser client) and anything else with 404."""
    if request.method == "GET" and request.path == "/healthz":
        return Response(200, b"ok")
    if request.method == "GET" and request.path == "/metrics":
        return Response(200, metrics_text(), content_type=PROMETHEUS_TEXT)
    if request.method == "GET" and request.path == CLIENT_PATH:
        return Response(200, _CLIENT_SCRIPT, content_type="text/javascript; charset=utf-8")
    return Response(404, b"not found\n")
