"""What a connection may do in each state of the runtime's state machine (src/lowmemws/_conn.c
has the table), as a client sees it on the wire: one question, one answer, whatever sends it
(conn.send, publish, send_to_user, broadcast).

- UPGRADE_WAIT (on_connect running): nothing reaches the client before its 101.
- OPEN: every kind of send reaches it.
- DEFERRED (the client's close arrived in the same read as a message): the connection is still
  open until Python has answered that message; every kind of send made then reaches the client
  before the close echo.
- CLOSING (the server sent its close): no data frame follows the close frame.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from wsproto.events import BytesMessage, CloseConnection, TextMessage

from lowmemws import Accept, Config, Connection, Gateway, Request
from tests.support import waiting
from tests.support.wsproto_client import WsprotoClient

DEADLINE = 10.0  # bounds every wait; not a performance figure
wait_until = waiting.waiter(DEADLINE)


def messages_then_close(client: WsprotoClient) -> tuple[list[str | bytes], int | None]:
    """messages_then_close reads every message up to the server's close: (messages, code)."""
    messages: list[str | bytes] = []
    while True:
        event = client.next_event()
        if isinstance(event, TextMessage | BytesMessage):
            messages.append(event.data if isinstance(event.data, str) else bytes(event.data))
        elif isinstance(event, CloseConnection):
            return messages, event.code


def start_user_gateway(make_gateway: Callable[..., Gateway]) -> Gateway:
    gateway = make_gateway(Config())

    @gateway.on_connect
    def connect(request: Request) -> Accept:
        return Accept(user=7, topics=("news",))

    return gateway


def test_a_deferred_connection_receives_every_kind_of_send_before_its_close(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_user_gateway(make_gateway)
    seen_open: list[bool] = []

    @gateway.on_message
    def reply(conn: Connection, message: str | bytes) -> None:
        seen_open.append(conn.is_open)
        conn.send(f"echo {message!s}")
        gateway.publish("news", "published")
        gateway.send_to_user(7, "to the user")
        gateway.broadcast("broadcast")

    gateway.start()
    with WsprotoClient("127.0.0.1", gateway.port) as client:
        # the message and the close in one write: the server reads both at once
        client.sock.sendall(
            client.ws.send(TextMessage(data="m")) + client.ws.send(CloseConnection(code=1000))
        )
        messages, code = messages_then_close(client)
    assert messages == ["echo m", "published", "to the user", "broadcast"]
    assert code == 1000
    assert seen_open == [True]


def test_an_open_connection_receives_every_kind_of_send(
    make_gateway: Callable[..., Gateway],
) -> None:
    gateway = start_user_gateway(make_gateway)
    opened = threading.Event()
    conns: list[Connection] = []

    @gateway.on_open
    def remember(conn: Connection) -> None:
        conns.append(conn)
        opened.set()

    gateway.start()
    with WsprotoClient("127.0.0.1", gateway.port) as client:
        assert opened.wait(DEADLINE)
        assert conns[0].is_open
        assert conns[0].send("sent")
        gateway.publish("news", "published")
        gateway.send_to_user(7, "to the user")
        gateway.broadcast("broadcast")
        got = [client.receive_message() for _ in range(4)]
    assert got == ["sent", "published", "to the user", "broadcast"]


def test_nothing_reaches_a_connection_before_its_101(make_gateway: Callable[..., Gateway]) -> None:
    gateway = make_gateway(Config())
    during_hook: list[int] = []

    @gateway.on_connect
    def connect(request: Request) -> Accept:
        during_hook.append(gateway.broadcast("too early"))
        return Accept(user=7)

    gateway.start()
    with WsprotoClient("127.0.0.1", gateway.port) as client:
        gateway.broadcast("after")
        assert client.receive_message() == "after"
    assert during_hook == [0]


def test_no_data_follows_the_servers_close(make_gateway: Callable[..., Gateway]) -> None:
    gateway = start_user_gateway(make_gateway)
    conns: list[Connection] = []

    @gateway.on_open
    def remember(conn: Connection) -> None:
        conns.append(conn)

    gateway.start()
    with WsprotoClient("127.0.0.1", gateway.port) as client:
        wait_until(lambda: bool(conns), "the connection opened")
        conn = conns[0]
        assert conn.close(4000, "bye")
        assert not conn.is_open
        assert not conn.send("after the close")
        reached = gateway.broadcast("after the close") + gateway.publish("news", "after")
        messages, code = messages_then_close(client)
    assert (messages, code, reached) == ([], 4000, 0)
