"""Background jobs: periodic tasks that every replica runs and one of them does each time.

A job is a name, an async function of a `JobContext`, and the names of its on/off and
interval settings; `app.main.JOBS` lists them, one line each, and the lifespan starts a
`JobRunner` over them. Replica safety comes from the database, never from process state:

- a run is claimed on the job's `job_run` row (`FOR UPDATE SKIP LOCKED` on PostgreSQL; on
  SQLite, one process, `BEGIN IMMEDIATE` serialises) and leased for `lease_seconds`, so one
  replica runs a job per interval;
- work inside a run is claimed row by row with `claim_due`, which pushes the rows' due time
  past a lease in the same short transaction, so two runs at once (a replica and the
  `cleanup` command, or a lease that ran out) never take the same row.

A failing run is logged and tried again at the next interval; `stop` cancels the loops.
`wake(name)` starts a run at once (the DICOM export mutation, after its commit), so work a
request has just recorded does not wait for the interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import InstrumentedAttribute

from app.config import Settings
from app.db import Base, transaction
from app.events import EventBus
from app.models import JobRun, utcnow
from app.storage import Storage

# A generator of its own: jitter must not draw from (nor disturb) the global `random` that
# the rest of the process, or a test framework seeding it, relies on.
_JITTER = random.Random()
# How soon a woken job asks again for a lease another holder had.
WOKEN_RETRY_SECONDS = 1.0
logger = logging.getLogger(__name__)

Row = TypeVar("Row", bound=Base)


def owner_name() -> str:
    """Who holds a lease, for operators reading `job_run`: host, process and a nonce."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass(frozen=True, slots=True)
class JobContext:
    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    storage: Storage
    owner: str
    # For jobs that publish live events (validation); the `cleanup` command runs without.
    events: EventBus | None = None


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    run: Callable[[JobContext], Awaitable[object]]
    # Names of Settings fields: a bool that switches the job on, seconds between runs.
    enabled_setting: str
    interval_setting: str
    # How long a claimed run keeps other replicas off the job if this one dies meanwhile.
    lease_seconds: float = 3600.0

    def enabled(self, settings: Settings) -> bool:
        return bool(getattr(settings, self.enabled_setting))

    def interval(self, settings: Settings) -> float:
        return float(getattr(settings, self.interval_setting))


async def claim_due(
    session: AsyncSession,
    model: type[Row],
    due: InstrumentedAttribute[datetime],
    *,
    now: datetime,
    lease: timedelta,
    limit: int,
    where: ColumnElement[bool] | None = None,
) -> Sequence[Row]:
    """Rows of `model` whose `due` time has come, locked without waiting for rows another
    replica holds, and made due again only after `lease`: the caller works on them after the
    transaction (storage I/O never runs inside one) and settles each when done."""
    statement = select(model).where(due <= now)
    if where is not None:
        statement = statement.where(where)
    statement = statement.order_by(due).limit(limit).with_for_update(skip_locked=True)
    rows = (await session.scalars(statement)).all()
    for row in rows:
        setattr(row, due.key, now + lease)
    await session.flush()
    return rows


def _insert_ignoring_conflicts(session: AsyncSession, values: dict[str, Any]) -> Any:
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    return dialect.insert(JobRun).values(**values).on_conflict_do_nothing()


class JobRunner:
    def __init__(self, context: JobContext, jobs: Sequence[Job]) -> None:
        self.context = context
        self.jobs = list(jobs)
        self._tasks: list[asyncio.Task[None]] = []
        self._wakes = {job.name: asyncio.Event() for job in self.jobs}

    def wake(self, name: str) -> None:
        """Run the job now rather than at its next interval (a no-op if it is switched off;
        another replica's live lease still wins, and its next run finds the work)."""
        self._wakes[name].set()

    def start(self) -> None:
        for job in self.jobs:
            if job.enabled(self.context.settings):
                task = asyncio.create_task(self._loop(job), name=f"job:{job.name}")
                self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _loop(self, job: Job) -> None:
        interval = job.interval(self.context.settings)
        wake = self._wakes[job.name]
        # `serve --workers N` runs this loop in each of its N processes: each polls N times
        # less often, the first time at a random point of that period, so together they look
        # for work about once an interval (the lease decides who runs), not N times.
        processes = self.context.settings.workers
        period = interval * processes
        delay = period * (_JITTER.uniform(0.9, 1.1) if processes == 1 else _JITTER.random())
        retry = False
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), delay)
            # Jitter keeps replicas started together from claiming in lockstep.
            delay = period * _JITTER.uniform(0.9, 1.1)
            # Cleared before the run: a wake during it means work the run may have missed.
            woken = wake.is_set() or retry
            wake.clear()
            try:
                claimed, _report = await self._run(job, force=woken)
            except Exception:
                logger.exception("job %s failed; it runs again in %.0f s", job.name, interval)
                claimed = True
            # Woken for new work while another replica (or worker) holds the lease: its run
            # may have read before that work was committed, so ask again soon rather than a
            # whole period later (a completed upload's VALIDATED waited up to a minute).
            retry = woken and not claimed
            if retry:
                delay = min(delay, WOKEN_RETRY_SECONDS)

    async def run_once(self, job: Job, *, force: bool = False) -> object | None:
        """Run the job if this replica claims it; None when another holds it or (unless
        `force`, as the command line does) it is not due yet."""
        return (await self._run(job, force=force))[1]

    async def _run(self, job: Job, *, force: bool) -> tuple[bool, object | None]:
        if not await self._claim(job, utcnow(), force=force):
            return False, None
        error: str | None = None
        try:
            report = await job.run(self.context)
        except BaseException as exc:
            error = f"{type(exc).__name__}: {exc}"[:1000]
            raise
        finally:
            await self._release(job, error)
        # A report that is false (an export poll that found nothing) is not worth a log line.
        logger.log(logging.INFO if report else logging.DEBUG, "job %s: %s", job.name, report)
        return True, report

    async def _claim(self, job: Job, now: datetime, *, force: bool) -> bool:
        return await acquire_lease(
            self.context.sessionmaker,
            job.name,
            self.context.owner,
            now=now,
            lease=timedelta(seconds=job.lease_seconds),
            # A little early, so the jittered loop finds it due.
            next_run_in=timedelta(seconds=job.interval(self.context.settings) * 0.9),
            force=force,
        )

    async def _release(self, job: Job, error: str | None) -> None:
        await release_lease(self.context.sessionmaker, job.name, self.context.owner, error)


async def acquire_lease(
    sessionmaker: async_sessionmaker[AsyncSession],
    name: str,
    owner: str,
    *,
    now: datetime,
    lease: timedelta,
    next_run_in: timedelta = timedelta(0),
    force: bool = False,
) -> bool:
    """Take the `job_run` row `name` for `lease` unless another holder's lease is live (or,
    without `force`, it is not due yet); also usable for one part of a job that must not run
    twice at once (the sweeper's debris pass)."""
    async with transaction(sessionmaker) as session:
        await session.execute(
            _insert_ignoring_conflicts(session, {"name": name, "next_run_at": now})
        )
        run = await session.scalar(
            select(JobRun).where(JobRun.name == name).with_for_update(skip_locked=True)
        )
        if run is None or (run.locked_until is not None and run.locked_until > now):
            return False
        if not force and run.next_run_at > now:
            return False
        run.locked_until = now + lease
        run.locked_by = owner
        run.next_run_at = now + next_run_in
    return True


async def release_lease(
    sessionmaker: async_sessionmaker[AsyncSession], name: str, owner: str, error: str | None
) -> None:
    try:
        async with transaction(sessionmaker) as session:
            await session.execute(
                update(JobRun)
                .where(JobRun.name == name, JobRun.locked_by == owner)
                .values(locked_until=None, last_finished_at=utcnow(), last_error=error)
            )
    except Exception:
        # The lease runs out by itself; the next run proceeds then.
        logger.exception("job %s: releasing its lease failed", name)
