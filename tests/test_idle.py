"""An idle gateway sleeps until something happens (issue 15, "idle means idle"), and the
deadlines it enforces still fall due while it sleeps.

Wake-ups are counted, never timed: each time a thread sleeps the kernel adds one to its
voluntary_ctxt_switches (/proc/PID/task/TID/status), so a thread that did not wake during a
window did not add any. Before, the loop woke 4 times a second (a 250 ms poll) and the
supervisor 5 times a second, whatever happened.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import websocket

from lowmemws import Accept, Config, Gateway, Request

from .support.servers import free_port
from .support.waiting import wait_until

WINDOW = 3.0  # seconds of idleness counted
MOST_WAKEUPS = 3  # in WINDOW: a generous margin over none (the old loop woke 12 times)
DEADLINE = 10.0  # seconds any answer may take here
SETTLE = 0.5  # seconds without a wake-up that end the start-up before a window


def voluntary_switches(pid: int, tid: int | None = None) -> int:
    """voluntary_switches is how often a thread (tid), or every thread of pid, went to sleep."""
    tids = [tid] if tid is not None else [int(t) for t in os.listdir(f"/proc/{pid}/task")]
    total = 0
    for t in tids:
        with open(f"/proc/{pid}/task/{t}/status") as f:
            for line in f:
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def wakeups_over(window: float, count: Callable[[], int]) -> int:
    """wakeups_over counts a thread's wake-ups over window seconds, once it has settled: the
    start-up's last turns (a supervisor waiting for its workers, the upgrades' last hooks)
    are over when its count stays put for SETTLE seconds (at most DEADLINE)."""
    settle_until = time.monotonic() + DEADLINE
    last = count()
    while time.monotonic() < settle_until:
        time.sleep(SETTLE)
        now = count()
        if now == last:
            break
        last = now
    before = count()
    time.sleep(window)
    return count() - before


def open_idle_clients(port: int, n: int) -> list[websocket.WebSocket]:
    return [
        websocket.create_connection(f"ws://127.0.0.1:{port}/?user={u}", timeout=DEADLINE)
        for u in range(1, n + 1)
    ]


def loop_thread_id(gateway: Gateway) -> int:
    thread = gateway._thread
    assert thread is not None and thread.native_id is not None
    return thread.native_id


def test_an_idle_gateway_does_not_wake(make_gateway: Callable[..., Gateway]) -> None:
    """With 20 idle connections and the heartbeat at its default (30 s: no ping is due in
    the window), the loop thread sleeps through 3 s: at most 3 wake-ups."""
    gateway = make_gateway(Config())
    gateway.on_connect(lambda request: Accept(user=int(request.params["user"]), topics=("t",)))
    gateway.start()
    clients = open_idle_clients(gateway.port, 20)
    wait_until(lambda: gateway.connection_count == 20, "the connections to open", DEADLINE)
    tid = loop_thread_id(gateway)
    woke = wakeups_over(WINDOW, lambda: voluntary_switches(os.getpid(), tid))
    assert woke <= MOST_WAKEUPS, f"the idle loop woke {woke} times in {WINDOW:g} s"
    for client in clients:  # and it still serves at once
        client.send("still there?")
    assert gateway.publish("t", "yes") == 20
    assert all(client.recv() == "yes" for client in clients)
    for client in clients:
        client.close()


def test_deadlines_fall_due_while_the_loop_sleeps(make_gateway: Callable[..., Gateway]) -> None:
    """A sleeping loop still wakes for what is due: a request head that never completes is
    answered 408 at handshake_timeout, a message left incomplete closes its connection with
    1008 at message_timeout, and an idle client is pinged within ping_interval."""
    config = Config(handshake_timeout=0.5, message_timeout=0.5, ping_interval=1.0)
    gateway = make_gateway(config)
    gateway.on_connect(lambda request: Accept(user=1))
    gateway.start()
    half_head = socket.create_connection(("127.0.0.1", gateway.port), timeout=DEADLINE)
    half_head.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
    answer = half_head.recv(4096)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:40]
    half_head.close()

    pinged = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    opcode, _ = pinged.recv_data_frame(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_PING
    pinged.close()

    trickling = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
    trickling.sock.sendall(b"\x81\x85\x00\x00\x00\x00he")  # 2 of a 5-byte text frame
    while True:
        frame = trickling.recv_data_frame(control_frame=True)[1]
        if frame.opcode == websocket.ABNF.OPCODE_CLOSE:
            break
    assert int.from_bytes(frame.data[:2], "big") == 1008
    trickling.close()


SUPERVISED = textwrap.dedent(
    """
    import sys
    from lowmemws import Config, Gateway
    Gateway("127.0.0.1", int(sys.argv[1]), processes=2, config=Config()).run()
    """
)


def test_an_idle_supervisor_does_not_wake() -> None:
    """The process that supervises worker processes sleeps until one exits or it is told to
    stop: at most 3 wake-ups in 3 s; a worker killed is still replaced, and SIGTERM still
    stops everything."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-c", SUPERVISED, str(port)])
    try:
        wait_until(lambda: len(workers(proc.pid)) == 2, "the two workers", DEADLINE)
        wait_until(lambda: accepts(port), "the workers to listen", DEADLINE)
        woke = wakeups_over(WINDOW, lambda: voluntary_switches(proc.pid, proc.pid))
        assert woke <= MOST_WAKEUPS, f"the idle supervisor woke {woke} times in {WINDOW:g} s"
        first = workers(proc.pid)
        os.kill(first[0], 9)
        wait_until(
            lambda: len(workers(proc.pid)) == 2 and first[0] not in workers(proc.pid),
            "the killed worker to be replaced",
            DEADLINE,
        )
        proc.terminate()
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def workers(pid: int) -> list[int]:
    """workers lists the child processes of pid."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def test_a_request_answered_by_a_coroutine_hook_wakes_the_loop(
    make_gateway: Callable[..., Gateway],
) -> None:
    """Answers that other threads hand to the loop wake it: 50 upgrades in a row, each
    decided by an async on_connect, are all answered (the loop has no timeout to fall back
    on)."""
    gateway = make_gateway(Config())

    async def connect(request: Request) -> Accept:
        return Accept(user=1)

    gateway.on_connect(connect)
    gateway.start()
    for _ in range(50):
        client = websocket.create_connection(f"ws://127.0.0.1:{gateway.port}/", timeout=DEADLINE)
        client.close()
