"""Mask group events for live subscribers, across replicas.

An event is published inside the transaction that makes the change and reaches subscribers
only once that transaction commits, never for one that rolls back:

- PostgreSQL: `SELECT pg_notify(...)` in the transaction; PostgreSQL delivers the
  notification at commit to every replica's LISTEN connection (ours included), in commit
  order, and drops it on rollback.
- SQLite (the embedded default, one process): the event waits in the session until its
  `after_commit` hook hands it to the in-process fan-out.

Each subscriber has a bounded queue. A subscriber that falls behind (its queue is full), or
every subscriber of a replica whose LISTEN connection dropped (notifications sent meanwhile are
lost), gets `EventsDropped` instead of the missing events: it must read the state again and
subscribe again (drop-and-resync), so memory never grows with a slow client.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import enum
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, Self

import asyncpg
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from app.metrics import LIVE_SUBSCRIBERS
from app.models import MaskGroup, MaskGroupStatus, utcnow

logger = logging.getLogger(__name__)

CHANNEL = "pacs_masks_events"
# Events a subscriber may have waiting; the viewer drains them in microseconds, so reaching
# this means a stuck client, not a burst.
SUBSCRIBER_QUEUE_SIZE = 256
LISTENER_APPLICATION_NAME = "pacs-masks-events"
LISTENER_KEEPALIVE_SECONDS = 15.0
LISTENER_RETRY_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
_PENDING = "pacs_masks_pending_events"
_HOOKED = "pacs_masks_event_hooks"
ASYNCPG_CONNECT_OPTIONS = frozenset(
    ("host", "port", "user", "password", "passfile", "database", "ssl", "direct_tls", "timeout")
)


class EventKind(enum.Enum):
    CREATED = "CREATED"
    SLICES_COMPLETED = "SLICES_COMPLETED"
    DELETED = "DELETED"
    VALIDATED = "VALIDATED"


class GroupState(Protocol):
    @property
    def id(self) -> int: ...
    @property
    def annotation_id(self) -> int: ...
    @property
    def slice_count(self) -> int: ...
    @property
    def uploaded_slice_count(self) -> int: ...
    @property
    def status(self) -> MaskGroupStatus: ...


@dataclass(frozen=True, slots=True)
class MaskGroupEvent:
    kind: EventKind
    annotation_id: int
    mask_group_id: int
    slice_count: int
    uploaded_slice_count: int
    status: MaskGroupStatus
    occurred_at: datetime

    @classmethod
    def of(cls, kind: EventKind, group: GroupState) -> MaskGroupEvent:
        return cls(
            kind=kind,
            annotation_id=group.annotation_id,
            mask_group_id=group.id,
            slice_count=group.slice_count,
            uploaded_slice_count=group.uploaded_slice_count,
            status=MaskGroupStatus(group.status),
            occurred_at=utcnow(),
        )

    def to_json(self) -> str:
        # Well under PostgreSQL's 8000-byte NOTIFY payload limit.
        return json.dumps(
            {
                "kind": self.kind.value,
                "annotationId": self.annotation_id,
                "maskGroupId": self.mask_group_id,
                "sliceCount": self.slice_count,
                "uploadedSliceCount": self.uploaded_slice_count,
                "status": self.status.value,
                "occurredAt": self.occurred_at.isoformat(),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, payload: str) -> MaskGroupEvent:
        data = json.loads(payload)
        return cls(
            kind=EventKind(data["kind"]),
            annotation_id=int(data["annotationId"]),
            mask_group_id=int(data["maskGroupId"]),
            slice_count=int(data["sliceCount"]),
            uploaded_slice_count=int(data["uploadedSliceCount"]),
            status=MaskGroupStatus(data["status"]),
            occurred_at=datetime.fromisoformat(data["occurredAt"]),
        )


class EventsDropped(Exception):
    """The subscriber missed events; it must read the state again and re-subscribe."""


async def group_state(session: AsyncSession, group_id: int) -> GroupState | None:
    """The group as it is in this transaction (locked on PostgreSQL), for an event about a
    change that will remove it."""
    row = (
        await session.execute(
            select(
                MaskGroup.id,
                MaskGroup.annotation_id,
                MaskGroup.slice_count,
                MaskGroup.uploaded_slice_count,
                MaskGroup.status,
            )
            .where(MaskGroup.id == group_id)
            .with_for_update()
        )
    ).first()
    return row


class EventStream:
    """One subscriber: registered from creation (nothing published after that is missed)
    until `aclose()`; use it as `async with bus.subscribe(annotation_id) as stream`."""

    __slots__ = ("_fan_out", "annotation_id", "queue")

    def __init__(self, fan_out: _FanOut, annotation_id: int) -> None:
        self._fan_out = fan_out
        self.annotation_id = annotation_id
        self.queue: asyncio.Queue[MaskGroupEvent | None] = asyncio.Queue(SUBSCRIBER_QUEUE_SIZE)
        fan_out.add(self)

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> MaskGroupEvent:
        item = await self.queue.get()
        if item is None:
            raise EventsDropped(
                "events were dropped (the subscriber fell behind or the server lost its event "
                "connection): read the state again and subscribe again"
            )
        return item

    async def aclose(self) -> None:
        self._fan_out.remove(self)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def offer(self, item: MaskGroupEvent) -> None:
        try:
            self.queue.put_nowait(item)
        except asyncio.QueueFull:
            self.drop()

    def drop(self) -> None:
        # Whatever is queued is stale once events are lost: the marker replaces it all.
        while not self.queue.empty():
            self.queue.get_nowait()
        self.queue.put_nowait(None)


class _FanOut:
    """This process's subscribers by annotation; runs on the event loop only."""

    def __init__(self) -> None:
        self._subscribers: dict[int, set[EventStream]] = {}

    def add(self, subscriber: EventStream) -> None:
        self._subscribers.setdefault(subscriber.annotation_id, set()).add(subscriber)
        LIVE_SUBSCRIBERS.inc()

    def remove(self, subscriber: EventStream) -> None:
        subscribers = self._subscribers.get(subscriber.annotation_id)
        if subscribers is not None and subscriber in subscribers:
            subscribers.remove(subscriber)
            LIVE_SUBSCRIBERS.dec()
            if not subscribers:
                del self._subscribers[subscriber.annotation_id]

    def deliver(self, item: MaskGroupEvent) -> None:
        for subscriber in tuple(self._subscribers.get(item.annotation_id, ())):
            subscriber.offer(item)

    def drop_all(self) -> None:
        for subscribers in self._subscribers.values():
            for subscriber in subscribers:
                subscriber.drop()

    def count(self, annotation_id: int | None = None) -> int:
        if annotation_id is not None:
            return len(self._subscribers.get(annotation_id, ()))
        return sum(len(subscribers) for subscribers in self._subscribers.values())


class EventBus(abc.ABC):
    """publish(session, event) inside a transaction; subscribe(annotation_id) to receive."""

    def __init__(self) -> None:
        self._fan_out = _FanOut()

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    @abc.abstractmethod
    async def publish(self, session: AsyncSession, item: MaskGroupEvent) -> None: ...

    def subscribe(self, annotation_id: int) -> EventStream:
        return EventStream(self._fan_out, annotation_id)

    def subscriber_count(self, annotation_id: int | None = None) -> int:
        return self._fan_out.count(annotation_id)


class InProcessEventBus(EventBus):
    """SQLite, one process: events wait in the session until it commits."""

    async def publish(self, session: AsyncSession, item: MaskGroupEvent) -> None:
        sync_session = session.sync_session
        if not sync_session.info.get(_HOOKED):
            sync_session.info[_HOOKED] = True
            event.listen(sync_session, "after_commit", self._after_commit)
            event.listen(sync_session, "after_rollback", _forget_pending)
        sync_session.info.setdefault(_PENDING, []).append(item)

    def _after_commit(self, sync_session: Session) -> None:
        for item in sync_session.info.pop(_PENDING, ()):
            self._fan_out.deliver(item)


def _forget_pending(sync_session: Session) -> None:
    sync_session.info.pop(_PENDING, None)


class PostgresEventBus(EventBus):
    """NOTIFY in the changing transaction; one LISTEN connection per process feeds the
    fan-out, reconnecting when it drops."""

    def __init__(self, connect: Callable[[], Any]) -> None:
        super().__init__()
        self._connect = connect
        self._task: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    async def publish(self, session: AsyncSession, item: MaskGroupEvent) -> None:
        await session.execute(select(func.pg_notify(CHANNEL, item.to_json())))

    async def start(self) -> None:
        self._task = asyncio.create_task(self._listen_forever(), name="pacs-masks-events")
        # Subscribers that arrive after start-up must not miss events: wait for LISTEN, but
        # let the server come up (and report itself unready elsewhere) if PostgreSQL is down.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._listening.wait(), timeout=10)

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    @property
    def is_listening(self) -> bool:
        return self._listening.is_set()

    async def _listen_forever(self) -> None:
        failures = 0
        while True:
            try:
                connection: asyncpg.Connection = await self._connect()
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                delay = LISTENER_RETRY_SECONDS[min(failures, len(LISTENER_RETRY_SECONDS) - 1)]
                failures += 1
                logger.warning("event listener cannot connect (retry in %ss): %s", delay, error)
                await asyncio.sleep(delay)
                continue
            failures = 0
            try:
                await self._listen(connection)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as error:
                logger.warning("event listener lost its connection, reconnecting: %s", error)
            except Exception:
                # Whatever else went wrong, the listener must come back: events depend on it.
                logger.exception("event listener failed, reconnecting")
            finally:
                self._listening.clear()
                # Notifications sent while nobody listened are gone: subscribers resync.
                self._fan_out.drop_all()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(connection.close(), timeout=2)
            # A connection that fails at once must not turn this loop into a busy one.
            await asyncio.sleep(LISTENER_RETRY_SECONDS[0])

    async def _listen(self, connection: asyncpg.Connection) -> None:
        lost = asyncio.Event()
        connection.add_termination_listener(lambda _connection: lost.set())
        await connection.add_listener(CHANNEL, self._on_notification)
        self._listening.set()
        while not lost.is_set():
            try:
                await asyncio.wait_for(lost.wait(), timeout=LISTENER_KEEPALIVE_SECONDS)
            except TimeoutError:
                # A half-open TCP connection never terminates by itself: probe it.
                await asyncio.wait_for(connection.fetchval("SELECT 1"), timeout=5)

    def _on_notification(
        self, _connection: object, _pid: int, _channel: str, payload: str | None
    ) -> None:
        try:
            item = MaskGroupEvent.from_json(payload or "")
        except (ValueError, KeyError, TypeError):
            logger.warning("ignoring malformed event payload %r", (payload or "")[:200])
            return
        self._fan_out.deliver(item)


def create_event_bus(engine: AsyncEngine) -> EventBus:
    if engine.dialect.name == "postgresql":
        _, options = engine.dialect.create_connect_args(engine.url)
        server_settings = {
            **options.pop("server_settings", {}),
            "application_name": LISTENER_APPLICATION_NAME,
        }
        # The dialect's own options (prepared statement cache and the like) are not asyncpg's.
        arguments = {
            name: value for name, value in options.items() if name in ASYNCPG_CONNECT_OPTIONS
        }

        def connect() -> Any:
            return asyncpg.connect(**arguments, server_settings=server_settings)

        return PostgresEventBus(connect)
    return InProcessEventBus()
