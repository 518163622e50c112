from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from app.config import Settings
from app.db import upgrade_database


def _serve(settings: Settings, args: argparse.Namespace) -> int:
    import uvicorn

    from app.main import create_app

    updates = {"host": args.host or settings.host, "port": args.port or settings.port}
    settings = settings.model_copy(update=updates)
    if settings.is_embedded_database:
        settings.var_dir.mkdir(parents=True, exist_ok=True)
        upgrade_database(settings.resolved_database_url)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    handler = args.handler
    result: int = handler(Settings(), args)
    return result


if __name__ == "__main__":
    sys.exit(main())
