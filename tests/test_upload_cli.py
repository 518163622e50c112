"""`pacs-masks upload` as a user runs it: a separate process against a running server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from conftest import Stack, base_settings, open_stack
from fault_proxy import FaultPlan, fault_proxy
from test_client import STUDY, nifti_with_two_labels, write_pngs

BIN = Path(sys.executable).parent / "pacs-masks"


@dataclass
class Run:
    code: int
    stdout: str
    stderr: str

    def json(self) -> dict[str, object]:
        document: dict[str, object] = json.loads(self.stdout)
        return document


async def pacs_masks(*args: str, env: dict[str, str] | None = None) -> Run:
    base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    process = await asyncio.create_subprocess_exec(
        str(BIN),
        *args,
        env={**base, **(env or {})},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode is not None
    return Run(process.returncode, stdout.decode(), stderr.decode())


def env_for(stack: Stack, role: str = "uploader") -> dict[str, str]:
    return {"PACS_MASKS_URL": stack.base_url, "PACS_MASKS_TOKEN": stack.tokens[role]}


async def group_of(stack: Stack, group_id: str) -> dict[str, object]:
    data = await stack.data(
        """query($id: ID!) { maskGroup(id: $id) {
            status sliceCount modelName version modality confidence inferenceParameters
            masks { sliceIndex labelName } } }""",
        {"id": group_id},
    )
    group: dict[str, object] = data["maskGroup"]
    return group


async def test_folder_with_metadata_and_json(stack: Stack, tmp_path: Path) -> None:
    write_pngs(tmp_path / "out", 5)
    run = await pacs_masks(
        "upload",
        str(tmp_path / "out"),
        "--study-uid",
        STUDY,
        "--model",
        "liver-seg",
        "--model-version",
        "2.1.0",
        "--modality",
        "CT",
        "--confidence",
        "0.93",
        "--param",
        "threshold=0.5",
        "--param",
        "checkpoint=epoch-40",
        "--label",
        "liver",
        "--json",
        env=env_for(stack),
    )
    assert run.code == 0, run.stderr
    assert run.stderr == ""
    (summary,) = run.json()["groups"]  # type: ignore[misc]
    assert summary["status"] == "COMPLETE"
    assert summary["uploadedSlices"] == 5
    group = await group_of(stack, summary["groupId"])
    assert group["modelName"] == "liver-seg"
    assert (group["version"], group["modality"], group["confidence"]) == ("2.1.0", "CT", 0.93)
    assert group["inferenceParameters"] == {"threshold": 0.5, "checkpoint": "epoch-40"}


async def test_nifti_split_and_npy(stack: Stack, tmp_path: Path) -> None:
    nifti = tmp_path / "seg.nii.gz"
    nifti_with_two_labels(nifti)
    run = await pacs_masks(
        "upload",
        str(nifti),
        "--study-uid",
        STUDY,
        "--split-labels",
        "--label-names",
        "1=liver,2=tumor",
        "--json",
        env=env_for(stack),
    )
    assert run.code == 0, run.stderr
    groups = run.json()["groups"]
    assert [group["status"] for group in groups] == ["COMPLETE", "COMPLETE"]  # type: ignore[attr-defined]
    tumor = await group_of(stack, groups[1]["groupId"])  # type: ignore[index]
    assert {mask["labelName"] for mask in tumor["masks"]} == {"tumor"}  # type: ignore[attr-defined]

    labelmap = await pacs_masks("upload", str(nifti), "--study-uid", STUDY, env=env_for(stack))
    assert labelmap.code == 0, labelmap.stderr
    assert "COMPLETE, 4 slice(s) uploaded" in labelmap.stdout

    npy = tmp_path / "seg.npy"
    np.save(npy, np.ones((3, 4, 4), dtype=np.uint8))
    run = await pacs_masks("upload", str(npy), "--study-uid", STUDY, "--json", env=env_for(stack))
    assert run.code == 0, run.stderr
    assert run.json()["groups"][0]["sliceCount"] == 3  # type: ignore[index]


async def test_interrupted_run_says_how_to_resume(stack: Stack, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    write_pngs(folder, 10)
    broken = folder / "case_0007.png"
    good = broken.read_bytes()
    broken.write_bytes(b"not a png at all")
    run = await pacs_masks(
        "upload", str(folder), "--study-uid", STUDY, "--batch-size", "3", env=env_for(stack)
    )
    assert run.code == 2
    lines = run.stderr.strip().splitlines()
    assert lines[0] == f"pacs-masks: {broken} is not a readable PNG image"
    assert "Traceback" not in run.stderr
    resume = lines[1].removeprefix("pacs-masks: resume with: ")
    assert " --resume " in resume
    broken.write_bytes(good)
    args = resume.split()[1:]
    again = await pacs_masks(*args, "--json", env=env_for(stack))
    assert again.code == 0, again.stderr
    (summary,) = again.json()["groups"]  # type: ignore[misc]
    assert summary["status"] == "COMPLETE"
    assert summary["uploadedSlices"] + summary["skippedSlices"] == 10


async def test_exit_codes(stack: Stack, tmp_path: Path) -> None:
    write_pngs(tmp_path / "out", 2)
    folder = str(tmp_path / "out")
    no_server = await pacs_masks("upload", folder, "--study-uid", STUDY)
    assert (no_server.code, no_server.stderr) == (
        2,
        "pacs-masks: no server: give --server URL or set PACS_MASKS_URL\n",
    )
    no_annotation = await pacs_masks("upload", folder, env=env_for(stack))
    assert no_annotation.code == 2
    assert "--annotation ID or --study-uid UID" in no_annotation.stderr

    refused = await pacs_masks("upload", folder, "--annotation", "999999", env=env_for(stack))
    assert (refused.code, refused.stderr) == (3, "pacs-masks: annotation 999999 does not exist\n")
    reader = await pacs_masks(
        "upload", folder, "--study-uid", STUDY, "--json", env=env_for(stack, "reader")
    )
    assert reader.code == 3
    assert reader.json()["error"]["code"] == "FORBIDDEN"  # type: ignore[index]
    bad_uid = await pacs_masks("upload", folder, "--study-uid", "1.02.x", env=env_for(stack))
    assert bad_uid.code == 3
    assert "studyInstanceUid" in bad_uid.stderr

    unreachable = await pacs_masks(
        "upload",
        folder,
        "--study-uid",
        STUDY,
        "--server",
        "http://127.0.0.1:9",
        env={"PACS_MASKS_TOKEN": "x"},
    )
    assert unreachable.code == 4
    assert unreachable.stderr.startswith("pacs-masks: cannot reach http://127.0.0.1:9")
    assert len(unreachable.stderr.splitlines()) == 1


async def test_ctrl_c_says_how_to_resume(own_sqlite_url: str, tmp_path: Path) -> None:
    write_pngs(tmp_path / "out", 24)
    plan = FaultPlan(put_latency=0.25)
    settings = base_settings(
        database_url=own_sqlite_url, var_dir=tmp_path / "var", storage_provider="local"
    )
    async with (
        fault_proxy(plan) as proxy_url,
        open_stack("slow-local", settings, public_base_url=proxy_url) as stack,
    ):
        plan.upstream = stack.base_url
        base = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
        process = await asyncio.create_subprocess_exec(
            str(BIN),
            "upload",
            str(tmp_path / "out"),
            "--study-uid",
            STUDY,
            "--concurrency",
            "2",
            "--batch-size",
            "4",
            env={**base, **env_for(stack)},
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        while plan.puts < 6:
            await asyncio.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = await process.communicate()
        assert process.returncode == 130, stderr.decode()
        lines = stderr.decode().splitlines()
        assert lines[0] == "pacs-masks: interrupted"
        assert "Traceback" not in stderr.decode()
        resume = lines[1].removeprefix("pacs-masks: resume with: ").split()
        plan.put_latency = 0
        again = await pacs_masks(*resume[1:], "--json", env=env_for(stack))
    assert again.code == 0, again.stderr
    (summary,) = again.json()["groups"]  # type: ignore[misc]
    assert summary["status"] == "COMPLETE"
    assert summary["skippedSlices"] > 0
