"""The SEG without a PACS round trip: GET /api/mask-group/{id}/seg.dcm and the command line."""

from __future__ import annotations

import asyncio
import io
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import Stack, reset
from flows import create_annotation as create_plain_annotation
from flows import create_group, upload
from pacs_flows import create_annotation, export, png, synthetic_masks, upload_group
from pacs_server import CtSeries, dciodvfy_errors, synthetic_ct_series

from app.config import Settings
from app.dicom.seg import GroupInfo, MaskRef, build_seg, seg_options
from app.dicom.source import order_series
from app.local_storage import LocalStorage
from app.storage import mask_key

BIN = Path(sys.executable).parent


def seg_path(group_id: str) -> str:
    return f"/api/mask-group/{group_id}/seg.dcm"


def frames_by_source(seg: hd.seg.Segmentation, series: CtSeries, label_count: int) -> Any:
    referenced = {uid for _, _, uid in seg.get_source_image_uids()}
    present = [uid for uid in series.sop_instance_uids if uid in referenced]
    return present, seg.get_pixels_by_source_instance(
        source_sop_instance_uids=present, segment_numbers=list(range(1, label_count + 1))
    )


async def test_download_streams_the_seg(pstack: Stack, ct_series: CtSeries) -> None:
    annotation_id = await create_annotation(pstack, ct_series)
    masks = synthetic_masks(24, 64, ["liver", "tumor"])
    group_id = await upload_group(pstack, annotation_id, 24, masks, modelName="m", version="1")

    anonymous = await pstack.client.get(seg_path(group_id), headers={"Authorization": ""})
    assert anonymous.status_code == 401
    response = await pstack.client.get(seg_path(group_id), headers=pstack.auth("reader"))
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/dicom"
    assert int(response.headers["content-length"]) == len(response.content)
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(io.BytesIO(response.content)))
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "tumor"]
    present, pixels = frames_by_source(seg, ct_series, 2)
    for offset, uid in enumerate(present):
        position = ct_series.sop_instance_uids.index(uid)
        for number, label in enumerate(["liver", "tumor"]):
            assert np.array_equal(
                pixels[offset, :, :, number].astype(bool), masks[(position, label)]
            )
    # Built on demand: every download is a new SEG instance.
    again = await pstack.client.get(seg_path(group_id), headers=pstack.auth("reader"))
    assert pydicom.dcmread(io.BytesIO(again.content)).SOPInstanceUID != seg.SOPInstanceUID


async def test_download_refuses_with_4xx(pstack: Stack, ct_series: CtSeries) -> None:
    assert (await pstack.client.get(seg_path("999999"))).status_code == 404
    annotation_id = await create_annotation(pstack, ct_series)
    partial = await upload_group(
        pstack, annotation_id, 30, synthetic_masks(24, 64, ["liver"]), expect_status="UPLOADING"
    )
    response = await pstack.client.get(seg_path(partial))
    assert response.status_code == 409
    assert "COMPLETE" in response.text
    small = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 32, ["liver"]))
    response = await pstack.client.get(seg_path(small))
    assert response.status_code == 422
    assert "is 32x32 but its source instance is 64x64" in response.text


async def test_download_without_a_pacs_says_so(sqlite_local_stack: Stack) -> None:
    stack = sqlite_local_stack
    try:
        annotation_id = await create_plain_annotation(stack)
        group_id = await create_group(stack, annotation_id, 2)
        await upload(stack, group_id, range(2))
        response = await stack.client.get(seg_path(group_id))
        assert response.status_code == 503
        assert "DICOMWEB_URL" in response.text
    finally:
        await reset(stack)


def _cli_env(stack: Stack, *, pacs: bool = False) -> dict[str, str]:
    settings = stack.settings
    env = {key: os.environ[key] for key in ("PATH", "HOME", "LANG") if key in os.environ}
    env.update(
        DATABASE_URL=settings.resolved_database_url,
        VAR_DIR=str(settings.var_dir),
        STORAGE_PROVIDER="local",
        PUBLIC_BASE_URL=stack.base_url,
    )
    if pacs:
        env.update(
            DICOMWEB_URL=settings.dicomweb_url or "",
            DICOMWEB_USERNAME=settings.dicomweb_username or "",
            DICOMWEB_PASSWORD=settings.dicomweb_password or "",
        )
    return env


async def _cli(stack: Stack, *args: str, pacs: bool = False) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [str(BIN / "pacs-masks"), *args],
        env=_cli_env(stack, pacs=pacs),
        capture_output=True,
        text=True,
        check=False,
    )


async def test_cli_export_and_import_with_a_source_folder(
    pstack: Stack, ct_series: CtSeries, tmp_path: Path
) -> None:
    source_dir = tmp_path / "ct"
    source_dir.mkdir()
    for number, dataset in enumerate(ct_series.datasets):
        dataset.save_as(source_dir / f"{number:03d}.dcm", enforce_file_format=True)
    (source_dir / "README.txt").write_text("not DICOM")
    annotation_id = await create_annotation(pstack, ct_series)
    masks = synthetic_masks(24, 64, ["liver"])
    group_id = await upload_group(pstack, annotation_id, 24, masks, modelName="m")
    out = tmp_path / "seg.dcm"

    exported = await _cli(
        pstack, "export-seg", group_id, "--out", str(out), "--source-dir", str(source_dir)
    )
    assert exported.returncode == 0, exported.stderr
    assert f"SEG of mask group {group_id} written to {out}" in exported.stdout
    seg = hd.seg.Segmentation.from_dataset(pydicom.dcmread(out))
    assert seg.SegmentSequence[0].SegmentLabel == "liver"
    assert await dciodvfy_errors(out) == []

    imported = await _cli(
        pstack,
        "import-seg",
        "--annotation",
        annotation_id,
        "--file",
        str(out),
        "--source-dir",
        str(source_dir),
    )
    assert imported.returncode == 0, imported.stderr
    assert "slices" in imported.stdout

    # The same from the PACS: export there, then import by the SEG's UIDs.
    done = await export(pstack, group_id)
    assert done["status"] == "DONE", done
    from_pacs = await _cli(
        pstack,
        "import-seg",
        "--annotation",
        annotation_id,
        "--series",
        done["seriesInstanceUid"],
        "--sop",
        done["sopInstanceUid"],
        pacs=True,
    )
    assert from_pacs.returncode == 0, from_pacs.stderr
    assert f"from SEG {done['sopInstanceUid']}: 24 slices" in from_pacs.stdout

    missing = await _cli(pstack, "export-seg", "999999", "--out", str(out), "--source-dir", "/")
    assert missing.returncode == 1
    assert missing.stderr.strip() == "pacs-masks: mask group 999999 does not exist"
    no_pacs = await _cli(pstack, "export-seg", group_id, "--out", str(out))
    assert no_pacs.returncode == 1
    assert len(no_pacs.stderr.strip().splitlines()) == 1
    assert "DICOMWEB_URL" in no_pacs.stderr


# Differ between any two SEGs built from the same masks.
PER_INSTANCE = (
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "ContributingEquipmentSequence",
)


@pytest.mark.parametrize(
    ("slices", "label_count"),
    # 30x30 frames do not end on a byte; 25 slices of 3 labels make 62 frames, an odd number
    # of bytes (padded); 10 labels take two bytes of flags; 256 labels a 16-bit label map.
    [(25, 3), (25, 10), (1, 256)],
)
async def test_overlapping_labels_make_the_seg_highdicom_makes_from_one_plane_each(
    tmp_path: Path, slices: int, label_count: int
) -> None:
    """The export packs overlapping labels' frames itself (app/dicom/seg_volume.py): the SEG
    equals, attribute for attribute and bit for bit, what highdicom builds from the
    (frames, rows, columns, segments) stack, and reads back per segment exactly."""
    size = 30
    series = synthetic_ct_series(slices, size)
    labels = [f"label{number:03d}" for number in range(label_count)]
    masks = synthetic_masks(slices, size, labels, overlap=True)
    storage = LocalStorage.from_settings(
        Settings(_env_file=None, var_dir=tmp_path, storage_provider="local")
    )
    refs = []
    for (position, label), plane in masks.items():
        key = mask_key(1, 1, position, label, "image/png")
        path = tmp_path / "storage" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(png(plane))
        refs.append(MaskRef(position, label, None, key))
    source = order_series(
        series.study_instance_uid, str(series.datasets[0].SeriesInstanceUID), series.datasets
    )
    group = GroupInfo(1, "organs", "model", "1", None, slices)
    try:
        ours = await build_seg(storage, group, refs, source)
    finally:
        await storage.aclose()

    stack = np.stack(
        [
            np.stack([masks[(position, label)] for label in labels], axis=-1)
            for position in range(slices)
        ]
    )
    expected = hd.seg.Segmentation(
        source_images=source.datasets, pixel_array=stack, **seg_options(group, labels)
    )
    assert expected.SegmentsOverlap == "YES"
    for keyword in PER_INSTANCE:
        ours[keyword] = expected[keyword]
    uid = expected.DimensionOrganizationSequence[0].DimensionOrganizationUID
    for item in [*ours.DimensionOrganizationSequence, *ours.DimensionIndexSequence]:
        item.DimensionOrganizationUID = uid
    assert ours == expected

    path = tmp_path / "seg.dcm"
    ours.save_as(path, enforce_file_format=True)
    assert await dciodvfy_errors(path) == []
    seg = hd.seg.segread(path)
    present, pixels = frames_by_source(seg, series, label_count)
    assert len(present) == sum(
        any(masks[(position, label)].any() for label in labels) for position in range(slices)
    )
    for offset, uid in enumerate(present):
        position = series.sop_instance_uids.index(uid)
        for number, label in enumerate(labels):
            assert np.array_equal(
                pixels[offset, :, :, number].astype(bool), masks[(position, label)]
            )
