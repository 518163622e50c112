from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, MetaData, event
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def create_engine(url: str) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, connect_args={"timeout": 30})
        event.listen(engine.sync_engine, "connect", _configure_sqlite)
        event.listen(engine.sync_engine, "begin", _begin_sqlite)
        return engine
    engine = create_async_engine(url, pool_size=10, max_overflow=20)
    event.listen(engine.sync_engine, "checkout", _ping_if_idle)
    event.listen(engine.sync_engine, "connect", _note_checkin)  # a new one needs no ping
    event.listen(engine.sync_engine, "checkin", _note_checkin)
    return engine


# A pooled connection is pinged before use only when it has been idle this long. SQLAlchemy's
# pool_pre_ping pings at every checkout, and asyncpg's ping is BEGIN, `;` and ROLLBACK: three
# round trips before each of a tree's three reads. A connection back in the pool a moment ago
# was alive then; should the server restart in between, the statement that finds it dead fails
# and SQLAlchemy discards every pooled connection older than that failure.
PING_AFTER_IDLE_SECONDS = 5.0
_CHECKED_IN_AT = "pacs_masks_checked_in_at"


def _ping_if_idle(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
    checked_in_at = record.info.get(_CHECKED_IN_AT)
    if checked_in_at is not None and time.monotonic() - checked_in_at < PING_AFTER_IDLE_SECONDS:
        return
    try:
        dbapi_connection.ping()
    except Exception as error:
        # The pool discards this connection and checks out another (up to three times).
        raise DisconnectionError(str(error)) from error


def _note_checkin(_dbapi_connection: Any, record: Any) -> None:
    record.info[_CHECKED_IN_AT] = time.monotonic()


def _configure_sqlite(dbapi_connection: Any, _record: Any) -> None:
    # Foreign keys are off by default in SQLite; WAL lets readers run beside the one writer.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()
    # We emit BEGIN ourselves (below): the driver's implicit one comes too late to isolate.
    dbapi_connection.isolation_level = None


def _begin_sqlite(connection: Connection) -> None:
    # A write transaction takes SQLite's write lock at BEGIN (IMMEDIATE), which serialises
    # batches of one group as FOR UPDATE does on PostgreSQL; reads stay DEFERRED.
    mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
    connection.exec_driver_sql(f"BEGIN {mode}")


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def create_read_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions for reads of one statement each (the GraphQL dataloaders'), from the same
    pool. On PostgreSQL they run in autocommit: a lone SELECT is its own snapshot either way,
    and BEGIN and ROLLBACK are two of the six round trips a read in a transaction costs.
    SQLite keeps its transactions (app.db emits their BEGIN itself)."""
    if engine.dialect.name != "postgresql":
        return create_sessionmaker(engine)
    return create_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))


@asynccontextmanager
async def transaction(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> AsyncIterator[AsyncSession]:
    """The one transaction boundary: commits when the block succeeds, rolls back otherwise."""
    bind = sessionmaker.kw["bind"]
    if bind.dialect.name == "sqlite":
        bind = bind.execution_options(sqlite_begin="IMMEDIATE")
    async with sessionmaker(bind=bind) as session, session.begin():
        yield session


MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would read a '%' in a password as a placeholder.
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade_database(url: str, revision: str = "head") -> None:
    """alembic upgrade on `url`; runs its own event loop, so call it from a thread in async code."""
    command.upgrade(alembic_config(url), revision)
