"""History with positions, the envelope subprotocol and resume, in one process (LocalBus).

Clients are real: lowmemws.client (asyncio) for the envelope subprotocol, websocket-client
(an independent implementation) for a raw client and for hand-written resume requests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from collections.abc import Callable

import pytest
import websocket

from lowmemws import Accept, Config, Gateway, History
from lowmemws._history import MemoryStore
from lowmemws.bus import Envelope, LocalBus
from lowmemws.client import Client, Delivery, Refresh
from tests.support import waiting

DEADLINE = 10.0  # bounds every wait; not a performance figure


def history_gateway(make_gateway: Callable[..., Gateway], **history: int) -> Gateway:
    gateway = make_gateway(Config(history=History(**history)))

    @gateway.on_connect
    def decide(request: object) -> Accept:
        return Accept(user=7, topics=("mail",))

    return gateway.start()


async def take(client: Client, count: int) -> list[Delivery | Refresh]:
    return [await client.next(DEADLINE) for _ in range(count)]


def texts(events: list[Delivery | Refresh]) -> list[object]:
    return [e.data if isinstance(e, Delivery) else ("refresh", e.stream) for e in events]


# -- the store -----------------------------------------------------------------------------


def test_offsets_count_up_per_stream_under_one_epoch_each() -> None:
    store = MemoryStore(History())
    positions = [store.append(s, b"\x01x") for s in ("t:a", "t:a", "u:1", "t:a")]
    assert [offset for _, offset in positions] == [1, 2, 1, 3]
    assert positions[0][0] == positions[1][0] == positions[3][0] != positions[2][0]


def test_a_read_returns_what_follows_within_its_bounds() -> None:
    store = MemoryStore(History(topic_size=3))
    for n in range(5):
        store.append("t:a", bytes((1,)) + str(n).encode())
    result = store.read("t:a", 2, 10, 1000)
    assert (result.last, result.first) == (5, 3)  # two trimmed by topic_size
    assert [offset for offset, _ in result.entries] == [3, 4, 5]
    bounded = store.read("t:a", 2, 2, 1000)
    assert [offset for offset, _ in bounded.entries] == [3, 4] and bounded.truncated


def test_a_stream_evicted_comes_back_with_a_new_epoch() -> None:
    store = MemoryStore(History(max_streams=1))
    epoch, _ = store.append("t:a", b"\x01x")
    store.append("t:b", b"\x01x")  # evicts t:a, its position with it
    again, offset = store.append("t:a", b"\x01x")
    assert again != epoch and offset == 1


def test_the_store_keeps_at_most_memory_bytes() -> None:
    store = MemoryStore(History(memory_bytes=10_000))
    for n in range(1000):
        store.append(f"t:{n % 7}", b"\x01" + bytes(99))
    assert store.stored_bytes <= 10_000


def test_a_position_travels_between_nodes_in_the_envelope() -> None:
    envelope = Envelope.for_topic("mail", "hi").with_position("abc123", 42)
    again = Envelope.decode(envelope.encode())
    assert (again.stream, again.epoch, again.offset, again.payload) == (
        "t:mail",
        "abc123",
        42,
        b"hi",
    )
    with pytest.raises(ValueError):
        Envelope.decode(b"\x03\x05ab:1x")  # a position around nothing valid


# -- the wire --------------------------------------------------------------------------------


def test_a_raw_client_gets_raw_payloads_and_an_envelope_client_envelopes(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/"
    raw = websocket.create_connection(url, timeout=DEADLINE)
    enveloped = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    assert enveloped.getsubprotocol() == "lowmemws.v1"
    gateway.publish("mail", "hello")
    gateway.send_to_user(7, b"\x00\xff")
    gateway.broadcast("all")
    assert [raw.recv() for _ in range(3)] == ["hello", b"\x00\xff", "all"]
    got = [json.loads(enveloped.recv()) for _ in range(3)]
    assert got[0] == {"s": "t:mail", "e": got[0]["e"], "o": 1, "d": "hello"}
    assert got[1] == {"s": "u:7", "e": got[1]["e"], "o": 1, "b": "AP8="}
    assert got[2] == {"d": "all"}  # a broadcast is not stored: no position


def test_a_direct_send_to_an_envelope_client_is_wrapped_too(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(history=History()))

    @gateway.on_open
    def greet(conn: object) -> None:
        conn.send("welcome")  # type: ignore[attr-defined]

    gateway.start()
    url = f"ws://127.0.0.1:{gateway.port}/"
    enveloped = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    assert json.loads(enveloped.recv()) == {"d": "welcome"}
    assert websocket.create_connection(url, timeout=DEADLINE).recv() == "welcome"


def test_a_malformed_resume_parameter_is_refused_with_400(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/?lmw_resume=" + urllib.parse.quote('{"x:1": 3}')
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    assert refused.value.status_code == 400


# -- resume ----------------------------------------------------------------------------------


def test_a_client_that_reconnects_gets_what_it_missed_once_in_order(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)

    async def scenario() -> None:
        async with Client(f"ws://127.0.0.1:{gateway.port}/", backoff_base=0.05) as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            gateway.publish("mail", "m1")
            gateway.send_to_user(7, "u1")
            assert texts(await take(client, 2)) == ["m1", "u1"]
            client.drop_link()  # as a network failure: no close frame
            await asyncio.sleep(0.05)
            for n in range(2, 7):
                gateway.publish("mail", f"m{n}")
            gateway.send_to_user(7, "u2")
            events = await take(client, 6)
            assert sorted(texts(events), key=str) == ["m2", "m3", "m4", "m5", "m6", "u2"]
            mail = [e.data for e in events if isinstance(e, Delivery) and e.stream == "t:mail"]
            assert mail == ["m2", "m3", "m4", "m5", "m6"]
            assert client.connects == 2
            gateway.publish("mail", "m7")  # live again, after the replay
            assert texts(await take(client, 1)) == ["m7"]
            assert client.positions["t:mail"][1] == 7

    asyncio.run(scenario())


def test_live_messages_during_a_replay_are_neither_lost_doubled_nor_early(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway, topic_size=5000, replay_max_messages=5000)
    stop = threading.Event()
    published: list[int] = []

    def publisher() -> None:
        n = 0
        while not stop.is_set() and n < 3000:
            n += 1
            gateway.publish("mail", str(n))
            published.append(n)

    async def scenario() -> list[int]:
        seen: list[int] = []
        async with Client(f"ws://127.0.0.1:{gateway.port}/", backoff_base=0.01) as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            thread = threading.Thread(target=publisher)
            thread.start()
            for _ in range(5):  # reconnect repeatedly while messages keep coming
                await asyncio.sleep(0.02)
                client.drop_link()
            await asyncio.sleep(0.05)
            stop.set()
            thread.join()
            while len(seen) < len(published):
                event = await client.next(DEADLINE)
                assert isinstance(event, Delivery), event
                seen.append(int(str(event.data)))
        return seen

    seen = asyncio.run(scenario())
    assert seen == list(range(1, len(published) + 1))


def test_a_position_older_than_the_history_is_told_to_refresh(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway, topic_size=3)
    for n in range(1, 11):
        gateway.publish("mail", f"m{n}")

    async def scenario() -> None:
        epoch = gateway._bus.history_read("t:mail", 0, 1, 100).epoch  # type: ignore[union-attr]
        url = f"ws://127.0.0.1:{gateway.port}/"
        async with Client(url, positions={"t:mail": (epoch, 2)}) as client:
            event = await client.next(DEADLINE)
            assert event == Refresh("t:mail", epoch, 10)
            gateway.publish("mail", "m11")
            assert texts(await take(client, 1)) == ["m11"]  # live from the new position
        async with Client(url, positions={"t:mail": (epoch, 8)}) as client:
            assert texts(await take(client, 2)) == ["m9", "m10"]  # inside the history
        async with Client(url, positions={"t:mail": ("another", 8)}) as client:
            assert await client.next(DEADLINE) == Refresh("t:mail", epoch, 11)

    asyncio.run(scenario())


def test_a_replay_past_its_bounds_is_told_to_refresh(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway, replay_max_messages=5)
    for n in range(1, 21):
        gateway.publish("mail", f"m{n}")
    epoch = gateway._bus.history_read("t:mail", 0, 1, 100).epoch  # type: ignore[union-attr]

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{gateway.port}/"
        async with Client(url, positions={"t:mail": (epoch, 1)}) as client:
            assert await client.next(DEADLINE) == Refresh("t:mail", epoch, 20)
        async with Client(url, positions={"t:mail": (epoch, 16)}) as client:
            assert texts(await take(client, 4)) == ["m17", "m18", "m19", "m20"]

    asyncio.run(scenario())
    text = gateway.metrics_text()
    assert "lowmemws_history_refreshed_total 1" in text
    assert "lowmemws_history_replayed_total 1" in text


def test_a_gap_seen_on_a_live_link_is_replayed_in_band(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/"
    ws = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    for n in range(1, 5):
        gateway.publish("mail", f"m{n}")
    got = [json.loads(ws.recv()) for _ in range(4)]
    epoch = got[0]["e"]
    ws.send(json.dumps({"lmw_resume": {"t:mail": [epoch, 1], "t:other": [epoch, 1]}}))
    replay = [json.loads(ws.recv()) for _ in range(5)]
    assert [m.get("d") for m in replay[:3]] == ["m2", "m3", "m4"]
    assert replay[3] == {"resumed": "t:mail", "e": epoch, "o": 4}
    assert replay[4] == {"refresh": "t:other", "e": "", "o": 0}  # not its topic: nothing


def test_a_client_may_not_resume_another_users_stream(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    gateway.send_to_user(8, "secret")
    epoch = gateway._bus.history_read("u:8", 0, 1, 100).epoch  # type: ignore[union-attr]
    resume = urllib.parse.quote(json.dumps({"u:8": [epoch, 0]}))
    url = f"ws://127.0.0.1:{gateway.port}/?lmw_resume={resume}"
    ws = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    outcomes = [json.loads(ws.recv()) for _ in range(3)]
    # its own streams get their position (a baseline); the other user's stream nothing
    assert outcomes[0] == {"resumed": "t:mail", "e": "", "o": 0}
    assert outcomes[1] == {"resumed": "u:7", "e": "", "o": 0}
    assert outcomes[2] == {"refresh": "u:8", "e": "", "o": 0}


class FreezingProxy:
    """A loopback TCP proxy whose current links can be frozen: bytes stop flowing both ways
    but the sockets stay open, as on a dead network path (no FIN, no RST)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.frozen: list[asyncio.Event] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._link, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        for frozen in self.frozen:
            frozen.set()

    async def _link(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        frozen = asyncio.Event()
        self.frozen.append(frozen)

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(65536):
                if not frozen.is_set():
                    dst.write(data)

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_the_python_client_replaces_a_silent_link_by_its_heartbeat_deadline(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = make_gateway(Config(history=History(), ping_interval=0.2, ping_timeout=30))

    @gateway.on_connect
    def decide(request: object) -> Accept:
        return Accept(topics=("mail",))

    gateway.start()

    async def scenario() -> None:
        proxy = FreezingProxy(gateway.port)
        await proxy.start()
        url = f"ws://127.0.0.1:{proxy.port}/"
        async with Client(url, heartbeat_timeout=1.0, backoff_base=0.05) as client:
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            await asyncio.sleep(1.5)  # the gateway's pings keep an idle link alive
            assert client.connects == 1
            gateway.publish("mail", "m1")
            assert texts(await take(client, 1)) == ["m1"]
            proxy.freeze()  # the path dies silently
            gateway.publish("mail", "m2")  # lost on the frozen link ...
            assert texts(await take(client, 1)) == ["m2"]  # ... replayed on the new one
            assert client.connects == 2

    asyncio.run(scenario())


# -- batches and paced sends with history ----------------------------------------------------


def test_a_batch_is_stored_per_user_and_enveloped_with_that_users_position(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/"
    raw = websocket.create_connection(url, timeout=DEADLINE)
    enveloped = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
    gateway.send_to_user(7, "first")
    gateway.send_to_users([8, 7, 0, 7, 9], "batch")  # 7 listed twice gets it once; 0: nobody
    gateway.send_to_user(7, "after")
    assert [raw.recv() for _ in range(3)] == ["first", "batch", "after"]
    got = [json.loads(enveloped.recv()) for _ in range(3)]
    assert [(g["s"], g["o"], g["d"]) for g in got] == [
        ("u:7", 1, "first"), ("u:7", 2, "batch"), ("u:7", 3, "after"),
    ]  # fmt: skip
    bus = gateway._bus
    for user in (8, 9):  # the users with no connection here have it stored too
        stored = bus.history_read(f"u:{user}", 0, 10, 10_000)  # type: ignore[union-attr]
        assert [offset for offset, _ in stored.entries] == [1]
    assert bus.history_read("u:0", 0, 10, 10_000).epoch == ""  # type: ignore[union-attr]


def test_a_batch_missed_while_disconnected_is_resumed_once_in_order(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)

    async def scenario() -> None:
        async with Client(f"ws://127.0.0.1:{gateway.port}/", backoff_base=0.05) as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            gateway.send_to_users([7, 8], "b1")
            assert texts(await take(client, 1)) == ["b1"]
            client.drop_link()
            await asyncio.sleep(0.05)
            gateway.send_to_users([8, 7], "b2")
            gateway.send_to_users([7], "b3")
            events = await take(client, 2)
            assert texts(events) == ["b2", "b3"]
            assert all(isinstance(e, Delivery) and e.stream == "u:7" for e in events)
            assert client.connects == 2
            gateway.send_to_users([7, 9], "b4")
            assert texts(await take(client, 1)) == ["b4"]
            assert client.positions["u:7"][1] == 4

    asyncio.run(scenario())


def test_a_paced_send_with_history_is_stored_then_paced_enveloped_or_raw(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/"
    raw = websocket.create_connection(url, timeout=DEADLINE)  # no lowmemws.v1: raw payloads

    async def scenario() -> None:
        async with Client(url, backoff_base=0.05) as client:
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            gateway.publish("mail", "m1")
            assert gateway.publish("mail", "p2", spread=0.3) == 2  # members found at the call
            gateway.send_to_user(7, "u1", rate=100.0)
            gateway.broadcast("all", rate=10.0)
            events = await take(client, 4)
            got = {(e.stream, e.offset, e.data) for e in events if isinstance(e, Delivery)}
            assert got == {
                ("t:mail", 1, "m1"),
                ("t:mail", 2, "p2"),  # stored at the call: the next position of its stream
                ("u:7", 1, "u1"),  # an int id is its own tag
                (None, 0, "all"),  # a broadcast is not stored
            }
            with pytest.raises(ValueError, match="several users is not supported with history"):
                gateway.send_to_users([7, 8], "p", spread=0.5, pace_id="x")
            gateway.publish("mail", "m3")
            assert texts(await take(client, 1)) == ["m3"]

    asyncio.run(scenario())
    assert sorted(raw.recv() for _ in range(5)) == ["all", "m1", "m3", "p2", "u1"]
    raw.close()


def test_a_client_dropped_during_a_paced_send_resumes_each_message_once_in_order(
    make_gateway: Callable[..., Gateway],
) -> None:
    """Raw members connected first hold the lower fds, so the paced steps reach the envelope
    client last: it drops while the sends are in flight, resumes them by replay, and the
    steps may still bring some to its new connection: it hands each over once, in order."""
    gateway = history_gateway(make_gateway)
    url = f"ws://127.0.0.1:{gateway.port}/"
    crowd = [websocket.create_connection(url, timeout=DEADLINE) for _ in range(20)]

    async def scenario() -> None:
        async with Client(url, backoff_base=0.05) as client:
            await asyncio.wait_for(client.synced.wait(), DEADLINE)
            for n in range(1, 6):
                gateway.publish("mail", f"p{n}", spread=0.5)
            client.drop_link()
            events = await take(client, 5)
            assert [(e.stream, e.data) for e in events if isinstance(e, Delivery)] == [
                ("t:mail", f"p{n}") for n in range(1, 6)
            ]
            waiting.waiter(DEADLINE, interval=0.02)(
                lambda: gateway.stats()["paced_in_flight"] == 0, "the paced sends done"
            )
            gateway.publish("mail", "m6")  # anything the steps brought again came before it
            assert texts(await take(client, 1)) == ["m6"]
            assert client.positions["t:mail"][1] == 6

    asyncio.run(scenario())
    for member in crowd:  # raw: paced sends in flight together keep no order among them
        got = [member.recv() for _ in range(6)]
        assert sorted(got[:5]) == [f"p{n}" for n in range(1, 6)] and got[5] == "m6"
        member.close()


def test_hooks_see_the_accepted_user_while_its_stream_is_replayed(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = history_gateway(make_gateway)
    seen: list[tuple[str, object]] = []
    heard = threading.Event()

    @gateway.on_message
    def record(conn: object, message: str | bytes) -> None:
        seen.append(("message", conn.user))  # type: ignore[attr-defined]
        heard.set()

    @gateway.on_close
    def record_close(conn: object, code: int) -> None:
        seen.append(("close", conn.user))  # type: ignore[attr-defined]
        heard.set()

    gateway.send_to_user(7, "missed")
    epoch = gateway._bus.history_read("u:7", 0, 1, 100).epoch  # type: ignore[union-attr]
    resume = urllib.parse.quote(json.dumps({"u:7": [epoch, 0]}))
    url = f"ws://127.0.0.1:{gateway.port}/?lmw_resume={resume}"
    stripe = gateway._resumer.stripe("u:7")  # type: ignore[union-attr]
    with stripe:  # the replay of u:7 waits for it: the user tag is not in the slot yet
        ws = websocket.create_connection(url, timeout=DEADLINE, subprotocols=["lowmemws.v1"])
        ws.send("hello")
        assert heard.wait(DEADLINE)
        heard.clear()
        ws.close()
        assert heard.wait(DEADLINE)
    assert seen == [("message", 7), ("close", 7)]


def test_a_local_read_never_holds_a_message_not_delivered_yet() -> None:
    """A LocalBus read waits for the publish in progress: a message stored but not yet
    delivered here would be given to a resuming client as its position and then arrive live
    with an offset the client takes for one it has (it lost the first message of a stream:
    test_a_client_that_reconnects_gets_what_it_missed_once_in_order, under load)."""
    bus = LocalBus()
    bus.enable_history(History())
    in_deliver, go_on = threading.Event(), threading.Event()
    order: list[str] = []

    def deliver(envelope: Envelope) -> int:
        in_deliver.set()
        assert go_on.wait(DEADLINE)
        order.append(f"delivered {envelope.offset}")
        return 1

    bus.start(deliver)
    publisher = threading.Thread(target=bus.publish, args=(Envelope.for_topic("a", "m1"),))
    publisher.start()
    assert in_deliver.wait(DEADLINE)  # m1 is stored, its delivery not done

    stripe = threading.Lock()

    def read() -> None:
        result = bus.history_read("t:a", 0, 10, 1 << 20, stripe)
        order.append(f"read {[at for at, _ in result.entries]}")
        stripe.release()

    reader = threading.Thread(target=read)
    reader.start()
    reader.join(0.5)  # a read that did not wait would be done by now (and fail below)
    go_on.set()
    for thread in (publisher, reader):
        thread.join(DEADLINE)
    assert order == ["delivered 1", "read [1]"]
    bus.close()


def test_a_client_started_from_the_state_positions_misses_nothing_before_its_first_sync(
    make_gateway: Callable[..., Gateway],
) -> None:
    """The application reads its state and Gateway.positions together and starts the client
    from them: what is published before the client connects, and while its first connection
    drops before its first sync, still reaches it, once, in order."""
    gateway = history_gateway(make_gateway)
    gateway.publish("mail", "in the state")
    positions = gateway.positions(topics=("mail", "empty"), user=7)
    assert positions["t:mail"][1] == 1
    assert positions["t:empty"] == ("", 0) and positions["u:7"] == ("", 0)  # no history yet
    gateway.publish("mail", "m2")  # after the state, before the client connects
    gateway.send_to_user(7, "u1")

    async def scenario() -> None:
        url = f"ws://127.0.0.1:{gateway.port}/"
        async with Client(url, positions=positions, backoff_base=0.05) as client:
            await asyncio.wait_for(client.connected.wait(), DEADLINE)
            client.drop_link()  # before its first sync: it still names every stream
            gateway.publish("mail", "m3")
            events = await take(client, 3)
            assert sorted(texts(events), key=str) == ["m2", "m3", "u1"]
            mail = [e.data for e in events if isinstance(e, Delivery) and e.stream == "t:mail"]
            assert mail == ["m2", "m3"]
            gateway.publish("mail", "m4")
            assert texts(await take(client, 1)) == ["m4"]

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="history is off"):
        make_gateway().positions(topics=("mail",))
