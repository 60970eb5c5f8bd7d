"""Ending a child process by its PID: SIGTERM, then SIGKILL if it does not exit in time."""

from __future__ import annotations

import subprocess


def end_process(proc: subprocess.Popen[str], timeout: float) -> None:
    """end_process sends SIGTERM to proc if it still runs and waits for it to exit; after
    timeout seconds it sends SIGKILL and waits again (at most timeout)."""
    if proc.poll() is None:
        proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)
