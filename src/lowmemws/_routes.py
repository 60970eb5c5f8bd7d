"""The built-in plain HTTP routes, served on the WebSocket port when on_http does not answer."""

from __future__ import annotations

from collections.abc import Callable

from .handshake import Request, Response

PROMETHEUS_TEXT = "text/plain; version=0.0.4"


def builtin_response(request: Request, metrics_text: Callable[[], str]) -> Response:
    """builtin_response answers GET /healthz (200 "ok"), GET /metrics (the Prometheus text
    exposition) and anything else with 404."""
    if request.method == "GET" and request.path == "/healthz":
        return Response(200, b"ok")
    if request.method == "GET" and request.path == "/metrics":
        return Response(200, metrics_text(), content_type=PROMETHEUS_TEXT)
    return Response(404, b"not found\n")
