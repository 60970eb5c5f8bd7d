"""str user ids: ``Accept(user="alice")``, ``send_to_user("alice", ...)`` and ``conn.user``.

A str id becomes the 64-bit tag its connections carry in C, nothing more: an id short enough
is kept in the tag itself (keyed, reversible), so every hook gets the str back; a longer one
is a keyed hash, so hooks after on_open get a UserTag that reaches the same connections.
Clients are wsproto, an independent RFC 6455 implementation.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lowmemws import Accept, Gateway, UserTag
from lowmemws._user_ids import INT_USER_MAX, UserIds, deployment_key
from tests.support import waiting
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
    return WsprotoClient("127.0.0.1", gw.port, f"/?user={user}", timeout=DEADLINE)


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
    tag = long.receive_message()
    assert isinstance(tag, str) and tag.startswith("UserTag(0x")

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
    hashed = [user for _hook, user in later if isinstance(user, UserTag)]
    assert len(hashed) == 2  # the long id's message and close: a UserTag, the same both times
    assert hashed[0] == hashed[1]
    assert gw.send_to_user(hashed[0], "by tag") == 0  # it closed: nobody left
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
