"""Reading the gateway's Prometheus text (/metrics) in tests."""

from __future__ import annotations

import http.client
import re


def fetch_metrics(host: str, port: int, timeout: float = 10.0) -> str:
    """fetch_metrics GETs /metrics and returns its text (asserting a 200)."""
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        assert response.status == 200, f"/metrics answered {response.status}"
        return response.read().decode()
    finally:
        connection.close()


def metric_value(text: str, name: str) -> float:
    """metric_value is the value of the sample called exactly name (labels included)."""
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} is missing from /metrics"
    return float(match.group(1))
