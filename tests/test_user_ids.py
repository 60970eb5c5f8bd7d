"""str user ids: ``Accept(user="alice")``, ``send_to_user("alice", ...)`` and ``conn.user``.

A str id becomes the 64-bit tag its connections carry in C: an id short enough is kept in the
tag itself (keyed, reversible) and costs nothing; a longer one is a keyed hash, and the
process keeps its name in C, one entry per user online there, so every hook gets the str
back all the same. Clients are wsproto, an independent RFC 6455 implementation.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import websocket
from hypothesis import given
from hypothesis import strategies as st

from lowmemws import Accept, Config, Gateway, History, UserTag
from lowmemws._user_ids import INT_USER_MAX, USER_NAME_MAX, UserIds, deployment_key
from lowmemws.client import Client
from tests.support import waiting
from tests.support.metrics import fetch_metrics, metric_value
from tests.support.servers import StartServer
from tests.support.wsproto_client import WsprotoClient

DEADLINE = 10.0  # bounds every wait; not a performance figure
LONG = "alice.liddell@wonderland.example"  # too long for the tag: hashed

wait_until = waiting.waiter(DEADLINE, interval=0.02)


@given(st.text(min_size=1, max_size=12))
def test_a_str_id_comes_back_from_its_tag_or_is_a_user_tag(name: str) -> None:
    ids = UserIds(b"k" * 16)
    tag = ids.tag(name)
    assert INT_USER_MAX < tag < 2**64  # never the tag of an int id
    back = ids.user(tag)
    assert back == name or back == UserTag(tag)
    fits = len(name) <= 9 and name.isascii() and all(c.isalnum() or c in "_-" for c in name)
    if fits or len(name.encode()) <= 7:
        assert back == name


@given(st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20))
def test_distinct_short_ids_never_share_a_tag(a: str, b: str) -> None:
    ids = UserIds(b"k" * 16)
    if a != b and ids.user(ids.tag(a)) == a:
        assert ids.tag(a) != ids.tag(b)


def test_int_ids_keep_their_value_and_bad_ids_are_refused() -> None:
    ids = UserIds()
    assert ids.tag(42) == 42 and ids.user(42) == 42
    assert ids.tag(INT_USER_MAX) == INT_USER_MAX
    for bad in (-1, INT_USER_MAX + 1, ""):
        with pytest.raises(ValueError):
            ids.tag(bad)
    for wrong in (1.5, None, b"alice", True):
        with pytest.raises(TypeError):
            ids.tag(wrong)
    with pytest.raises(ValueError):
        Accept(user=2**63)
    with pytest.raises(ValueError):
        Accept(user="")
    with pytest.raises(TypeError):
        Accept(user=b"alice")  # type: ignore[arg-type]


def test_the_deployment_key_is_the_same_everywhere_and_depends_on_prefix_and_secret() -> None:
    assert deployment_key("lowmemws:", None) == deployment_key("lowmemws:", None)
    assert deployment_key("lowmemws:", None) != deployment_key("other:", None)
    assert deployment_key("lowmemws:", "s3cret") != deployment_key("lowmemws:", None)
    one, other = UserIds(deployment_key("p:", "s")), UserIds(deployment_key("p:", "s"))
    assert one.tag(LONG) == other.tag(LONG) and one.tag("alice") == other.tag("alice")
    assert UserIds().tag(LONG) != UserIds().tag(LONG)  # random keys: per gateway


@pytest.fixture
def gateway(
    make_gateway: Callable[..., Gateway],
) -> Iterator[tuple[Gateway, list[tuple[str, object]]]]:
    """A gateway that accepts ``/?user=NAME`` (digits: an int id) and records conn.user in
    every hook; a message "who" is answered with repr(conn.user)."""
    gw = make_gateway()
    seen: list[tuple[str, object]] = []
    lock = threading.Lock()

    def note(hook: str, user: object) -> None:
        with lock:
            seen.append((hook, user))

    @gw.on_connect
    def decide(request):  # type: ignore[no-untyped-def]
        name = request.params["user"]
        return Accept(user=int(name) if name.isdigit() else name)

    @gw.on_open
    def opened(conn):  # type: ignore[no-untyped-def]
        note("open", conn.user)

    @gw.on_message
    def message(conn, text):  # type: ignore[no-untyped-def]
        note("message", conn.user)
        conn.send(repr(conn.user))

    @gw.on_close
    def closed(conn, code):  # type: ignore[no-untyped-def]
        note("close", conn.user)

    gw.start()
    yield gw, seen


def connect(gw: Gateway, user: str) -> WsprotoClient:
    path = f"/?user={quote(user, safe='')}"
    return WsprotoClient("127.0.0.1", gw.port, path, timeout=DEADLINE)


def test_str_ids_end_to_end_every_hook_sees_what_accept_gave(
    gateway: tuple[Gateway, list[tuple[str, object]]],
) -> None:
    gw, seen = gateway
    alice, alice2, number, long = (connect(gw, u) for u in ("alice", "alice", "42", LONG))
    bob = connect(gw, "bob")
    for client in (alice, number, long):
        client.send_message("who")
    assert alice.receive_message() == "'alice'"
    assert number.receive_message() == "42"
    assert long.receive_message() == repr(LONG)

    assert gw.send_to_user("alice", "for alice") == 2
    assert alice.receive_message() == alice2.receive_message() == "for alice"
    assert gw.send_to_user(42, "for 42") == 1 and number.receive_message() == "for 42"
    assert gw.send_to_user(LONG, "long") == 1 and long.receive_message() == "long"
    assert gw.send_to_users(["bob", 42, "alice", "bob"], "batch") == 4  # bob once
    assert [c.receive_message() for c in (bob, number, alice, alice2)] == ["batch"] * 4
    assert gw.send_to_user("42", "a str, not the int") == 0  # "42" is not 42

    alice.close()
    wait_until(lambda: ("close", "alice") in seen, "alice's on_close")
    long.close()
    wait_until(lambda: sum(hook == "close" for hook, _ in seen) == 2, "the long id's on_close")
    opens = [user for hook, user in seen if hook == "open"]
    assert sorted(map(str, opens)) == sorted(["alice", "alice", "42", LONG, "bob"])
    later = [(hook, user) for hook, user in seen if hook != "open"]
    assert ("message", "alice") in later and ("message", 42) in later
    assert ("message", LONG) in later and ("close", LONG) in later
    assert not [user for _hook, user in seen if isinstance(user, UserTag)]
    assert gw.send_to_user(LONG, "gone") == 0  # it closed: nobody left
    for client in (alice2, number, bob):
        client.close()


def test_an_int_id_over_2_63_is_refused_with_500(
    gateway: tuple[Gateway, list[tuple[str, object]]],
) -> None:
    gw, _seen = gateway
    with pytest.raises(Exception, match="500"):
        connect(gw, str(2**63))
    with pytest.raises(ValueError):
        gw.send_to_user(2**63, "x")


def test_online_and_kick_in_one_process(
    gateway: tuple[Gateway, list[tuple[str, object]]],
) -> None:
    gw, seen = gateway
    alice, alice2, bob = connect(gw, "alice"), connect(gw, "alice"), connect(gw, "bob")
    assert (gw.online("alice"), gw.online("bob"), gw.online("carol")) == (2, 1, 0)
    with pytest.raises(ValueError):
        gw.disconnect_user("alice", 1006)  # never sent on the wire (RFC 6455 section 7.4.1)
    with pytest.raises(ValueError):
        gw.disconnect_user("alice", 4000, "é" * 62)  # 124 bytes of UTF-8
    assert gw.online("alice") == 2  # a refused kick closed nothing
    assert gw.disconnect_user("alice", 4001, "signed out") == 2
    for client in (alice, alice2):
        event = client.wait_for_close()
        assert (event.code, event.reason) == (4001, "signed out")
    wait_until(lambda: seen.count(("close", "alice")) == 2, "alice's two on_close calls")
    assert gw.online("alice") == 0 and gw.online("bob") == 1
    assert gw.disconnect_user("alice") == 0
    bob.send_message("who")
    assert bob.receive_message() == "'bob'"
    bob.close()


def test_a_gateway_not_started_counts_nobody(make_gateway: Callable[..., Gateway]) -> None:
    gw = make_gateway()
    assert gw.online("alice") == 0 and gw.disconnect_user("alice", 4001) == 0
    with pytest.raises(ValueError):
        gw.disconnect_user("alice", 999)


# -- long str ids: one name per user online in the process ----------------------------------

UUID = "3f2b9c1e-8d4a-4f6b-9e2c-7a1d5b0c4e93"
WIDEST = "é" * (USER_NAME_MAX // 2)  # non-ASCII, exactly USER_NAME_MAX bytes of UTF-8


def names(gw: Gateway) -> tuple[int, int]:
    """names is (entries, bytes) of the process's table of long str ids (its gauges)."""
    stats = gw.stats()
    return stats["user_names"], stats["user_name_bytes"]


@pytest.mark.parametrize("user", [LONG, UUID, WIDEST], ids=["email", "uuid", "non-ascii-max"])
def test_a_long_id_comes_back_as_the_str_in_every_hook(
    gateway: tuple[Gateway, list[tuple[str, object]]], user: str
) -> None:
    gw, seen = gateway
    client = connect(gw, user)
    client.send_message("who")
    assert client.receive_message() == repr(user)
    assert gw.online(user) == 1 and gw.send_to_user(user, "hi") == 1
    assert client.receive_message() == "hi"
    client.close()
    wait_until(lambda: ("close", user) in seen, "on_close with the str")
    assert [hook for hook, who in seen if who == user] == ["open", "message", "close"]
    assert not [who for _hook, who in seen if isinstance(who, UserTag)]


def test_connections_of_one_user_share_one_name_which_goes_with_the_last(
    gateway: tuple[Gateway, list[tuple[str, object]]],
) -> None:
    gw, seen = gateway
    assert names(gw) == (0, 0)  # nothing is kept while no long id is online
    short = [connect(gw, "alice"), connect(gw, "42")]
    assert names(gw) == (0, 0)  # ids kept in the tag cost nothing
    uuids = [connect(gw, UUID) for _ in range(5)]
    entries, one_user = names(gw)
    assert entries == 1 and one_user > len(UUID)
    emails = [connect(gw, LONG) for _ in range(3)]
    entries, two_users = names(gw)
    assert entries == 2 and two_users - one_user <= len(LONG) + 64  # the name and a header
    for client in uuids[:-1]:
        client.close()
    wait_until(lambda: seen.count(("close", UUID)) == 4, "four of the UUID's on_close calls")
    assert names(gw)[0] == 2  # one connection of the UUID user is still here
    uuids[-1].send_message("who")
    assert uuids[-1].receive_message() == repr(UUID)
    uuids[-1].close()
    wait_until(lambda: names(gw)[0] == 1, "the UUID's entry gone with its last connection")
    assert seen.count(("close", UUID)) == 5  # the last on_close still saw the str
    for client in emails:
        client.close()
    wait_until(lambda: names(gw) == (0, 0), "the table freed with the last long id")
    for client in short:
        client.close()


FREED_WITH_NAMES = textwrap.dedent(
    """
    from lowmemws._native import ffi, lib

    config = ffi.new("lmw_config *")
    server = lib.lmw_server_new(config, ffi.NULL)
    assert server != ffi.NULL
    for n in range(1, 40):  # enough to grow the table past its first size
        tag = (1 << 63) | n  # a long id's tag: top bit set, next bit clear
        assert lib.lmw_user_name_hold(server, tag, f"user-{n}@mail.example".encode(), 20) == 0
    lib.lmw_server_free(server)
    print("freed")
    """
)


def test_a_server_freed_while_names_are_held_frees_them() -> None:
    """A server freed with long names still held (closed events no one will handle, as when
    a gateway is torn down with connections open) frees them and exits cleanly: it used to
    move the freed entries into a table that no longer existed, and crashed."""
    done = subprocess.run(
        [sys.executable, "-c", FREED_WITH_NAMES], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "freed"


def test_a_too_long_id_is_refused_at_accept(
    gateway: tuple[Gateway, list[tuple[str, object]]],
) -> None:
    gw, seen = gateway
    with pytest.raises(ValueError, match=f"at most {USER_NAME_MAX} bytes of UTF-8, not 258"):
        Accept(user=WIDEST + "é")
    with pytest.raises(ValueError, match="at most"):
        gw.send_to_user("x" * (USER_NAME_MAX + 1), "x")
    with pytest.raises(Exception, match="500"):  # on_connect raised: answered 500
        connect(gw, "x" * (USER_NAME_MAX + 1))
    assert names(gw) == (0, 0) and not seen


WORKERS_SERVER = textwrap.dedent(
    """
    import argparse, os, threading
    from lowmemws import Accept, Config, Gateway

    parser = argparse.ArgumentParser()
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    args = parser.parse_args()
    gateway = Gateway(args.host, args.port, processes=2, config=Config(shutdown_timeout=5))

    @gateway.on_connect
    def decide(request):
        user = request.params.get("user")
        return Accept(user=user or 0, topics=() if user else ("watch",))

    @gateway.on_open
    def opened(conn):
        if conn.user:
            gateway.publish("watch", f"open {os.getpid()} {conn.user!r}")

    @gateway.on_message
    def message(conn, text):
        conn.send(f"{os.getpid()} {conn.user!r}")

    @gateway.on_close
    def closed(conn, code):
        if conn.user:
            gateway.publish("watch", f"close {conn.user!r}")

    def announce():
        if gateway.wait_ready(60):
            print(f"listening on ws://{args.host}:{gateway.port}", flush=True)

    threading.Thread(target=announce, daemon=True).start()
    gateway.run()
    """
)


def test_long_ids_come_back_in_worker_processes(start_server: StartServer, tmp_path: Path) -> None:
    script = tmp_path / "user_names_server.py"
    script.write_text(WORKERS_SERVER)
    server = start_server([sys.executable, str(script)])
    watcher = websocket.create_connection(server.url, timeout=DEADLINE)
    clients: list[websocket.WebSocket] = []
    workers: set[str] = set()
    for attempt in range(200):  # SO_REUSEPORT spreads by address hash: reach both workers
        user = (LONG, UUID, WIDEST)[attempt % 3]
        client = websocket.create_connection(
            f"{server.url}?user={quote(user, safe='')}", timeout=DEADLINE
        )
        clients.append(client)
        assert watcher.recv().endswith(f" {user!r}")  # on_open saw the str
        client.send("who")
        pid, seen = client.recv().split(" ", 1)
        assert seen == repr(user)  # on_message saw it
        workers.add(pid)
        if len(workers) == 2 and attempt >= 2:
            break
    assert len(workers) == 2, "every connection reached one worker"
    text = fetch_metrics(server.host, server.port)
    assert metric_value(text, "lowmemws_user_names") >= 3  # per user and worker, at most 6
    assert metric_value(text, "lowmemws_user_names") <= 6
    for client in clients:
        client.close()
    closes = sorted(watcher.recv() for _ in clients)
    expected = [f"close {user!r}" for user in ((LONG, UUID, WIDEST) * 70)[: len(clients)]]
    assert closes == sorted(expected)  # on_close saw the str in either worker
    wait_until(
        lambda: metric_value(fetch_metrics(server.host, server.port), "lowmemws_user_names") == 0,
        "every worker's names gone with their users",
    )
    watcher.close()


def test_a_long_id_resuming_its_user_stream_keeps_its_name(
    make_gateway: Callable[..., Gateway],
) -> None:
    """A resuming connection's user tag is set only once its user stream is replayed; its
    name is held meanwhile, then by the hub, and goes with it."""
    gw = make_gateway(Config(history=History()))
    heard: list[object] = []

    @gw.on_connect
    def decide(request):  # type: ignore[no-untyped-def]
        return Accept(user=UUID)

    @gw.on_message
    def message(conn, text):  # type: ignore[no-untyped-def]
        heard.append(conn.user)
        conn.send(repr(conn.user))

    gw.start()

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{gw.port}/"
        async with Client(url, backoff_base=0.05) as client:
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            gw.send_to_user(UUID, "stored")  # the user stream now has a position to resume
            assert (await client.next(DEADLINE)).data == "stored"  # type: ignore[union-attr]
            client.drop_link()
            for _ in range(int(DEADLINE / 0.02)):  # bounded: the reconnect and its resume
                if client.connects == 2 and client.synced.is_set():
                    break
                await asyncio.sleep(0.02)
            assert client.connects == 2 and client.synced.is_set()
            await client.send("who")
            assert (await client.next(DEADLINE)).data == repr(UUID)  # type: ignore[union-attr]
            assert names(gw)[0] == 1
        wait_until(lambda: names(gw) == (0, 0), "the name gone with the connection")

    asyncio.run(scenario())
    assert heard == [UUID]
