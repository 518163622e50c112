"""The client library against running servers: the embedded default and PostgreSQL + moto S3,
and through a proxy that fails PUTs and signing requests and lets URLs expire on the way."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import Stack, base_settings, open_stack, reset
from fault_proxy import FaultPlan, fault_proxy
from PIL import Image

from app.client import (
    BadInput,
    PacsMasksClient,
    UploadRequest,
    load_manifest,
    nifti_volume,
    npy_volume,
    png_folder,
    upload,
)
from app.client.api import RetryPolicy
from app.client.sources import SliceSet, SliceSource

STUDY = "1.2.826.0.1.3680043.8.498.1"
SERIES = f"{STUDY}.2"
FAST_RETRY = RetryPolicy(attempts=6, base_delay=0.01, max_delay=0.05)


def write_pngs(
    folder: Path, count: int, *, size: tuple[int, int] = (8, 6), name: str = "case_{:04d}.png"
) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for index in range(count):
        array = np.zeros((size[1], size[0]), dtype=np.uint8)
        array[index % size[1], :] = 255
        Image.fromarray(array).save(folder / name.format(index))


def client_for(stack: Stack, **options: object) -> PacsMasksClient:
    return PacsMasksClient(stack.base_url, stack.tokens["uploader"], retry=FAST_RETRY, **options)  # type: ignore[arg-type]


async def masks_of(stack: Stack, group_id: str) -> list[dict[str, object]]:
    data = await stack.data(
        """query($id: ID!) { maskGroup(id: $id) { masks {
            sliceIndex labelName width height fileSize sopInstanceUid confidence viewUrl } } }""",
        {"id": group_id},
    )
    masks: list[dict[str, object]] = data["maskGroup"]["masks"]
    return masks


async def test_png_folder_with_manifest(stack: Stack, tmp_path: Path) -> None:
    write_pngs(tmp_path / "out", 7)
    manifest_path = tmp_path / "manifest.csv"
    rows = "\n".join(f"{index},{SERIES}.{index + 1},0.{index}" for index in range(7))
    manifest_path.write_text(f"sliceIndex,sopInstanceUid,confidence\n{rows}\n")
    request = UploadRequest(
        study_instance_uid=STUDY, series_instance_uid=SERIES, model_name="liver-seg"
    )
    async with client_for(stack) as client:
        result = await upload(
            client,
            request,
            png_folder(tmp_path / "out", label="liver"),
            manifest=load_manifest(manifest_path),
            batch_size=3,
            concurrency=4,
        )
        again = await upload(client, request, png_folder(tmp_path / "out", label="liver"))
    assert result.status == "COMPLETE"
    assert (result.uploaded_slices, result.slice_count, result.missing_slice_indexes) == (7, 7, [])
    # The second run found the annotation of the same study and series.
    assert again.annotation_id == result.annotation_id
    assert again.group_id != result.group_id
    masks = await masks_of(stack, result.group_id)
    assert [mask["sliceIndex"] for mask in masks] == list(range(7))
    assert {(mask["labelName"], mask["width"], mask["height"]) for mask in masks} == {
        ("liver", 8, 6)
    }
    assert masks[3]["sopInstanceUid"] == f"{SERIES}.4"
    assert [mask["confidence"] for mask in masks] == [index / 10 for index in range(7)]
    response = await stack.client.get(str(masks[2]["viewUrl"]))
    assert Image.open(io.BytesIO(response.content)).getpixel((0, 2)) == 255


def nifti_with_two_labels(path: Path) -> np.ndarray:
    # Shape (x, y, z) = (6, 5, 4) stored LPS-like (x and y flipped): the reader must reorient.
    data = np.zeros((6, 5, 4), dtype=np.uint8)
    data[1:3, 1:4, 0] = 1
    data[4, 0, 2] = 2
    data[0, 4, 3] = 1
    affine = np.diag([-1.0, -1.0, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return data


def test_nifti_orientation_matches_closest_canonical(tmp_path: Path) -> None:
    path = tmp_path / "seg.nii.gz"
    nifti_with_two_labels(path)
    canonical = np.asarray(nib.as_closest_canonical(nib.load(str(path))).dataobj)
    (labelmap,) = nifti_volume(path)
    for index, source in enumerate(labelmap.slices()):
        image = np.asarray(Image.open(io.BytesIO(source.load().body)))
        # Radiological view: rows anterior -> posterior, columns patient right -> left.
        assert np.array_equal(image, canonical[::-1, ::-1, index].T)
    (reversed_first, *_) = list(nifti_volume(path, slice_order="superior-first")[0].slices())
    assert reversed_first.load().body == list(labelmap.slices())[-1].load().body


async def test_nifti_split_by_label_and_npy(stack: Stack, tmp_path: Path) -> None:
    path = tmp_path / "seg.nii"
    nifti_with_two_labels(path)
    sets = nifti_volume(path, mode="split", label_names={1: "liver"})
    assert [(item.name, item.label_value) for item in sets] == [("liver", 1), ("label2", 2)]
    npy = tmp_path / "seg.npy"
    np.save(npy, np.arange(3 * 4 * 5, dtype=np.uint8).reshape(3, 4, 5) % 3)
    async with client_for(stack) as client:
        results = [
            await upload(client, UploadRequest(study_instance_uid=STUDY), slice_set)
            for slice_set in [*sets, *npy_volume(npy, label="organs")]
        ]
    assert [result.status for result in results] == ["COMPLETE"] * 3
    assert [result.slice_count for result in results] == [4, 4, 3]
    liver = await masks_of(stack, results[0].group_id)
    assert {mask["labelName"] for mask in liver} == {"liver"}
    response = await stack.client.get(str(liver[0]["viewUrl"]))
    assert Image.open(io.BytesIO(response.content)).mode == "1"


async def test_interrupted_upload_resumes(stack: Stack, tmp_path: Path) -> None:
    write_pngs(tmp_path / "out", 9)
    full = png_folder(tmp_path / "out")

    def crashing() -> Iterator[SliceSource]:
        for source in full.slices():
            if source.slice_index == 6:
                raise BadInput("disk gone")
            yield source

    started: list[str] = []

    class Progress:
        def started(self, group_id: str, total_slices: int) -> None:
            started.append(group_id)

        def advanced(self, slices: int, nbytes: int) -> None:
            pass

    async with client_for(stack) as client:
        with pytest.raises(BadInput, match="disk gone"):
            await upload(
                client,
                UploadRequest(study_instance_uid=STUDY),
                SliceSet(9, crashing),
                batch_size=3,
                progress=Progress(),
            )
        (group_id,) = started
        group = await client.mask_group(group_id)
        assert group is not None
        assert group["status"] != "COMPLETE"
        resumed = await upload(client, UploadRequest(resume_group_id=group_id), full)
    assert resumed.status == "COMPLETE"
    assert resumed.skipped_slices + resumed.uploaded_slices == 9
    assert resumed.skipped_slices == 9 - len(group["missingSliceIndexes"])


async def test_resume_refuses_another_volume(stack: Stack, tmp_path: Path) -> None:
    write_pngs(tmp_path / "a", 3)
    write_pngs(tmp_path / "b", 4)
    async with client_for(stack) as client:
        first = await upload(
            client, UploadRequest(study_instance_uid=STUDY), png_folder(tmp_path / "a")
        )
        with pytest.raises(BadInput, match="has 3 slices, the input has 4"):
            await upload(
                client, UploadRequest(resume_group_id=first.group_id), png_folder(tmp_path / "b")
            )


async def test_expiring_urls_and_503s_through_a_proxy(own_sqlite_url: str, tmp_path: Path) -> None:
    """URLs live 2 s; the proxy holds two PUTs back 2.5 s (storage then answers 403 expired),
    answers 503 to every 4th PUT and to every 2nd signing request."""
    write_pngs(tmp_path / "out", 12)
    plan = FaultPlan(
        fail_every_nth_put=4,
        fail_every_nth_signing=2,
        delay_first_put_of={"slice_00002.png", "slice_00009.png"},
        delay_seconds=2.5,
    )
    settings = base_settings(
        database_url=own_sqlite_url,
        var_dir=tmp_path / "var",
        storage_provider="local",
        signed_url_default_ttl=2,
    )
    async with (
        fault_proxy(plan) as proxy_url,
        open_stack("proxied-local", settings, public_base_url=proxy_url) as stack,
    ):
        plan.upstream = stack.base_url
        async with PacsMasksClient(proxy_url, stack.tokens["uploader"], retry=FAST_RETRY) as client:
            result = await upload(
                client,
                UploadRequest(study_instance_uid=STUDY),
                png_folder(tmp_path / "out"),
                batch_size=5,
            )
    assert result.status == "COMPLETE"
    assert plan.delayed == {"slice_00002.png", "slice_00009.png"}
    assert plan.failed_puts >= 2
    assert plan.failed_signings >= 1


async def test_storage_503s_on_s3(own_sqlite_url: str, moto_server: object, tmp_path: Path) -> None:
    from storage_servers import s3_settings

    write_pngs(tmp_path / "out", 10)
    plan = FaultPlan(fail_every_nth_put=3)
    async with fault_proxy(plan) as proxy_url:
        plan.upstream = moto_server.endpoint_url  # type: ignore[attr-defined]
        settings = s3_settings(
            plan.upstream, "testing", "testing", "pacs-masks-proxied"
        ).model_copy(
            update={
                "database_url": own_sqlite_url,
                "var_dir": tmp_path / "var",
                "s3_public_endpoint_url": proxy_url,
                "allowed_content_types": ["image/png"],
                "cors_origins": [],
            }
        )
        async with open_stack("proxied-s3", settings) as stack, client_for(stack) as client:
            result = await upload(
                client, UploadRequest(study_instance_uid=STUDY), png_folder(tmp_path / "out")
            )
    assert result.status == "COMPLETE"
    assert plan.failed_puts >= 3


def test_bad_inputs_are_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BadInput, match="holds no .png"):
        png_folder(tmp_path)
    (tmp_path / "x.nii").write_text("not nifti")
    with pytest.raises(BadInput, match="cannot read"):
        nifti_volume(tmp_path / "x.nii")
    (tmp_path / "m.csv").write_text("sliceIndex,confidence\n0,1.5\n")
    with pytest.raises(BadInput, match="not between 0 and 1"):
        load_manifest(tmp_path / "m.csv")
    with pytest.raises(BadInput, match="label"):
        png_folder(tmp_path, label="../etc")


def test_numpy_inputs(tmp_path: Path) -> None:
    volume = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) % 5
    np.save(tmp_path / "c.npy", volume)
    np.savez(tmp_path / "two.npz", seg=volume, other=volume)
    np.save(tmp_path / "f.npy", np.asfortranarray(volume))
    (from_npy,) = npy_volume(tmp_path / "c.npy")
    (from_npz,) = npy_volume(tmp_path / "two.npz", array_name="seg")
    for first, second, expected in zip(from_npy.slices(), from_npz.slices(), volume, strict=True):
        image = np.asarray(Image.open(io.BytesIO(first.load().body)))
        assert np.array_equal(image, expected)
        assert first.load().body == second.load().body
    with pytest.raises(BadInput, match="name one with --array"):
        npy_volume(tmp_path / "two.npz")
    with pytest.raises(BadInput, match="C-order"):
        npy_volume(tmp_path / "f.npy")


async def test_readme_library_example_runs(sqlite_local_stack: Stack, tmp_path: Path) -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme[readme.index("### The library") :]
    code = section[section.index("```python\n") + 10 : section.index("```\n", 10)]
    case = tmp_path / "results" / "case-17"
    write_pngs(case, 3)
    uids = "\n".join(
        f"{index},1.2.840.113619.2.55.3.604688.2.{index + 1},0.9" for index in range(3)
    )
    (tmp_path / "results" / "case-17.csv").write_text(
        f"sliceIndex,sopInstanceUid,confidence\n{uids}\n"
    )
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PACS_MASKS_URL": sqlite_local_stack.base_url,
        "PACS_MASKS_TOKEN": sqlite_local_stack.tokens["uploader"],
    }
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            code,
            cwd=tmp_path,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        stdout, stderr = await process.communicate()
        assert process.returncode == 0, stderr.decode()
        lines = stdout.decode().splitlines()
        assert lines[0].endswith(": COMPLETE")
        assert lines[1] == "validation: VALID"
    finally:
        await reset(sqlite_local_stack)
