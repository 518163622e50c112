"""`pacs-masks upload` and `pacs-masks validate`: the client library on the command line.

Exit codes: 0 done, 1 validation found problems, 2 bad input (files, manifest, options),
3 the server or storage refused, 4 transport failure (unreachable, 5xx through every retry),
130 interrupted. Failures print one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shlex
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, Self

from rich.console import Console
from rich.filesize import decimal
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from app.client.api import PacsMasksClient
from app.client.errors import BadInput, ClientError, ServerRefused
from app.client.sources import Manifest, SliceSet, load_manifest, open_input
from app.client.upload import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_CONCURRENCY,
    UploadRequest,
    UploadResult,
    request_from_metadata,
    upload,
)
from app.client.watch import __doc__ as watch_doc
from app.client.watch import print_event, watch

EXIT_INVALID = 1
EXIT_INTERRUPTED = 130


class RichProgress:
    """Slices, bytes, rate and ETA on a terminal (stderr)."""

    def __init__(self, console: Console) -> None:
        self._progress = Progress(
            TextColumn("group {task.fields[group]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("slices"),
            TextColumn("{task.fields[size]}"),
            TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self._task: TaskID | None = None
        self._bytes = 0

    def __enter__(self) -> Self:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def started(self, group_id: str, total_slices: int) -> None:
        self._bytes = 0
        self._task = self._progress.add_task(
            "upload", total=total_slices, group=group_id, size="0 B", rate=""
        )

    def advanced(self, slices: int, nbytes: int) -> None:
        if self._task is None:
            return
        self._bytes += nbytes
        elapsed = self._progress.tasks[self._task].elapsed or 0.0
        rate = f"{decimal(int(self._bytes / elapsed))}/s" if elapsed > 0 else ""
        self._progress.update(self._task, advance=slices, size=decimal(self._bytes), rate=rate)


class Tracker:
    """Remembers which group is being uploaded, for the resume hint; forwards to a bar."""

    def __init__(self, bar: RichProgress | None) -> None:
        self.bar = bar
        self.group_id: str | None = None
        self.label_value: int | None = None

    def started(self, group_id: str, total_slices: int) -> None:
        self.group_id = group_id
        if self.bar is not None:
            self.bar.started(group_id, total_slices)

    def advanced(self, slices: int, nbytes: int) -> None:
        if self.bar is not None:
            self.bar.advanced(slices, nbytes)


def _fail(message: str) -> None:
    print(f"pacs-masks: {message}", file=sys.stderr)


def _connection(args: argparse.Namespace) -> tuple[str, str | None]:
    server = args.server or os.environ.get("PACS_MASKS_URL")
    if not server:
        raise BadInput("no server: give --server URL or set PACS_MASKS_URL")
    if not server.startswith(("http://", "https://")):
        raise BadInput(f"--server {server!r} must be an http(s) URL")
    return server, args.token or os.environ.get("PACS_MASKS_TOKEN")


def _key_values(items: list[str], flag: str) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for item in items:
        key, separator, raw = item.partition("=")
        if not separator or not key:
            raise BadInput(f"{flag} {item!r} must look like key=value")
        try:
            values[key] = json.loads(raw)
        except ValueError:
            values[key] = raw
    return values


def _label_names(text: str | None) -> dict[int, str] | None:
    if not text:
        return None
    names: dict[int, str] = {}
    for key, value in _key_values(text.split(","), "--label-names").items():
        if not key.isdigit():
            raise BadInput(f"--label-names: {key!r} is not a label value")
        names[int(key)] = str(value)
    return names


def _slice_sets(args: argparse.Namespace) -> list[SliceSet]:
    return open_input(
        args.input,
        split_labels=args.split_labels,
        label=args.label,
        label_names=_label_names(args.label_names),
        slice_order=args.slice_order,
        array_name=args.array,
        slice_count=args.slice_count,
    )


def _request(args: argparse.Namespace, manifest: Manifest) -> UploadRequest:
    request = request_from_metadata(
        manifest.metadata,
        annotation_id=args.annotation,
        study_instance_uid=args.study_uid,
        series_instance_uid=args.series_uid,
        group_name=args.group_name,
        model_name=args.model,
        version=args.model_version,
        modality=args.modality,
        description=args.description,
        confidence=args.confidence,
        inference_parameters=_key_values(args.param, "--param"),
        resume_group_id=args.resume,
    )
    if args.resume is None and request.annotation_id is None and request.study_instance_uid is None:
        raise BadInput("name the annotation: --annotation ID or --study-uid UID")
    return request


def resume_command(args: argparse.Namespace, group_id: str, label_value: int | None) -> str:
    words = ["pacs-masks", "upload", str(args.input), "--resume", group_id]
    for flag, value in (
        ("--label", args.label),
        ("--label-names", args.label_names),
        ("--array", args.array),
        ("--manifest", args.manifest),
        ("--slice-count", args.slice_count),
    ):
        if value is not None:
            words += [flag, str(value)]
    if args.slice_order != "inferior-first":
        words += ["--slice-order", args.slice_order]
    if args.split_labels:
        words += ["--split-labels", "--label-value", str(label_value)]
    return shlex.join(words)


async def _upload_all(
    args: argparse.Namespace, tracker: Tracker, results: list[UploadResult]
) -> None:
    manifest = load_manifest(args.manifest) if args.manifest else Manifest()
    request = _request(args, manifest)
    sets = _slice_sets(args)
    if args.label_value is not None:
        sets = [item for item in sets if item.label_value == args.label_value]
        if not sets:
            raise BadInput(f"--label-value {args.label_value} does not occur in {args.input}")
    if args.resume is not None and len(sets) > 1:
        raise BadInput("--resume of a split volume needs --label-value: which label's group")
    server, token = _connection(args)
    async with PacsMasksClient(server, token, concurrency=args.concurrency) as client:
        for slice_set in sets:
            tracker.label_value = slice_set.label_value
            results.append(
                await upload(
                    client,
                    request,
                    slice_set,
                    manifest=manifest,
                    concurrency=args.concurrency,
                    batch_size=args.batch_size,
                    ttl_seconds=args.ttl,
                    progress=tracker,
                )
            )
            tracker.group_id = None


def _error_json(error: ClientError, group_id: str | None) -> dict[str, Any]:
    return {
        "error": {
            "kind": type(error).__name__,
            "code": error.code if isinstance(error, ServerRefused) else None,
            "message": error.message,
        },
        "groupId": group_id,
    }


def quiet_http_logs() -> None:
    # `pacs-masks` logs at INFO; httpx would log every PUT there.
    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_upload(args: argparse.Namespace) -> int:
    quiet_http_logs()
    console = Console(stderr=True)
    bar = RichProgress(console) if console.is_terminal and not args.json else None
    tracker = Tracker(bar)
    results: list[UploadResult] = []
    code = 0
    try:
        if bar is not None:
            with bar:
                asyncio.run(_upload_all(args, tracker, results))
        else:
            asyncio.run(_upload_all(args, tracker, results))
    except ClientError as error:
        _fail(error.message)
        if tracker.group_id is not None:
            _fail(f"resume with: {resume_command(args, tracker.group_id, tracker.label_value)}")
        if args.json:
            print(json.dumps(_error_json(error, tracker.group_id)))
        return error.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        if tracker.group_id is not None:
            _fail(f"resume with: {resume_command(args, tracker.group_id, tracker.label_value)}")
        code = EXIT_INTERRUPTED
    if args.json:
        print(json.dumps({"groups": [result.as_json() for result in results]}))
    else:
        for result in results:
            missing = (
                f", missing slices {result.missing_slice_indexes}"
                if result.missing_slice_indexes
                else ""
            )
            print(
                f"group {result.group_id} (annotation {result.annotation_id}): {result.status}, "
                f"{result.uploaded_slices} slice(s) uploaded ({decimal(result.uploaded_bytes)}) "
                f"in {result.seconds:.1f} s, {result.skipped_slices} already there{missing}"
            )
    return code


def _run(coroutine: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        return asyncio.run(coroutine())
    except ClientError as error:
        _fail(error.message)
        return error.exit_code
    except KeyboardInterrupt:
        _fail("interrupted")
        return EXIT_INTERRUPTED


def _handle_upload(settings: object, args: argparse.Namespace) -> int:
    return run_upload(args)


def _handle_validate(settings: object, args: argparse.Namespace) -> int:
    quiet_http_logs()

    async def run() -> int:
        server, token = _connection(args)
        async with PacsMasksClient(server, token) as client:
            report = await client.validate_mask_group(args.group_id)
        if args.json:
            print(json.dumps({"groupId": args.group_id, **report}))
        else:
            print(f"group {args.group_id}: {report['status']}, {report['problemCount']} problem(s)")
            for problem in report["problems"]:
                where = (
                    "group" if problem["sliceIndex"] is None else f"slice {problem['sliceIndex']}"
                )
                print(f"  {where}: {problem['code']}: {problem['message']}")
        return 0 if report["status"] == "VALID" else EXIT_INVALID

    return _run(run)


def _handle_watch(settings: object, args: argparse.Namespace) -> int:
    quiet_http_logs()

    async def run() -> int:
        server, token = _connection(args)
        async with PacsMasksClient(server, token, concurrency=args.concurrency) as client:
            try:
                await watch(
                    args.dir,
                    client,
                    interval=args.interval,
                    once=args.once,
                    concurrency=args.concurrency,
                    emit=print_event(args.json),
                )
            except asyncio.CancelledError:
                _fail("stopped; the state file records where to go on")
        return 0

    return _run(run)


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return number


def _connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", help="API base URL (PACS_MASKS_URL)")
    parser.add_argument(
        "--token", help="API token (PACS_MASKS_TOKEN; prefer the variable: flags reach history)"
    )
    parser.add_argument("--json", action="store_true", help="print a machine-readable summary")


def add_client_commands(commands: Any) -> None:
    """Registers the client's subcommands on the `pacs-masks` parser."""
    up = commands.add_parser(
        "upload",
        help="upload inference results (PNG folder, NIfTI or NumPy volume) as mask groups",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    up.add_argument("input", type=Path, help="folder of PNGs, .nii/.nii.gz, or .npy/.npz")
    _connection_flags(up)
    target = up.add_argument_group("annotation (one of)")
    target.add_argument("--annotation", help="existing annotation id")
    target.add_argument("--study-uid", help="Study Instance UID: finds or creates the annotation")
    target.add_argument("--series-uid", help="Series Instance UID, with --study-uid")
    meta = up.add_argument_group("model metadata")
    meta.add_argument("--model", help="model name")
    meta.add_argument("--model-version", help="model version")
    meta.add_argument("--modality", help="CT, MR, ...")
    meta.add_argument("--description")
    meta.add_argument("--group-name")
    meta.add_argument("--confidence", type=float, help="overall confidence, 0..1")
    meta.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="inference parameter (repeatable; JSON values are parsed)",
    )
    meta.add_argument(
        "--manifest", type=Path, help="CSV or JSON with per-slice sopInstanceUid and confidence"
    )
    shape = up.add_argument_group("input")
    shape.add_argument("--label", help="label name of every mask (a folder, or a label map)")
    shape.add_argument(
        "--split-labels",
        action="store_true",
        help="volumes: one group of binary masks per label value (default: one label-map PNG "
        "per slice)",
    )
    shape.add_argument("--label-names", help="with --split-labels: 1=liver,2=tumor")
    shape.add_argument("--label-value", type=int, help="with --split-labels: only this label")
    shape.add_argument(
        "--slice-order",
        choices=["inferior-first", "superior-first"],
        default="inferior-first",
        help="NIfTI: which end of the volume is slice 0 (default: the feet end)",
    )
    shape.add_argument("--array", help=".npz: the array to read")
    shape.add_argument("--slice-count", type=_positive, help="folder: the group's slice count")
    transfer = up.add_argument_group("transfer")
    transfer.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY)
    transfer.add_argument(
        "--batch-size",
        type=_positive,
        default=DEFAULT_BATCH_SIZE,
        help="slices per URL request and completion call",
    )
    transfer.add_argument("--ttl", type=_positive, help="URL lifetime in seconds (server default)")
    transfer.add_argument("--resume", metavar="GROUP_ID", help="upload only what the group lacks")
    up.set_defaults(handler=_handle_upload)

    check = commands.add_parser(
        "validate",
        help="check a mask group's slices in storage (exit 0 only when VALID, 1 when INVALID)",
    )
    check.add_argument("group_id", metavar="GROUP_ID")
    _connection_flags(check)
    check.set_defaults(handler=_handle_validate)

    watcher = commands.add_parser(
        "watch",
        help="upload each result folder dropped into DIR once its manifest.json appears",
        description=watch_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    watcher.add_argument("dir", type=Path, metavar="DIR")
    _connection_flags(watcher)
    watcher.add_argument("--interval", type=float, default=5.0, help="seconds between looks")
    watcher.add_argument("--once", action="store_true", help="one round, then exit")
    watcher.add_argument("--concurrency", type=_positive, default=DEFAULT_CONCURRENCY)
    watcher.set_defaults(handler=_handle_watch)
