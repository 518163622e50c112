"""`serve`'s server processes: one, or `--workers N` sharing one listening socket.

With several, uvicorn's supervisor (the parent process) binds the socket, spawns the workers,
replaces one that dies, and stops them all on SIGINT/SIGTERM. Whatever must happen once per
start (migrations, the first token, storage and address checks) has run in the parent before
this module is called; each worker builds only its own resources (its lifespan): database
pool, LISTEN connection, storage client, job loops. The replica-safe parts (job leases,
PostgreSQL LISTEN/NOTIFY) treat the workers as replicas.

Metrics: prometheus-client keeps samples per process, so the workers share a folder
(PROMETHEUS_MULTIPROC_DIR) where /metrics, whichever worker answers it, adds them up.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from socket import socket
from typing import Any

import uvicorn
from prometheus_client import multiprocess
from starlette.applications import Starlette
from uvicorn.config import STARTUP_FAILURE
from uvicorn.supervisors import Multiprocess

from app.cli_failures import CommandFailed, ExitCode
from app.config import Settings
from app.logging_setup import configure_logging
from app.main import create_app, uvicorn_options

logger = logging.getLogger(__name__)

MULTIPROC_DIR_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# The supervisor kills a worker that does not answer its ping within this many seconds and
# starts another. A starting worker answers only once it has imported the whole app, which
# takes seconds on a busy host (uvicorn's default of 5 s would kill it, again and again).
HEALTHCHECK_SECONDS = 60


def _options(settings: Settings) -> dict[str, Any]:
    return {
        "host": settings.host,
        "port": settings.port,
        "log_level": settings.log_level,
        # Our handlers (JSON or text); uvicorn's access log would write signed query strings.
        "log_config": None,
        "access_log": False,
        **uvicorn_options(settings),
    }


def run_server(settings: Settings) -> None:
    """Runs the server until SIGINT/SIGTERM, in settings.workers processes."""
    if settings.workers == 1:
        uvicorn.run(create_app(settings), **_options(settings))
        return
    with _metrics_folder():
        config = _WorkerConfig(
            settings,
            workers=settings.workers,
            timeout_worker_healthcheck=HEALTHCHECK_SECONDS,
            **_options(settings),
        )
        supervisor = _Supervisor(config, sockets=[config.bind_socket()])
        supervisor.run()
    if supervisor.failed_to_start:
        raise CommandFailed(
            ExitCode.FAILED,
            "a worker failed to start (its log lines above say why), so the server stopped",
        )


class _WorkerConfig(uvicorn.Config):
    """uvicorn's configuration, which it pickles to every worker it spawns, carrying the
    settings `serve` checked: each worker builds its app from those, not from the environment
    read again (a changed .env must not reach a worker replaced later)."""

    def __init__(self, settings: Settings, **options: Any) -> None:
        # The app is built by load_app below; the string only names it in uvicorn's messages.
        super().__init__("app.main:create_app", factory=True, **options)
        self.settings = settings

    def load_app(self) -> Callable[[], Starlette]:
        # Runs in the worker: logging is per process, and spawned workers start without any.
        configure_logging(self.settings)
        return functools.partial(create_app, self.settings)


class _Supervisor(Multiprocess):
    """uvicorn's supervisor, telling prometheus-client about every worker that is gone
    (died and replaced, or stopped), so its per-process gauge series go with it."""

    def __init__(self, config: uvicorn.Config, sockets: list[socket]) -> None:
        super().__init__(config, sockets)
        self._known: set[int] = set()
        self.failed_to_start = False

    def run(self) -> None:
        try:
            super().run()
        finally:
            # uvicorn stops every worker when one fails before serving, and keeps that one.
            self.failed_to_start = any(p.exitcode == STARTUP_FAILURE for p in self.processes)
            self.processes.clear()
            self._forget_exited()

    def handle_signals(self) -> None:
        super().handle_signals()
        self._forget_exited()

    def keep_subprocess_alive(self) -> None:
        super().keep_subprocess_alive()
        self._forget_exited()

    def _forget_exited(self) -> None:
        running = {process.pid for process in self.processes if process.pid is not None}
        for pid in self._known - running:
            multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]
        self._known = running


@contextlib.contextmanager
def _metrics_folder() -> Iterator[Path]:
    """PROMETHEUS_MULTIPROC_DIR for the workers (they inherit the environment): the operator's
    folder, emptied (samples of an earlier run would be added to this one's), or a folder of
    this run's own, removed when it ends."""
    chosen = os.environ.get(MULTIPROC_DIR_VARIABLE)
    if chosen:
        folder = Path(chosen)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for stale in folder.glob("*.db"):
                stale.unlink()
        except OSError as error:
            raise CommandFailed(
                ExitCode.CONFIGURATION,
                f"cannot use {MULTIPROC_DIR_VARIABLE} {folder} ({error.strerror}); "
                "set it to a writable folder, or unset it for a folder of this run's own",
            ) from error
        yield folder
        return
    folder = Path(tempfile.mkdtemp(prefix="pacs-masks-metrics-"))
    os.environ[MULTIPROC_DIR_VARIABLE] = str(folder)
    try:
        yield folder
    finally:
        del os.environ[MULTIPROC_DIR_VARIABLE]
        shutil.rmtree(folder, ignore_errors=True)
