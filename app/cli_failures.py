"""How the command line fails: one line on stderr (what is wrong, what to do) and an exit code
per kind of failure, never a traceback. README's "Exit codes" table lists them.

`explain` turns whatever a command raised into that line and code; `check_before_serving` is
what `serve` verifies before it listens."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import socket
from enum import IntEnum

from pydantic import ValidationError
from pydantic_settings import SettingsError
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.config import Settings
from app.db import create_engine
from app.main import open_storage
from app.oidc import OidcConfig
from app.readiness import (
    DatabaseUnreachable,
    NotMigrated,
    check_database,
    check_storage,
    reason,
)
from app.storage import StorageError

logger = logging.getLogger(__name__)


class ExitCode(IntEnum):
    OK = 0
    FAILED = 1  # the command ran but could not do what was asked (e.g. no such token)
    USAGE = 2  # unknown command or option, bad argument, refused combination (argparse too)
    CONFIGURATION = 3  # a setting is invalid (environment or .env)
    DATABASE = 4  # unreachable, refused us, missing, or not at the migration head
    STORAGE = 5  # unreachable or refused
    ADDRESS = 6  # serve cannot listen on HOST:PORT
    BUSY = 7  # another process holds the work right now (cleanup while a server sweeps)
    INTERRUPTED = 130  # Ctrl-C


class CommandFailed(Exception):
    def __init__(self, code: ExitCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _settings_problem(error: ValidationError) -> str:
    problems = []
    for item in error.errors():
        variable = "_".join(str(part) for part in item["loc"]).upper()
        message = str(item["msg"]).removeprefix("Value error, ")
        # Named by variable, never echoing its value: it may be a secret.
        problems.append(f"{variable}: {message}" if variable else message)
    return "; ".join(problems)


def explain(error: BaseException) -> tuple[ExitCode, str]:
    """The exit code and the one line for an error a command raised."""
    if isinstance(error, CommandFailed):
        return error.code, error.message
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED, "interrupted"
    if isinstance(error, ValidationError):
        return (
            ExitCode.CONFIGURATION,
            f"invalid setting: {_settings_problem(error)}; fix the environment or .env",
        )
    if isinstance(error, SettingsError):
        # pydantic-settings names the field: 'error parsing value for field "x" from source ...'
        field = re.search(r'field "(\w+)"', str(error))
        variable = field.group(1).upper() if field else "a setting"
        cause = f" ({reason(error.__cause__)})" if error.__cause__ else ""
        return (
            ExitCode.CONFIGURATION,
            f"invalid setting: {variable} cannot be parsed{cause}; fix the environment or .env",
        )
    if isinstance(error, NotMigrated):
        return (
            ExitCode.DATABASE,
            f"the database is not migrated: {error}; run `pacs-masks migrate` first",
        )
    if isinstance(error, DatabaseUnreachable):
        return (
            ExitCode.DATABASE,
            f"cannot use the database: {error}; check DATABASE_URL and that the server runs",
        )
    if isinstance(error, SQLAlchemyError):
        return ExitCode.DATABASE, f"database error: {reason(error)}; check DATABASE_URL"
    if isinstance(error, StorageError):
        return (
            ExitCode.STORAGE,
            (
                f"storage unavailable: {error}; check STORAGE_PROVIDER, S3_ENDPOINT_URL, "
                "S3_BUCKET_NAME (`pacs-masks setup-storage` creates it) and the credentials"
            ),
        )
    return (
        ExitCode.FAILED,
        (
            f"unexpected error ({type(error).__name__}: {reason(error)}); "
            "run again with LOG_LEVEL=debug for details"
        ),
    )


def ensure_var_dir(settings: Settings) -> None:
    try:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandFailed(
            ExitCode.CONFIGURATION,
            f"cannot create VAR_DIR {settings.var_dir} ({error.strerror}); "
            "set VAR_DIR to a writable folder",
        ) from error


def open_engine(settings: Settings) -> AsyncEngine:
    """The engine for DATABASE_URL, or CommandFailed when the URL cannot name one."""
    try:
        return create_engine(settings.resolved_database_url)
    except (ArgumentError, NoSuchModuleError, ImportError) as error:
        raise CommandFailed(
            ExitCode.CONFIGURATION,
            f"DATABASE_URL is not usable ({reason(error)}); "
            "write postgresql://user:password@host/database or sqlite:///path",
        ) from error


async def database_answers(settings: Settings, *, need_head: bool) -> None:
    """Raises DatabaseUnreachable / NotMigrated (or ArgumentError for a malformed URL)."""
    engine = open_engine(settings)
    try:
        await check_database(engine, settings.readiness_timeout, need_head=need_head)
    finally:
        await engine.dispose()


def _check_address(host: str, port: int) -> None:
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As uvicorn binds: a port left in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as error:
        hint = "choose another --port (PORT)"
        if error.errno not in (errno.EADDRINUSE, errno.EACCES):
            hint = "check --host (HOST)"
        raise CommandFailed(
            ExitCode.ADDRESS, f"cannot listen on {host}:{port} ({error.strerror}); {hint}"
        ) from error


async def check_before_serving(settings: Settings) -> None:
    """What would otherwise fail on the first request: settings the lifespan reads, the
    database at the migration head, storage answering, the address free."""
    try:
        OidcConfig.from_settings(settings)
    except (ValueError, TypeError) as error:
        raise CommandFailed(ExitCode.CONFIGURATION, f"invalid setting: {error}") from error
    await database_answers(settings, need_head=True)
    try:
        storage = await open_storage(settings)
    except OSError as error:  # the local backend's folder or secret file
        raise CommandFailed(
            ExitCode.CONFIGURATION,
            f"cannot use local storage ({error.strerror}: {error.filename}); "
            "set LOCAL_STORAGE_DIR (or VAR_DIR) to a writable folder",
        ) from error
    try:
        await check_storage(storage, settings.readiness_timeout)
    finally:
        await storage.aclose()
    await asyncio.to_thread(_check_address, settings.host, settings.port)
