from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import sys
from collections.abc import Sequence
from datetime import timedelta

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from app.audit import Actor
from app.auth import Principal, Role, create_token, revoke_token
from app.client.cli import add_client_commands
from app.config import Settings
from app.db import create_engine, create_sessionmaker, transaction, upgrade_database
from app.errors import NotFound
from app.models import ApiToken, utcnow

LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def _cli_actor() -> Actor:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # containers may run as a uid with no passwd entry
        user = "unknown"
    return Actor(principal=Principal(user=f"cli:{user}", role=Role.ADMIN))


def _database(settings: Settings) -> tuple[AsyncEngine, async_sessionmaker[AsyncSession]]:
    engine = create_engine(settings.resolved_database_url)
    return engine, create_sessionmaker(engine)


async def _first_start_token(settings: Settings) -> str | None:
    """An admin token on the embedded default's first start, as Jupyter prints one."""
    engine, sessionmaker = _database(settings)
    try:
        async with transaction(sessionmaker) as session:
            if await session.scalar(select(func.count()).select_from(ApiToken)):
                return None
            _, secret = await create_token(
                session, _cli_actor(), user="admin", role=Role.ADMIN, expires_in=None, now=utcnow()
            )
            return secret
    finally:
        await engine.dispose()


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    updates = {"host": args.host or settings.host, "port": args.port or settings.port}
    settings = settings.model_copy(update=updates)
    if settings.auth_disabled and settings.host not in LOOPBACK_HOSTS:
        print(
            f"pacs-masks: refusing to listen on {settings.host} with AUTH_DISABLED set; "
            "without authentication only a loopback address is allowed",
            file=sys.stderr,
        )
        return 2
    if settings.is_embedded_database:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(settings.resolved_database_url)
        token = None if settings.auth_disabled else asyncio.run(_first_start_token(settings))
        if token:
            print(
                "pacs-masks: first start, an ADMIN token was created for user 'admin'.\n"
                "pacs-masks: send it as 'Authorization: Bearer <token>'; it is shown only once:\n"
                f"    {token}",
                flush=True,
            )
    base = settings.resolved_public_base_url
    print(f"pacs-masks: GraphiQL at {base}/graphql", flush=True)
    if settings.is_embedded_database:
        print(
            f"pacs-masks: embedded default, database and storage under {settings.var_dir.resolve()}",
            flush=True,
        )
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        proxy_headers=True,
    )
    return 0


def _migrate(settings: Settings, args: argparse.Namespace) -> int:
    if settings.is_embedded_database:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
    upgrade_database(settings.resolved_database_url, args.revision)
    print(f"pacs-masks: database at revision {args.revision}")
    return 0


def _export_schema(settings: Settings, args: argparse.Namespace) -> int:
    from app.graphql.schema import schema

    sys.stdout.write(schema.as_str() + "\n")
    return 0


def _setup_storage(settings: Settings, args: argparse.Namespace) -> int:
    from app.storage import create_storage

    async def run() -> None:
        storage = await create_storage(settings)
        try:
            await storage.ensure_bucket(settings.cors_origins)
        finally:
            await storage.aclose()

    asyncio.run(run())
    print(f"pacs-masks: storage ready ({settings.storage_provider})")
    return 0


def _create_token(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> tuple[ApiToken, str]:
        engine, sessionmaker = _database(settings)
        try:
            async with transaction(sessionmaker) as session:
                return await create_token(
                    session,
                    _cli_actor(),
                    user=args.user,
                    role=Role[args.role.upper()],
                    expires_in=timedelta(days=args.expires_days) if args.expires_days else None,
                    now=utcnow(),
                )
        finally:
            await engine.dispose()

    token, secret = asyncio.run(run())
    expiry = token.expires_at.isoformat() if token.expires_at else "never"
    print(f"token {token.id} for {token.user} ({token.role.value}), expires {expiry}")
    # The secret is the last line so scripts can take it with `tail -n 1`.
    print(secret)
    return 0


def _revoke_token(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> None:
        engine, sessionmaker = _database(settings)
        try:
            async with transaction(sessionmaker) as session:
                await revoke_token(session, _cli_actor(), args.id, utcnow())
        finally:
            await engine.dispose()

    try:
        asyncio.run(run())
    except NotFound as error:
        print(f"pacs-masks: {error.message}", file=sys.stderr)
        return 1
    print(f"token {args.id} revoked")
    return 0


def _list_tokens(settings: Settings, args: argparse.Namespace) -> int:
    async def run() -> list[ApiToken]:
        engine, sessionmaker = _database(settings)
        try:
            async with sessionmaker() as session:
                return list(await session.scalars(select(ApiToken).order_by(ApiToken.id)))
        finally:
            await engine.dispose()

    now = utcnow()
    print(f"{'id':>5}  {'user':<24} {'role':<9} {'prefix':<11} {'state':<8} expires")
    for token in asyncio.run(run()):
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


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pacs-masks", description="Segmentation-mask upload service."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the API server (applies migrations on SQLite)")
    serve.add_argument("--host", help="address to listen on (HOST, default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (PORT, default 8000)")
    serve.set_defaults(handler=_serve)

    migrate = commands.add_parser("migrate", help="alembic upgrade on DATABASE_URL")
    migrate.add_argument("revision", nargs="?", default="head")
    migrate.set_defaults(handler=_migrate)

    export = commands.add_parser("export-schema", help="print the GraphQL schema (SDL)")
    export.set_defaults(handler=_export_schema)

    setup = commands.add_parser(
        "setup-storage", help="create the bucket, CORS for CORS_ORIGINS and lifecycle rules"
    )
    setup.set_defaults(handler=_setup_storage)

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

    add_client_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    handler = args.handler
    result: int = handler(Settings(), args)
    return result


if __name__ == "__main__":
    sys.exit(main())
