"""`pacs-masks watch`: folders are uploaded once their manifest appears, and never twice,
across restarts and crashes at any point of the recorded state."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Stack
from test_client import STUDY, client_for, write_pngs
from test_upload_cli import BIN, env_for, pacs_masks

from app.client import BadInput, UploadRequest, png_folder, upload
from app.client.sources import SliceSet, SliceSource

GROUPS = """query($study: String!) { annotations(studyInstanceUid: $study) {
  maskGroups { id status modelName uploadedSliceCount } } }"""


def manifest(folder: Path, **fields: Any) -> None:
    document = {"studyInstanceUid": STUDY, "modelName": "liver-seg", **fields}
    (folder / "manifest.json").write_text(json.dumps(document))


async def groups(stack: Stack) -> list[dict[str, Any]]:
    data = await stack.data(GROUPS, {"study": STUDY})
    return [group for annotation in data["annotations"] for group in annotation["maskGroups"]]


async def watch_once(stack: Stack, root: Path) -> list[dict[str, Any]]:
    run = await pacs_masks("watch", str(root), "--once", "--json", env=env_for(stack))
    assert run.code == 0, run.stderr
    return [json.loads(line) for line in run.stdout.splitlines()]


async def test_watch_uploads_ready_folders_once(stack: Stack, tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_pngs(root / "a", 3)
    manifest(root / "a", slices=[{"sliceIndex": 0, "confidence": 0.5}])
    write_pngs(root / "b", 2)  # no manifest yet: still being written
    np.save(root / "c.npy", np.zeros((2, 4, 4), dtype=np.uint8))
    (root / "c").mkdir()
    shutil.move(root / "c.npy", root / "c" / "seg.npy")
    manifest(root / "c", input="seg.npy")
    (root / "d").mkdir()
    manifest(root / "d", input="../a")

    events = await watch_once(stack, root)
    assert [(event["folder"], event["event"]) for event in events] == [
        ("a", "done"),
        ("c", "done"),
        ("d", "failed"),
    ]
    assert sorted(path.name for path in (root / "done").iterdir()) == ["a", "c"]
    assert (root / "b").is_dir()
    assert "outside the folder" in (root / "failed" / "d" / "pacs-masks-error.txt").read_text()
    assert [group["status"] for group in await groups(stack)] == ["COMPLETE", "COMPLETE"]

    # A restart that finds a folder recorded as done (the move was lost) moves it, no upload.
    shutil.copytree(root / "done" / "a", root / "a")
    manifest(root / "b")
    events = await watch_once(stack, root)
    assert [(event["folder"], event["event"]) for event in events] == [("b", "done")]
    assert not (root / "a").exists()
    assert len(await groups(stack)) == 3


async def test_watch_resumes_a_group_interrupted_mid_upload(stack: Stack, tmp_path: Path) -> None:
    root = tmp_path / "results"
    write_pngs(root / "a", 6)
    manifest(root / "a")
    full = png_folder(root / "a")

    def crashing() -> Iterator[SliceSource]:
        for source in full.slices():
            if source.slice_index == 4:
                raise BadInput("worker killed")
            yield source

    started: list[str] = []

    class Record:
        def started(self, group_id: str, total_slices: int) -> None:
            started.append(group_id)

        def advanced(self, slices: int, nbytes: int) -> None:
            pass

    async with client_for(stack) as client:
        with pytest.raises(BadInput):
            await upload(
                client,
                UploadRequest(study_instance_uid=STUDY),
                SliceSet(6, crashing),
                batch_size=2,
                progress=Record(),
            )
    # What a watcher killed at that moment has on disk: the group recorded, not yet done.
    digest = hashlib.sha256((root / "a" / "manifest.json").read_bytes()).hexdigest()
    (root / ".pacs-masks-watch.json").write_text(
        json.dumps(
            {
                "a": {
                    "manifest_sha256": digest,
                    "status": "uploading",
                    "groups": {"": started[0]},
                    "error": None,
                }
            }
        )
    )
    events = await watch_once(stack, root)
    (event,) = events
    (summary,) = event["groups"]
    assert summary["groupId"] == started[0]
    assert summary["status"] == "COMPLETE"
    assert summary["skippedSlices"] + summary["uploadedSlices"] == 6
    assert len(await groups(stack)) == 1


async def test_long_running_watch_stops_on_sigterm(stack: Stack, tmp_path: Path) -> None:
    root = tmp_path / "results"
    root.mkdir()
    base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    process = await asyncio.create_subprocess_exec(
        str(BIN),
        "watch",
        str(root),
        "--interval",
        "0.2",
        env={**base, **env_for(stack)},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        write_pngs(root / "late", 2)
        manifest(root / "late")
        for _ in range(300):
            if (root / "done" / "late").exists():
                break
            await asyncio.sleep(0.1)
        assert (root / "done" / "late").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().startswith("late: uploaded (group ")
