"""Live mask group events: graphql-transport-ws on /graphql over a real uvicorn server, SQLite
in-process and PostgreSQL LISTEN/NOTIFY across two servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from conftest import Stack, base_settings, open_stack, reset
from flows import create_annotation, create_group, upload
from operations import COMPLETE, DELETE_GROUP
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from app.db import transaction
from app.events import (
    LISTENER_APPLICATION_NAME,
    SUBSCRIBER_QUEUE_SIZE,
    EventKind,
    EventsDropped,
    InProcessEventBus,
    MaskGroupEvent,
    PostgresEventBus,
    create_event_bus,
)
from app.models import MaskGroup, MaskGroupStatus, utcnow

# The README's example is the subscription every test here sends.
EVENTS = re.search(  # type: ignore[union-attr]
    r"```graphql\n(subscription .*?)```",
    (Path(__file__).resolve().parent.parent / "README.md").read_text(),
    re.DOTALL,
).group(1)
PROTOCOL = "graphql-transport-ws"
WAIT_SECONDS = 10


class LiveClient:
    """A graphql-transport-ws client, as the viewer's `graphql-ws` speaks it."""

    def __init__(self, socket: ClientConnection) -> None:
        self.socket = socket

    async def send(self, message: dict[str, Any]) -> None:
        await self.socket.send(json.dumps(message))

    async def receive(self, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        message: dict[str, Any] = json.loads(await asyncio.wait_for(self.socket.recv(), timeout))
        return message

    async def subscribe(self, annotation_id: str, operation_id: str = "1") -> None:
        await self.send(
            {
                "id": operation_id,
                "type": "subscribe",
                "payload": {"query": EVENTS, "variables": {"annotationId": annotation_id}},
            }
        )

    async def event(self, timeout: float = WAIT_SECONDS) -> dict[str, Any]:
        message = await self.receive(timeout)
        assert message["type"] == "next", message
        assert "errors" not in message["payload"], message
        event: dict[str, Any] = message["payload"]["data"]["maskGroupEvents"]
        return event


def ws_url(base_url: str) -> str:
    return base_url.replace("http://", "ws://", 1) + "/graphql"


@contextlib.asynccontextmanager
async def live(
    base_url: str, token: str | None, *, header: bool = False
) -> AsyncIterator[LiveClient]:
    headers = {"Authorization": f"Bearer {token}"} if header and token else {}
    async with connect(
        ws_url(base_url),
        subprotocols=[PROTOCOL],
        additional_headers=headers,  # type: ignore[list-item]
    ) as socket:
        client = LiveClient(socket)
        payload = {"Authorization": f"Bearer {token}"} if token and not header else {}
        await client.send({"type": "connection_init", "payload": payload})
        ack = await client.receive()
        assert ack == {"type": "connection_ack"}
        yield client


async def subscribers(stack: Stack, annotation_id: str, count: int = 1) -> None:
    """Waits until the server has registered `count` subscribers (the protocol has no
    'subscribed' message, and a mutation sent earlier would not be seen)."""
    bus = stack.services.events
    for _ in range(WAIT_SECONDS * 100):
        if bus.subscriber_count(int(annotation_id)) == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{bus.subscriber_count(int(annotation_id))} subscribers, not {count}")


def expected(
    kind: str, annotation_id: str, group_id: str, total: int, done: int, status: str
) -> dict[str, Any]:
    return {
        "kind": kind,
        "annotationId": annotation_id,
        "maskGroupId": group_id,
        "sliceCount": total,
        "uploadedSliceCount": done,
        "status": status,
    }


def without_time(event: dict[str, Any]) -> dict[str, Any]:
    assert event["occurredAt"].endswith("+00:00")
    return {name: value for name, value in event.items() if name != "occurredAt"}


async def test_subscriber_sees_another_clients_changes(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    async with live(stack.base_url, stack.tokens["reader"]) as client:
        await client.subscribe(annotation_id)
        await subscribers(stack, annotation_id)

        group_id = await create_group(stack, annotation_id, 3)
        created = await client.event()
        assert without_time(created) == expected(
            "CREATED", annotation_id, group_id, 3, 0, "PENDING"
        )

        await upload(stack, group_id, [0, 1])
        completed = await client.event()
        assert without_time(completed) == expected(
            "SLICES_COMPLETED", annotation_id, group_id, 3, 2, "UPLOADING"
        )

        # Refused batches (nothing uploaded for slice 2; a sliceCount out of range) publish
        # nothing: the next event the subscriber sees is the deletion.
        refused = await stack.error(COMPLETE, {"groupId": group_id, "slices": [{"sliceIndex": 2}]})
        assert refused["extensions"]["code"] == "UPLOAD_INCOMPLETE"
        bad = await stack.error(
            "mutation($input: CreateMaskGroupInput!) { createMaskGroup(input: $input) { id } }",
            {"input": {"annotationId": annotation_id, "sliceCount": 0}},
        )
        assert bad["extensions"]["code"] == "BAD_USER_INPUT"
        forbidden = await stack.error(DELETE_GROUP, {"id": group_id}, as_="other")
        assert forbidden["extensions"]["code"] == "FORBIDDEN"

        await stack.data(DELETE_GROUP, {"id": group_id})
        deleted = await client.event()
        assert without_time(deleted) == expected(
            "DELETED", annotation_id, group_id, 3, 2, "UPLOADING"
        )
        assert created["occurredAt"] <= completed["occurredAt"] <= deleted["occurredAt"]

    # The subscriber went with its socket.
    await subscribers(stack, annotation_id, 0)


async def test_events_of_other_annotations_are_not_sent(stack: Stack) -> None:
    watched = await create_annotation(stack)
    other = await create_annotation(stack, "1.2.3.4")
    async with live(stack.base_url, stack.tokens["reader"]) as client:
        await client.subscribe(watched)
        await subscribers(stack, watched)
        await create_group(stack, other, 1)
        group_id = await create_group(stack, watched, 1)
        assert (await client.event())["maskGroupId"] == group_id


async def test_token_in_the_upgrade_header_is_accepted(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    async with live(stack.base_url, stack.tokens["reader"], header=True) as client:
        await client.subscribe(annotation_id)
        await subscribers(stack, annotation_id)
        group_id = await create_group(stack, annotation_id, 1)
        assert (await client.event())["maskGroupId"] == group_id


@pytest.mark.parametrize(
    "authorization", [None, "Bearer pmk_not-a-token", "Basic dXNlcjpwYXNz", 42]
)
async def test_unauthenticated_connection_is_closed_4403(
    sqlite_local_stack: Stack, authorization: Any
) -> None:
    payload = {} if authorization is None else {"Authorization": authorization}
    async with connect(ws_url(sqlite_local_stack.base_url), subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        await socket.send(json.dumps({"type": "connection_init", "payload": payload}))
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), WAIT_SECONDS)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403


async def test_subscribe_before_connection_init_is_closed_4401(sqlite_local_stack: Stack) -> None:
    async with connect(ws_url(sqlite_local_stack.base_url), subprotocols=[PROTOCOL]) as socket:  # type: ignore[list-item]
        client = LiveClient(socket)
        await client.subscribe("1")
        with pytest.raises(ConnectionClosed) as closed:
            await asyncio.wait_for(socket.recv(), WAIT_SECONDS)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4401


async def test_cross_site_page_cannot_open_a_socket(sqlite_local_stack: Stack) -> None:
    with pytest.raises(InvalidStatus) as refused:
        async with connect(
            ws_url(sqlite_local_stack.base_url),
            subprotocols=[PROTOCOL],  # type: ignore[list-item]
            origin="https://evil.example",  # type: ignore[arg-type]
        ):
            pass
    assert refused.value.response.status_code == 403


async def test_only_subscriptions_and_known_annotations(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    async with live(stack.base_url, stack.tokens["reader"]) as client:
        await client.send({"id": "q", "type": "subscribe", "payload": {"query": "{ me { user } }"}})
        refused = await client.receive()
        assert refused["type"] == "error"
        assert refused["payload"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        await client.subscribe(str(int(annotation_id) + 1000), "missing")
        missing = await client.receive()
        assert missing["id"] == "missing"
        assert missing["type"] == "next"
        assert missing["payload"]["data"] is None
        assert missing["payload"]["errors"][0]["extensions"]["code"] == "NOT_FOUND"
        assert await client.receive() == {"id": "missing", "type": "complete"}

        await client.send(
            {"id": "typo", "type": "subscribe", "payload": {"query": "subscription { nope }"}}
        )
        invalid = await client.receive()
        assert invalid["type"] == "error"
        assert invalid["payload"][0]["extensions"]["code"] == "BAD_USER_INPUT"

        deep = "subscription { maskGroupEvents(annotationId: 1) { kind " + "x " * 30000 + "} }"
        await client.send({"id": "big", "type": "subscribe", "payload": {"query": deep}})
        too_big = await client.receive()
        assert too_big["type"] == "error"
        assert too_big["payload"][0]["extensions"]["code"] == "BAD_USER_INPUT"


async def test_disconnected_subscribers_leave_nothing_behind(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    is_postgres = isinstance(stack.services.events, PostgresEventBus)
    listeners = await _listener_pids(stack.settings.database_url) if is_postgres else []
    tasks_before = len(asyncio.all_tasks())
    for _ in range(3):
        async with live(stack.base_url, stack.tokens["reader"]) as client:
            await client.subscribe(annotation_id, "a")
            await client.subscribe(annotation_id, "b")
            await subscribers(stack, annotation_id, 2)
        await subscribers(stack, annotation_id, 0)
    # An explicit complete ends the operation while the socket stays open.
    async with live(stack.base_url, stack.tokens["reader"]) as client:
        await client.subscribe(annotation_id)
        await subscribers(stack, annotation_id)
        await client.send({"id": "1", "type": "complete"})
        await subscribers(stack, annotation_id, 0)
    for _ in range(WAIT_SECONDS * 100):
        if len(asyncio.all_tasks()) <= tasks_before:
            break
        await asyncio.sleep(0.01)
    assert len(asyncio.all_tasks()) <= tasks_before
    assert stack.services.events.subscriber_count() == 0
    if is_postgres:
        # The same LISTEN connection per server as before, none per subscriber.
        assert listeners
        assert await _listener_pids(stack.settings.database_url) == listeners


async def test_rolled_back_transaction_publishes_nothing(stack: Stack) -> None:
    bus = stack.services.events
    annotation_id = int(await create_annotation(stack))

    def event(group_id: int) -> MaskGroupEvent:
        return MaskGroupEvent(
            EventKind.VALIDATED, annotation_id, group_id, 1, 1, MaskGroupStatus.COMPLETE, utcnow()
        )

    async with bus.subscribe(annotation_id) as stream:
        with contextlib.suppress(RuntimeError):
            async with transaction(stack.sessionmaker) as session:
                await bus.publish(session, event(1))
                raise RuntimeError("batch refused")
        async with transaction(stack.sessionmaker) as session:
            await bus.publish(session, event(2))
            await bus.publish(session, event(3))
            # Nothing before the commit.
            await asyncio.sleep(0.05)
            assert stream.queue.empty()
        received = [await asyncio.wait_for(anext(stream), WAIT_SECONDS) for _ in range(2)]
        assert [item.mask_group_id for item in received] == [2, 3]
        # One session, several transactions: each event once, when its own one commits.
        async with stack.sessionmaker() as session:
            for group_id in (4, 5):
                async with session.begin():
                    await bus.publish(session, event(group_id))
        received = [await asyncio.wait_for(anext(stream), WAIT_SECONDS) for _ in range(2)]
        assert [item.mask_group_id for item in received] == [4, 5]
        await asyncio.sleep(0.05)
        assert stream.queue.empty()


async def test_slow_subscriber_is_dropped_not_buffered(sqlite_local_stack: Stack) -> None:
    bus = InProcessEventBus()
    stack = sqlite_local_stack
    async with bus.subscribe(7) as slow, bus.subscribe(7) as fast:
        sent = 0
        received = 0
        for _ in range(SUBSCRIBER_QUEUE_SIZE + 10):
            async with transaction(stack.sessionmaker) as session:
                await bus.publish(
                    session,
                    MaskGroupEvent(
                        EventKind.CREATED, 7, sent, 1, 0, MaskGroupStatus.PENDING, utcnow()
                    ),
                )
            sent += 1
            await anext(fast)
            received += 1
            assert slow.queue.qsize() <= SUBSCRIBER_QUEUE_SIZE
        assert received == sent
        # The slow one holds one marker, not hundreds of events, and learns it must resync.
        assert slow.queue.qsize() < SUBSCRIBER_QUEUE_SIZE
        with pytest.raises(EventsDropped):
            await anext(slow)
    assert bus.subscriber_count() == 0


async def _listener_pids(database_url: str) -> list[int]:
    dsn = database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
    connection = await asyncpg.connect(dsn)
    try:
        rows = await connection.fetch(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = "
            "current_database()",
            LISTENER_APPLICATION_NAME,
        )
    finally:
        await connection.close()
    return sorted(row["pid"] for row in rows)


@pytest.fixture
async def two_replicas(postgres_url: str, tmp_path: Path) -> AsyncIterator[tuple[Stack, Stack]]:
    """Two servers on one PostgreSQL database, as two replicas behind a load balancer."""
    replicas = []
    async with contextlib.AsyncExitStack() as stacks:
        for name in ("a", "b"):
            settings = base_settings(
                database_url=postgres_url, var_dir=tmp_path / name, storage_provider="local"
            )
            replicas.append(
                await stacks.enter_async_context(open_stack(f"replica-{name}", settings))
            )
        try:
            yield replicas[0], replicas[1]
        finally:
            await reset(replicas[0])


async def test_events_cross_replicas(two_replicas: tuple[Stack, Stack]) -> None:
    server_a, server_b = two_replicas
    annotation_id = await create_annotation(server_a)
    async with (
        live(server_b.base_url, server_b.tokens["reader"]) as on_b,
        live(server_a.base_url, server_a.tokens["reader"]) as on_a,
    ):
        await on_b.subscribe(annotation_id)
        await on_a.subscribe(annotation_id)
        await subscribers(server_b, annotation_id)
        await subscribers(server_a, annotation_id)

        group_id = await create_group(server_a, annotation_id, 2)
        await upload(server_a, group_id, [0, 1])
        await server_a.data(DELETE_GROUP, {"id": group_id})
        for client in (on_b, on_a):
            kinds = [(await client.event()) for _ in range(3)]
            assert [
                (event["kind"], event["uploadedSliceCount"], event["status"]) for event in kinds
            ] == [
                ("CREATED", 0, "PENDING"),
                ("SLICES_COMPLETED", 2, "COMPLETE"),
                ("DELETED", 2, "COMPLETE"),
            ]


async def test_listener_reconnects_and_subscribers_resync(
    two_replicas: tuple[Stack, Stack],
) -> None:
    server_a, server_b = two_replicas
    bus_b: PostgresEventBus = server_b.services.events
    annotation_id = await create_annotation(server_a)
    async with live(server_b.base_url, server_b.tokens["reader"]) as client:
        await client.subscribe(annotation_id)
        await subscribers(server_b, annotation_id)
        before = set(await _listener_pids(server_b.settings.database_url))
        admin = await asyncpg.connect(
            server_b.settings.database_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        )
        try:
            # Both replicas' listeners drop, as when PostgreSQL restarts or fails over.
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE "
                "application_name = $1 AND datname = current_database()",
                LISTENER_APPLICATION_NAME,
            )
        finally:
            await admin.close()
        # What was missed is not replayed: the subscriber is told to read the state again.
        dropped = await client.receive()
        assert dropped["type"] == "next"
        error = dropped["payload"]["errors"][0]
        assert error["extensions"] == {"code": "CONFLICT", "resync": True}
        complete = await client.receive()
        assert complete == {"id": "1", "type": "complete"}

        for _ in range(WAIT_SECONDS * 10):
            if bus_b.is_listening:
                break
            await asyncio.sleep(0.1)
        after = set(await _listener_pids(server_b.settings.database_url))
        assert after
        assert not after & before

        await client.subscribe(annotation_id, "2")
        await subscribers(server_b, annotation_id)
        group_id = await create_group(server_a, annotation_id, 1)
        assert (await client.event())["maskGroupId"] == group_id


async def test_a_job_in_another_process_publishes_validated(
    two_replicas: tuple[Stack, Stack],
) -> None:
    """The validation job publishes with a bus of its own on its own engine, as a separate
    process would; on PostgreSQL that needs no listener."""
    server, _ = two_replicas
    annotation_id = await create_annotation(server)
    group_id = await create_group(server, annotation_id, 1)
    await upload(server, group_id, [0])
    job_bus = create_event_bus(server.engine)
    async with live(server.base_url, server.tokens["reader"]) as client:
        await client.subscribe(annotation_id)
        await subscribers(server, annotation_id)
        async with transaction(server.sessionmaker) as session:
            group = await session.get(MaskGroup, int(group_id))
            assert group is not None
            await job_bus.publish(session, MaskGroupEvent.of(EventKind.VALIDATED, group))
        validated = await client.event()
        assert without_time(validated) == expected(
            "VALIDATED", annotation_id, group_id, 1, 1, "COMPLETE"
        )
