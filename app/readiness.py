"""Is this deployment able to serve: the database answers and is at the Alembic head, storage
answers. One set of checks for `/readyz` (each named in its answer) and for the command line
(`serve` refuses to start, the token commands refuse to run, with one line saying why)."""

from __future__ import annotations

import asyncio
from functools import cache
from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.db import alembic_config
from app.storage import KEY_ROOT, Storage, StorageError

# Alembic's default version table (migrations/env.py does not rename it).
VERSION_TABLE = "alembic_version"
# A listing under a group that can never exist (ids start at 1): one cheap round trip.
PROBE_KEY = f"{KEY_ROOT}/0/0/slice_00000.png"


class DatabaseUnreachable(Exception):
    """The database did not answer, refused us, or does not exist."""


class NotMigrated(Exception):
    """The database answers but is not at the migration head this code needs."""


def reason(error: BaseException) -> str:
    """One line about `error` for an operator: the driver's message, never SQL or a stack."""
    original = error.orig if isinstance(error, DBAPIError) and error.orig else error
    lines = str(original).strip().splitlines()
    return lines[0] if lines else type(original).__name__


@cache
def migration_heads() -> frozenset[str]:
    """The revisions this code was written for (read once from migrations/)."""
    return frozenset(ScriptDirectory.from_config(alembic_config("sqlite://")).get_heads())


def _current_revisions(connection: Connection) -> frozenset[str]:
    if not inspect(connection).has_table(VERSION_TABLE):
        return frozenset()
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    return frozenset(str(row[0]) for row in rows)


def _missing_sqlite_file(engine: AsyncEngine) -> Path | None:
    # SQLite would create an empty file on connect: a mistyped path or a fresh directory must
    # be reported, not turned into a new database.
    if engine.dialect.name != "sqlite":
        return None
    database = engine.url.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return None
    path = Path(database)
    return None if path.exists() else path


async def check_database(engine: AsyncEngine, timeout: float, *, need_head: bool = True) -> None:
    """Raises DatabaseUnreachable or NotMigrated with a message an operator can act on."""
    missing = _missing_sqlite_file(engine)
    if missing is not None:
        if need_head:
            raise NotMigrated(f"there is no database file at {missing}")
        if not missing.parent.is_dir():
            raise DatabaseUnreachable(f"the folder {missing.parent} does not exist")
        return
    where = engine.url.render_as_string(hide_password=True)
    try:
        async with asyncio.timeout(timeout), engine.connect() as connection:
            current = await connection.run_sync(_current_revisions)
    except TimeoutError:
        raise DatabaseUnreachable(f"{where} did not answer within {timeout:g} s") from None
    except Exception as error:
        raise DatabaseUnreachable(f"{where}: {reason(error)}") from error
    if need_head and current != migration_heads():
        at = ", ".join(sorted(current)) or "no revision"
        head = ", ".join(sorted(migration_heads()))
        raise NotMigrated(f"{where} is at {at}, this version needs {head}")


async def check_storage(storage: Storage, timeout: float) -> None:
    """One listing that finds nothing; raises StorageError when storage does not answer."""
    try:
        async with asyncio.timeout(timeout):
            await storage.stat_objects([PROBE_KEY])
    except TimeoutError:
        raise StorageError(f"storage did not answer within {timeout:g} s") from None
    except OSError as error:
        raise StorageError(reason(error)) from error


async def _database_state(engine: AsyncEngine, timeout: float) -> tuple[str, str, str | None]:
    try:
        await check_database(engine, timeout)
    except DatabaseUnreachable as error:
        return "unreachable", "unknown", str(error)
    except NotMigrated as error:
        return "ok", "not at head", str(error)
    return "ok", "ok", None


async def _storage_state(storage: Storage, timeout: float) -> tuple[str, str | None]:
    try:
        await check_storage(storage, timeout)
    except StorageError as error:
        return "unreachable", str(error)
    return "ok", None


async def readiness(
    engine: AsyncEngine, storage: Storage, timeout: float
) -> tuple[dict[str, str], list[str]]:
    """{"database": ..., "migrations": ..., "storage": ...}, each "ok" or what is wrong, and
    the reasons for the log; both checks run at once, each within `timeout`."""
    (database, migrations, db_problem), (storage_state, storage_problem) = await asyncio.gather(
        _database_state(engine, timeout), _storage_state(storage, timeout)
    )
    states = {"database": database, "migrations": migrations, "storage": storage_state}
    return states, [problem for problem in (db_problem, storage_problem) if problem]
