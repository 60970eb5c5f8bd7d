"""Prometheus text exposition of the runtime counters (no dependency needed)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ._constants import CLOSE_CODE_LABELS, DROP_REASONS, ERROR_KINDS, TLS_OUTCOMES
from ._native import ffi

_GAUGES = {
    "connections": "Open WebSocket connections.",
    "handshakes": "Request heads being read.",
    "buffer_pool_in_use": "Pooled read buffers lent out in the current loop turn.",
    "hooks_in_flight": "Hook calls off the loop thread: running, waiting or held at the cap.",
    "handshakes_parked": "Upgrades and HTTP requests waiting for a hook off the loop thread.",
    "spill_bytes": "Bytes held for incomplete input.",
    "pending_write_bytes": "Bytes queued for slow readers.",
    "accept_paused": "1 while accepting is paused at a cap.",
    "deflate_streams": "zlib streams held by the permessage-deflate pool (none per connection).",
    "paced_in_flight": "Paced sends (spread or rate) not finished yet.",
    "paced_rate": "Members reached by paced sends per second, over the last second.",
    "user_names": "Long str user ids online, kept by name (one per user and process).",
    "user_name_bytes": "Bytes the names of the long str user ids online take.",
}
#: Gauges in seconds, the largest over processes (not summed): microseconds in lmw_stats.
_MAX_GAUGES = {
    "loop_lag": "Longest time the loop went without polling, over about the last 10 s.",
    "loop_lag_max": "Longest time the loop went without polling since start.",
}
_COUNTERS = {
    "handshakes_total": "Completed WebSocket upgrades.",
    "rejects_total": "Requests answered with an HTTP error.",
    "http_requests_total": "Plain HTTP requests.",
    "frames_sent_total": "WebSocket frames sent or queued.",
    "messages_received_total": "WebSocket messages received.",
    "handshake_timeouts_total": "Request heads answered 408 at the handshake deadline.",
    "ping_timeouts_total": "Connections dropped for a pong that did not arrive in time.",
    "deflate_in_bytes_total": "Payload bytes of the messages sent compressed, before compression.",
    "deflate_out_bytes_total": "Payload bytes of the messages sent compressed, after compression.",
    "messages_deflated_total": "Messages compressed (once per publish, not per recipient).",
    "messages_inflated_total": "Compressed messages received and decompressed.",
    "paced_deliveries_total": "Connections that took the frame of a paced send.",
    "paced_dropped_total": "Members a paced send had not reached when its gateway stopped.",
    "paced_cancelled_total": "Members a cancelled paced send had not reached.",
}


def snapshot(stats: Iterable[Any]) -> dict[str, Any]:
    """snapshot sums lmw_stats structs (one per worker process) into a dict."""
    total: dict[str, Any] = {name: 0 for name in (*_GAUGES, *_COUNTERS)}
    total["closes"] = dict.fromkeys(CLOSE_CODE_LABELS, 0)
    total["dropped"] = dict.fromkeys(DROP_REASONS, 0)
    total["errors"] = dict.fromkeys(ERROR_KINDS, 0)
    total["tls"] = dict.fromkeys(TLS_OUTCOMES, 0)
    total["processes"] = 0
    for name in _MAX_GAUGES:
        total[f"{name}_seconds"] = 0.0
    for st in stats:
        if st.pid == 0:
            continue
        total["processes"] += 1
        for name in _MAX_GAUGES:
            seconds = getattr(st, f"{name}_us") / 1e6
            total[f"{name}_seconds"] = max(total[f"{name}_seconds"], seconds)
        for name in (*_GAUGES, *_COUNTERS):
            total[name] += getattr(st, name)
        for i, code in enumerate(CLOSE_CODE_LABELS):
            total["closes"][code] += st.closes[i]
        for i, reason in enumerate(DROP_REASONS):
            total["dropped"][reason] += st.dropped[i]
        for i, kind in enumerate(ERROR_KINDS):
            total["errors"][kind] += st.errors[i]
        for i, outcome in enumerate(TLS_OUTCOMES):
            total["tls"][outcome] += st.tls[i]
    return total


#: Bus figures that are gauges (the rest are counters).
BUS_GAUGES = frozenset({"buffered", "buffered_bytes", "peers"})


def render(
    stats: Iterable[Any],
    extra: dict[str, int] | None = None,
    extra_gauges: dict[str, int] | None = None,
) -> str:
    """render returns the Prometheus text format (version 0.0.4) for the summed stats."""
    snap = snapshot(stats)
    out: list[str] = []
    for name, help_text in _GAUGES.items():
        out += [f"# HELP lowmemws_{name} {help_text}", f"# TYPE lowmemws_{name} gauge"]
        out.append(f"lowmemws_{name} {snap[name]}")
    for name, help_text in _MAX_GAUGES.items():
        metric = f"lowmemws_{name}_seconds"
        out += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        out.append(f"{metric} {snap[f'{name}_seconds']:.3f}")
    for name, help_text in _COUNTERS.items():
        out += [f"# HELP lowmemws_{name} {help_text}", f"# TYPE lowmemws_{name} counter"]
        out.append(f"lowmemws_{name} {snap[name]}")
    out += ["# HELP lowmemws_closes_total Closed connections by close code.",
            "# TYPE lowmemws_closes_total counter"]  # fmt: skip
    for code, value in snap["closes"].items():
        out.append(f'lowmemws_closes_total{{code="{code}"}} {value}')
    out += ["# HELP lowmemws_dropped_messages_total Messages not delivered, by reason.",
            "# TYPE lowmemws_dropped_messages_total counter"]  # fmt: skip
    for reason, value in snap["dropped"].items():
        out.append(f'lowmemws_dropped_messages_total{{reason="{reason}"}} {value}')
    out += ["# HELP lowmemws_errors_total Failures the runtime handled (epoll_ctl, memory).",
            "# TYPE lowmemws_errors_total counter"]  # fmt: skip
    for kind, value in snap["errors"].items():
        out.append(f'lowmemws_errors_total{{kind="{kind}"}} {value}')
    out += ["# HELP lowmemws_tls_total TLS handshakes and the outcome of every bad TLS input.",
            "# TYPE lowmemws_tls_total counter"]  # fmt: skip
    for outcome, value in snap["tls"].items():
        out.append(f'lowmemws_tls_total{{outcome="{outcome}"}} {value}')
    out += [
        "# HELP lowmemws_processes Worker processes reporting.",
        "# TYPE lowmemws_processes gauge",
        f"lowmemws_processes {snap['processes']}",
    ]
    for name, value in (extra or {}).items():
        out += [f"# TYPE lowmemws_{name} counter", f"lowmemws_{name} {value}"]
    for name, value in (extra_gauges or {}).items():
        out += [f"# TYPE lowmemws_{name} gauge", f"lowmemws_{name} {value}"]
    return "\n".join(out) + "\n"


STATS_SIZE: int = ffi.sizeof("lmw_stats")
