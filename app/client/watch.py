"""`pacs-masks watch DIR`: a long-running worker that uploads each result folder an inference
server drops into DIR, once the folder's `manifest.json` exists (the producer writes it last,
so a folder with a manifest is complete).

What was uploaded is recorded in DIR/.pacs-masks-watch.json before and after each upload, so a
restart uploads nothing twice: a folder recorded as done is only moved, and one interrupted
mid-upload resumes its group (`missingSliceIndexes`) instead of starting another. Done folders
move to DIR/done/, refused ones to DIR/failed/ with the reason in pacs-masks-error.txt;
a folder that met a transport failure stays for the next round.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.client.api import PacsMasksClient
from app.client.errors import (
    BadInput,
    ForbiddenError,
    ServerRefused,
    StorageUnavailableError,
    TransportFailure,
    UnauthenticatedError,
)
from app.client.sources import load_manifest, open_input
from app.client.upload import UploadResult, request_from_metadata, upload

MANIFEST_NAME = "manifest.json"
STATE_NAME = ".pacs-masks-watch.json"
ERROR_NAME = "pacs-masks-error.txt"
DONE, FAILED, UPLOADING = "done", "failed", "uploading"


@dataclass
class FolderState:
    manifest_sha256: str
    status: str = UPLOADING
    # Group id per label value ("" for a folder or label map): what a restart resumes.
    groups: dict[str, str] = field(default_factory=dict)
    error: str | None = None


class WatchState:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.folders: dict[str, FolderState] = {}
        if path.exists():
            try:
                raw = json.loads(path.read_text(encoding="utf-8"))
                self.folders = {name: FolderState(**entry) for name, entry in raw.items()}
            except (OSError, ValueError, TypeError) as error:
                raise BadInput(f"watch state {path} is unreadable: {error}") from error

    def save(self) -> None:
        # Written beside and renamed: a crash leaves the old state or the new, never half.
        temporary = self.path.with_suffix(".tmp")
        data = {name: dataclasses.asdict(entry) for name, entry in self.folders.items()}
        with temporary.open("w", encoding="utf-8") as out:
            json.dump(data, out, indent=1, sort_keys=True)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temporary, self.path)


class _GroupRecorder:
    """Saves the group id the moment the server creates it, before any slice goes."""

    def __init__(self, on_group: Callable[[str], None]) -> None:
        self.on_group = on_group

    def started(self, group_id: str, total_slices: int) -> None:
        self.on_group(group_id)

    def advanced(self, slices: int, nbytes: int) -> None:
        pass


def _move(folder: Path, into: Path) -> Path:
    into.mkdir(exist_ok=True)
    target = into / folder.name
    suffix = 1
    while target.exists():
        target = into / f"{folder.name}.{suffix}"
        suffix += 1
    os.replace(folder, target)
    return target


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass
class Watcher:
    root: Path
    client: PacsMasksClient
    concurrency: int
    emit: Callable[[dict[str, Any]], None]
    state: WatchState = field(init=False)

    def __post_init__(self) -> None:
        self.state = WatchState(self.root / STATE_NAME)

    def ready_folders(self) -> list[Path]:
        return sorted(
            item
            for item in self.root.iterdir()
            if item.is_dir()
            and not item.name.startswith(".")
            and item.name not in (DONE, FAILED)
            and (item / MANIFEST_NAME).is_file()
        )

    async def round(self) -> None:
        for folder in self.ready_folders():
            await self.process(folder)

    async def process(self, folder: Path) -> None:
        digest = _sha256(folder / MANIFEST_NAME)
        entry = self.state.folders.get(folder.name)
        if entry is None or entry.manifest_sha256 != digest:
            # A new result, even under a name seen before.
            entry = FolderState(manifest_sha256=digest)
            self.state.folders[folder.name] = entry
        if entry.status in (DONE, FAILED):
            # Recorded before a crash kept the folder from moving: move it, upload nothing.
            _move(folder, self.root / entry.status)
            return
        try:
            results = await self._upload(folder, entry)
        except (TransportFailure, StorageUnavailableError) as error:
            self.emit({"folder": folder.name, "event": "retry", "error": error.message})
            return
        except (UnauthenticatedError, ForbiddenError):
            raise  # the worker's token, not this folder: stop
        except (BadInput, ServerRefused) as error:
            entry.status, entry.error = FAILED, error.message
            self.state.save()
            moved = _move(folder, self.root / FAILED)
            (moved / ERROR_NAME).write_text(error.message + "\n", encoding="utf-8")
            self.emit({"folder": folder.name, "event": FAILED, "error": error.message})
            return
        entry.status = DONE
        self.state.save()
        _move(folder, self.root / DONE)
        self.emit(
            {
                "folder": folder.name,
                "event": DONE,
                "groups": [result.as_json() for result in results],
            }
        )

    async def _upload(self, folder: Path, entry: FolderState) -> list[UploadResult]:
        manifest = load_manifest(folder / MANIFEST_NAME)
        meta = manifest.metadata
        source = (folder / str(meta.get("input", "."))).resolve()
        if not source.is_relative_to(folder.resolve()):
            raise BadInput(f"manifest input {meta.get('input')!r} is outside the folder")
        try:
            label_names = {
                int(key): str(value) for key, value in meta.get("labelNames", {}).items()
            }
        except (AttributeError, ValueError) as error:
            raise BadInput(
                'manifest labelNames must map label values to names: {"1": "liver"}'
            ) from error
        sets = open_input(
            source,
            split_labels=bool(meta.get("splitLabels")),
            label=meta.get("label"),
            label_names=label_names,
            slice_order=meta.get("sliceOrder", "inferior-first"),
            slice_count=meta.get("sliceCount"),
        )
        request = request_from_metadata(meta)
        if request.annotation_id is None and request.study_instance_uid is None:
            raise BadInput("manifest names no annotationId or studyInstanceUid")
        results = []
        for slice_set in sets:
            key = "" if slice_set.label_value is None else str(slice_set.label_value)

            def record(group_id: str, key: str = key) -> None:
                if entry.groups.get(key) != group_id:
                    entry.groups[key] = group_id
                    self.state.save()

            resume = entry.groups.get(key)
            results.append(
                await upload(
                    self.client,
                    dataclasses.replace(request, resume_group_id=resume),
                    slice_set,
                    manifest=manifest,
                    concurrency=self.concurrency,
                    progress=_GroupRecorder(record),
                )
            )
        return results


async def watch(
    root: Path,
    client: PacsMasksClient,
    *,
    interval: float,
    once: bool,
    concurrency: int,
    emit: Callable[[dict[str, Any]], None],
) -> None:
    if not root.is_dir():
        raise BadInput(f"{root} is not a folder")
    watcher = Watcher(root, client, concurrency, emit)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:
        # `docker stop` sends SIGTERM: stop between requests; the state file has the rest.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGTERM, task.cancel)
    while True:
        await watcher.round()
        if once:
            return
        await asyncio.sleep(interval)


def print_event(as_json: bool) -> Callable[[dict[str, Any]], None]:
    def emit(event: dict[str, Any]) -> None:
        if as_json:
            print(json.dumps(event), flush=True)
        elif event["event"] == DONE:
            groups = ", ".join(
                f"group {group['groupId']} {group['status']}" for group in event["groups"]
            )
            print(f"{event['folder']}: uploaded ({groups})", flush=True)
        else:
            print(
                f"{event['folder']}: {event['event']}: {event['error']}",
                file=sys.stderr,
                flush=True,
            )

    return emit
