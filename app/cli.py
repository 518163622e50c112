from __future__ import annotations

import argparse
import asyncio
import dataclasses
import getpass
import json
import logging
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import NoReturn

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor
from app.bucket_setup import iam_policy
from app.cli_failures import (
    CommandFailed,
    ExitCode,
    check_before_serving,
    database_answers,
    ensure_var_dir,
    explain,
    open_engine,
)
from app.client.cli import add_client_commands
from app.config import Settings
from app.db import create_sessionmaker, transaction, upgrade_database
from app.dicom import cli as dicom_cli
from app.errors import NotFound
from app.graphql.schema import schema
from app.jobs import JobContext, JobRunner, owner_name
from app.log_redaction import RedactSecrets
from app.logging_setup import configure_logging
from app.main import JOBS, open_storage
from app.models import ApiToken, utcnow
from app.principals import Principal, Role
from app.readiness import check_database
from app.sweeper import SweepReport, sweep
from app.tokens import count_tokens, create_token, list_tokens, revoke_token
from app.usage import UsageGrouping, UsageRow, storage_usage, usage_table
from app.workers import run_server

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # containers may run as a uid with no passwd entry
        user = "unknown"
    return Actor(principal=Principal(user=f"cli:{user}", role=Role.ADMIN))


@asynccontextmanager
async def _database(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = open_engine(settings)
    try:
        await check_database(engine, settings.readiness_timeout)
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


async def _first_start_token(settings: Settings) -> str | None:
    """An admin token on the embedded default's first start, as Jupyter prints one."""
    async with _database(settings) as sessionmaker, transaction(sessionmaker) as session:
        if await count_tokens(session):
            return None
        _, secret = await create_token(
            session, _cli_actor(), user="admin", role=Role.ADMIN, expires_in=None, now=utcnow()
        )
        return secret


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    updates = {
        "host": args.host or settings.host,
        "port": args.port or settings.port,
        "workers": args.workers or settings.workers,
    }
    settings = settings.model_copy(update=updates)
    configure_logging(settings)
    if settings.auth_disabled and settings.host not in LOOPBACK_HOSTS:
        raise CommandFailed(
            ExitCode.USAGE,
            f"refusing to listen on {settings.host} with AUTH_DISABLED set; "
            "without authentication only a loopback address is allowed",
        )
    if settings.workers > 1 and not settings.resolved_database_url.startswith("postgresql"):
        # SQLite's live events reach only the process that made the change, and its one
        # writer at a time gains nothing from more processes.
        raise CommandFailed(
            ExitCode.USAGE,
            f"refusing {settings.workers} workers on SQLite: live events would not reach the "
            "other workers; run one worker (--workers 1) or set DATABASE_URL to PostgreSQL",
        )
    if settings.is_embedded_database:
        ensure_var_dir(settings)
        upgrade_database(settings.resolved_database_url)
    # Refuses a database behind the migration head, unreachable storage, a taken port.
    asyncio.run(check_before_serving(settings))
    if settings.is_embedded_database:
        token = None if settings.auth_disabled else asyncio.run(_first_start_token(settings))
        if token:
            print(
                "pacs-masks: first start, an ADMIN token was created for user 'admin'.\n"
                "pacs-masks: send it as 'Authorization: Bearer <token>'; it is shown only once:\n"
                f"    {token}",
                flush=True,
            )
    base = settings.resolved_public_base_url
    print(f"pacs-masks: viewer at {base}/viewer/", flush=True)
    print(f"pacs-masks: GraphiQL at {base}/graphql", flush=True)
    if settings.is_embedded_database:
        print(
            f"pacs-masks: embedded default, database and storage under {settings.var_dir.resolve()}",
            flush=True,
        )
    # Start-up work above runs once, here; with --workers N this process then supervises.
    run_server(settings)
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    if settings.is_embedded_database:
        ensure_var_dir(settings)
    asyncio.run(database_answers(settings, need_head=False))
    upgrade_database(settings.resolved_database_url, args.revision)
    print(f"pacs-masks: database at revision {args.revision}")
    return 0


def _export_schema(settings: Settings, args: argparse.Namespace) -> int:
    sys.stdout.write(schema.as_str() + "\n")
    return 0


def _setup_storage(settings: Settings, args: argparse.Namespace) -> int:
    if args.print_iam_policy:
        print(json.dumps(iam_policy(settings.s3_bucket_name), indent=2))
        return 0

    async def run() -> None:
        storage = await open_storage(settings)
        try:
            await storage.ensure_bucket(settings.cors_origins)
        finally:
            await storage.aclose()

    asyncio.run(run())
    if settings.storage_provider == "local":
        print(f"pacs-masks: local storage ready in {settings.resolved_local_storage_dir}")
        return 0
    expiry = settings.s3_mask_expiry_days
    print(
        f"pacs-masks: bucket {settings.s3_bucket_name} ready; CORS for "
        f"{', '.join(settings.cors_origins) or 'no origins (CORS_ORIGINS is empty)'}; "
        "incomplete multipart uploads aborted after 1 day; "
        + (f"masks expire after {expiry} days" if expiry else "masks never expire")
    )
    return 0


def _cleanup(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> object | None:
        storage = await open_storage(settings)
        try:
            async with _database(settings) as sessionmaker:
                context = JobContext(settings, sessionmaker, storage, owner_name())
                if args.dry_run:
                    return await sweep(context, dry_run=True)
                [job] = [job for job in JOBS if job.name == "storage-cleanup"]
                return await JobRunner(context, JOBS).run_once(job, force=True)
        finally:
            await storage.aclose()

    report = asyncio.run(run())
    if not isinstance(report, SweepReport):
        print(
            "pacs-masks: another sweeper (a running server) is cleaning storage right now; "
            "try again when it is done",
            file=sys.stderr,
        )
        return ExitCode.BUSY
    print(json.dumps(report.as_dict()) if args.json else f"pacs-masks: {report.summary()}")
    return ExitCode.FAILED if report.errors else ExitCode.OK


def _create_token(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> tuple[ApiToken, str]:
        async with _database(settings) as sessionmaker, transaction(sessionmaker) as session:
            return await create_token(
                session,
                _cli_actor(),
                user=args.user,
                role=Role[args.role.upper()],
                expires_in=timedelta(days=args.expires_days) if args.expires_days else None,
                now=utcnow(),
            )

    token, secret = asyncio.run(run())
    expiry = token.expires_at.isoformat() if token.expires_at else "never"
    print(f"token {token.id} for {token.user} ({token.role.value}), expires {expiry}")
    # The secret is the last line so scripts can take it with `tail -n 1`.
    print(secret)
    return 0


def _revoke_token(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        async with _database(settings) as sessionmaker, transaction(sessionmaker) as session:
            await revoke_token(session, _cli_actor(), args.id, utcnow())

    try:
        asyncio.run(run())
    except NotFound as error:
        raise CommandFailed(ExitCode.FAILED, error.message) from error
    print(f"token {args.id} revoked")
    return 0


def _list_tokens(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> Sequence[ApiToken]:
        async with _database(settings) as sessionmaker, sessionmaker() as session:
            return await list_tokens(session)

    tokens = asyncio.run(run())
    now = utcnow()
    print(f"{'id':>5}  {'user':<24} {'role':<9} {'prefix':<11} {'state':<8} expires")
    for token in tokens:
        if token.revoked_at is not None:
            state = "revoked"
        elif token.expires_at is not None and token.expires_at <= now:
            state = "expired"
        else:
            state = "active"
        expiry = token.expires_at.isoformat(timespec="seconds") if token.expires_at else "never"
        print(
            f"{token.id:>5}  {token.user:<24} {token.role.value:<9} "
            f"{token.token_prefix + '…':<11} {state:<8} {expiry}"
        )
    return 0


def _usage(settings: Settings, args: argparse.Namespace) -> int:
    grouping = UsageGrouping[args.group_by.upper()]

    async def run() -> list[UsageRow]:
        async with _database(settings) as sessionmaker, sessionmaker() as session:
            return await storage_usage(session, grouping)

    rows = asyncio.run(run())
    if args.json:
        print(json.dumps([dataclasses.asdict(row) for row in rows], indent=2))
    else:
        print(usage_table(grouping, rows))
    return 0


def _dicom(settings: Settings, args: argparse.Namespace) -> int:
    code, line = dicom_cli.run(settings, args, _cli_actor())
    print(line, file=sys.stderr if code else sys.stdout)
    return code


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


class _Parser(argparse.ArgumentParser):
    """argparse, failing like every other command: one line, exit code 2 (not its usage)."""

    def error(self, message: str) -> NoReturn:
        self.exit(ExitCode.USAGE, f"{self.prog}: {message}; see `{self.prog} --help`\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pacs-masks", description="Segmentation-mask upload service.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API server (applies migrations on SQLite)")
    serve.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 8000)")
    serve.add_argument(
        "--workers",
        type=_positive_int,
        help="server processes sharing the port (WORKERS, default 1; more need PostgreSQL)",
    )
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="alembic upgrade on DATABASE_URL")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(handler=_migrate)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.set_defaults(handler=_export_schema)

    setup = commands.add_parser(
        "setup-storage", help="create the bucket, CORS for CORS_ORIGINS and lifecycle rules"
    )
    setup.add_argument(
        "--print-iam-policy",
        action="store_true",
        help="print the least-privilege IAM policy for S3_BUCKET_NAME and change nothing",
    )
    setup.set_defaults(handler=_setup_storage)

    cleanup = commands.add_parser(
        "cleanup",
        help="remove what deleted groups and abandoned uploads left in storage (the sweeper)",
    )
    cleanup.add_argument("--dry-run", action="store_true", help="report, remove nothing")
    cleanup.add_argument("--json", action="store_true", help="print the report as JSON")
    cleanup.set_defaults(handler=_cleanup)

    create = commands.add_parser("create-token", help="create an API token (printed last)")
    create.add_argument("--user", required=True, help="who the token acts as")
    create.add_argument(
        "--role", required=True, choices=["reader", "uploader", "admin"], type=str.lower
    )
    create.add_argument("--expires-days", type=_positive_int, help="default: never expires")
    create.set_defaults(handler=_create_token)

    revoke = commands.add_parser("revoke-token", help="revoke an API token by its id")
    revoke.add_argument("id", type=int)
    revoke.set_defaults(handler=_revoke_token)

    listing = commands.add_parser("list-tokens", help="list API tokens (never their secrets)")
    listing.set_defaults(handler=_list_tokens)

    usage = commands.add_parser("usage", help="storage taken by the masks, from the database")
    usage.add_argument(
        "--group-by",
        choices=[grouping.value.lower() for grouping in UsageGrouping],
        default="model",
        type=str.lower,
    )
    usage.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    usage.set_defaults(handler=_usage)

    dicom_cli.add_commands(commands)
    for name in ("export-seg", "import-seg"):
        commands.choices[name].set_defaults(handler=_dicom)
    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    for log_handler in logging.getLogger().handlers:
        log_handler.addFilter(RedactSecrets())
    if args.command != "migrate":
        # Alembic narrates every connection; only `migrate` is about migrations.
        logging.getLogger("alembic").setLevel(logging.WARNING)
    handler = args.handler
    try:
        settings = Settings()
        logging.getLogger().setLevel(settings.log_level.upper())
        result: int = handler(settings, args)
    except (Exception, KeyboardInterrupt) as error:
        code, message = explain(error)
        # The details stay available to whoever asks for them, never by default.
        logging.getLogger(__name__).debug("%s failed", args.command, exc_info=error)
        print(f"pacs-masks: {message}", file=sys.stderr)
        return code
    return result


if __name__ == "__main__":
    sys.exit(main())
