"""Clients that record what they receive and when: the pacing tests' eyes.

Each client reads on a thread of its own and notes (monotonic time, message) for every data
message until its connection ends; a close frame ends it with the close code noted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

import websocket


class Recorder:
    """Recorder is one WebSocket client whose every message is timestamped as it arrives."""

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        self.ws = websocket.create_connection(url, timeout=timeout)
        self.got: list[tuple[float, str]] = []
        self.close_code: int | None = None
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            try:
                opcode, data = self.ws.recv_data(control_frame=False)
            except Exception:
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.close_code = int.from_bytes(data[:2], "big") if len(data) >= 2 else 1005
                return
            now = time.monotonic()
            with self._lock:
                self.got.append((now, data.decode("utf-8", "replace")))

    def messages(self, text: str | None = None) -> list[str]:
        """messages are the texts received so far (only those equal to text, if given)."""
        with self._lock:
            return [m for _, m in self.got if text is None or m == text]

    def times(self, text: str) -> list[float]:
        """times are the arrival times of the messages equal to text."""
        with self._lock:
            return [t for t, m in self.got if m == text]

    def send(self, text: str) -> None:
        """send sends one text message."""
        self.ws.send(text)

    def close(self) -> None:
        """close ends the connection (a close frame, then the socket)."""
        try:
            self.ws.close(timeout=1)
        except Exception:
            pass

    def finished(self, timeout: float = 10.0) -> bool:
        """finished waits for the reader to end (the server closed); False on timeout."""
        self._thread.join(timeout)
        return not self._thread.is_alive()


def arrival_times(recorders: Iterable[Recorder], text: str) -> list[float]:
    """arrival_times are every recorder's arrival times of text, sorted."""
    return sorted(t for r in recorders for t in r.times(text))


def count(recorders: Iterable[Recorder], text: str) -> int:
    """count is how many copies of text the recorders received in all."""
    return sum(len(r.messages(text)) for r in recorders)
