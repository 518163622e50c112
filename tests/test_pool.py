"""Pooled PostgreSQL connections are pinged before use only after idling
(app.db.PING_AFTER_IDLE_SECONDS): what each behaviour does when the server drops them."""

from __future__ import annotations

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from app import db


async def _backend_pid(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        pid: int = await connection.scalar(text("SELECT pg_backend_pid()"))
    return pid


async def _terminate(url: str, pid: int) -> None:
    """As when PostgreSQL restarts or fails over under a pooled connection."""
    admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def test_a_dead_connection_that_idled_is_replaced_before_use(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "PING_AFTER_IDLE_SECONDS", 0.0)
    engine = db.create_engine(postgres_url)
    try:
        dead = await _backend_pid(engine)
        await _terminate(postgres_url, dead)
        # The ping finds it dead: the pool connects anew and the statement never sees it.
        assert await _backend_pid(engine) != dead
    finally:
        await engine.dispose()


async def test_a_connection_used_a_moment_ago_is_not_pinged(postgres_url: str) -> None:
    engine = db.create_engine(postgres_url)
    try:
        dead = await _backend_pid(engine)
        await _terminate(postgres_url, dead)
        # Not pinged, so the statement that finds it dead fails, once: SQLAlchemy then
        # discards the pool's connections and the next statement connects anew.
        with pytest.raises(DBAPIError) as failed:
            await _backend_pid(engine)
        assert failed.value.connection_invalidated
        assert await _backend_pid(engine) != dead
    finally:
        await engine.dispose()
