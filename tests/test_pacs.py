"""DICOM SEG export to, and import from, a real PACS (Orthanc over DICOMweb)."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pytest
from conftest import Stack
from pacs_flows import (
    EXPORT,
    TcpRelay,
    create_annotation,
    decode,
    export,
    synthetic_masks,
    upload_group,
    wait_for_export,
)
from pacs_server import (
    CtSeries,
    OrthancServer,
    dciodvfy_errors,
    dicomweb_client,
    store_series,
    synthetic_ct_series,
)

from app.dicom.export import (
    EXPORT_JOB,
    STALE_AFTER,
    export_job,
    pending_export_ids,
    run_export,
)
from app.jobs import JobContext, JobRunner
from app.main import JOBS
from app.models import DicomExport, DicomExportStatus, utcnow

LABELS: list[str | None] = ["liver", "tumor"]
MASKS_OF_GROUP = """
query($id: ID!) {
  maskGroup(id: $id) {
    id sliceCount status modelName
    masks { sliceIndex labelName sopInstanceUid width height viewUrl }
  }
}"""
IMPORT = """
mutation($annotationId: ID!, $series: String!, $sop: String!) {
  importDicomSeg(annotationId: $annotationId, seriesInstanceUid: $series, sopInstanceUid: $sop) {
    id sliceCount status
  }
}"""


def seg_series_in_study(orthanc: OrthancServer, study: str) -> list[str]:
    client = dicomweb_client(orthanc)
    found = client.search_for_series(study_instance_uid=study, search_filters={"Modality": "SEG"})
    return [item["0020000E"]["Value"][0] for item in found]


def retrieve_seg(orthanc: OrthancServer, study: str, export: dict[str, Any]) -> Any:
    return dicomweb_client(orthanc).retrieve_instance(
        study_instance_uid=study,
        series_instance_uid=export["seriesInstanceUid"],
        sop_instance_uid=export["sopInstanceUid"],
    )


def assert_frames_match(
    seg: hd.seg.Segmentation,
    series: CtSeries,
    masks: dict[tuple[int, str | None], np.ndarray[Any, Any]],
    labels: list[str],
) -> None:
    """Every source instance carries, per segment, exactly the uploaded mask."""
    for position, sop in enumerate(series.sop_instance_uids):
        for number, label in enumerate(labels, start=1):
            expected = masks[(position, label)]
            if sop in {uid for _, _, uid in seg.get_source_image_uids()}:
                got = seg.get_pixels_by_source_instance(
                    source_sop_instance_uids=[sop], segment_numbers=[number]
                )[0, :, :, 0]
            else:
                got = np.zeros_like(expected)
            assert np.array_equal(got.astype(bool), expected), (position, label)


@pytest.fixture
async def stored_series(orthanc: OrthancServer) -> CtSeries:
    series = synthetic_ct_series()
    await asyncio.to_thread(store_series, orthanc, series)
    return series


async def test_export_by_geometry_is_a_valid_seg_the_pacs_lists(
    pstack: Stack, orthanc: OrthancServer, stored_series: CtSeries, tmp_path: Path
) -> None:
    series = stored_series
    annotation_id = await create_annotation(pstack, series)
    masks = synthetic_masks(24, 64, LABELS)
    # No sopInstanceUid: slices match the source instances by geometry; uploads are shuffled.
    group_id = await upload_group(
        pstack, annotation_id, 24, masks, modelName="liver-seg", version="2.1.0"
    )

    done = await export(pstack, group_id)

    assert done["status"] == "DONE", done
    assert done["error"] is None
    assert done["finishedAt"] is not None
    assert done["segmentCount"] == 2
    assert seg_series_in_study(orthanc, series.study_instance_uid) == [done["seriesInstanceUid"]]
    dataset = await asyncio.to_thread(retrieve_seg, orthanc, series.study_instance_uid, done)
    path = tmp_path / "seg.dcm"
    dataset.save_as(path, enforce_file_format=True)
    assert await dciodvfy_errors(path) == []
    seg = hd.seg.Segmentation.from_dataset(dataset)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["liver", "tumor"]
    for item in seg.SegmentSequence:
        assert item.SegmentAlgorithmType == "AUTOMATIC"
        algorithm = item.SegmentationAlgorithmIdentificationSequence[0]
        assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("liver-seg", "2.1.0")
    assert seg.NumberOfFrames == done["frameCount"]
    # Frames only where a mask is non-empty.
    assert done["frameCount"] == sum(1 for plane in masks.values() if plane.any())
    assert_frames_match(seg, series, masks, ["liver", "tumor"])

    # A re-export is a new SEG series beside the first, never over it.
    again = await export(pstack, group_id)
    assert again["status"] == "DONE"
    assert again["seriesInstanceUid"] != done["seriesInstanceUid"]
    assert sorted(seg_series_in_study(orthanc, series.study_instance_uid)) == sorted(
        [done["seriesInstanceUid"], again["seriesInstanceUid"]]
    )

    # Import of the SEG into a new group gives back the same masks.
    imported = await pstack.data(
        IMPORT,
        {
            "annotationId": annotation_id,
            "series": done["seriesInstanceUid"],
            "sop": done["sopInstanceUid"],
        },
    )
    new_group = imported["importDicomSeg"]
    assert new_group["sliceCount"] == 24
    assert new_group["status"] == "COMPLETE"
    listed = (await pstack.data(MASKS_OF_GROUP, {"id": new_group["id"]}))["maskGroup"]
    assert listed["modelName"] == "liver-seg"
    assert len(listed["masks"]) == 48
    for mask in listed["masks"]:
        assert mask["sopInstanceUid"] == series.sop_instance_uids[mask["sliceIndex"]]
        assert (mask["width"], mask["height"]) == (64, 64)
        response = await pstack.client.get(mask["viewUrl"], headers=pstack.auth("reader"))
        assert response.status_code == 200
        expected = masks[(mask["sliceIndex"], mask["labelName"])]
        assert np.array_equal(decode(response.content), expected), mask


async def test_export_matches_by_sop_instance_uid(
    pstack: Stack, orthanc: OrthancServer, stored_series: CtSeries
) -> None:
    """sliceIndex runs against the geometry here; the SOP Instance UIDs decide. One unlabelled
    group overlapping a labelled one is not possible, so overlapping labels are used."""
    series = stored_series
    annotation_id = await create_annotation(pstack, series)
    masks = synthetic_masks(24, 64, ["organ", "lesion"], overlap=True)
    reverse = {position: 23 - position for position in range(24)}
    group_id = await upload_group(
        pstack,
        annotation_id,
        24,
        masks,
        slice_of=reverse,
        sop_of=dict(enumerate(series.sop_instance_uids)),
        seed=5,
    )
    done = await export(pstack, group_id)
    assert done["status"] == "DONE", done
    dataset = await asyncio.to_thread(retrieve_seg, orthanc, series.study_instance_uid, done)
    seg = hd.seg.Segmentation.from_dataset(dataset)
    assert seg.SegmentsOverlap == "YES"
    for item in seg.SegmentSequence:
        # No model: a manual segmentation.
        assert item.SegmentAlgorithmType == "MANUAL"
    assert_frames_match(seg, series, masks, ["lesion", "organ"])


async def test_unlabelled_masks_make_one_segment_named_from_the_group(
    pstack: Stack, orthanc: OrthancServer, stored_series: CtSeries
) -> None:
    series = stored_series
    annotation_id = await create_annotation(pstack, series)
    masks = synthetic_masks(24, 64, [None])
    group_id = await upload_group(
        pstack, annotation_id, 24, masks, groupName="spleen", modelName="m"
    )
    done = await export(pstack, group_id)
    assert done["status"] == "DONE", done
    dataset = await asyncio.to_thread(retrieve_seg, orthanc, series.study_instance_uid, done)
    seg = hd.seg.Segmentation.from_dataset(dataset)
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["spleen"]
    assert_frames_match(
        seg, series, {(p, "spleen"): plane for (p, _), plane in masks.items()}, ["spleen"]
    )


async def _failed_then_fixed(
    stack: Stack, orthanc: OrthancServer, series: CtSeries, group_id: str, words: str
) -> dict[str, Any]:
    failed = await export(stack, group_id)
    assert failed["status"] == "FAILED", failed
    assert words in failed["error"], failed["error"]
    assert failed["seriesInstanceUid"] is None
    assert seg_series_in_study(orthanc, series.study_instance_uid) == []
    return failed


async def test_source_series_missing_from_the_pacs_then_stored(
    pstack: Stack, orthanc: OrthancServer
) -> None:
    series = synthetic_ct_series()
    annotation_id = await create_annotation(pstack, series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    await _failed_then_fixed(pstack, orthanc, series, group_id, "was not found in the PACS")

    await asyncio.to_thread(store_series, orthanc, series)
    retried = await export(pstack, group_id)
    assert retried["status"] == "DONE", retried
    assert seg_series_in_study(orthanc, series.study_instance_uid) == [retried["seriesInstanceUid"]]


async def test_slice_count_mismatch_then_the_missing_instance_arrives(
    pstack: Stack, orthanc: OrthancServer
) -> None:
    series = synthetic_ct_series()
    partial = CtSeries(series.study_instance_uid, series.series_instance_uid, series.datasets[1:])
    await asyncio.to_thread(store_series, orthanc, partial)
    annotation_id = await create_annotation(pstack, series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    await _failed_then_fixed(
        pstack, orthanc, series, group_id, "the group has 24 slices but source series"
    )

    await asyncio.to_thread(store_series, orthanc, series)
    retried = await export(pstack, group_id)
    assert retried["status"] == "DONE", retried


async def test_unreachable_pacs_then_back(
    pstack: Stack, orthanc: OrthancServer, pacs_relay: TcpRelay, stored_series: CtSeries
) -> None:
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    await pacs_relay.stop()
    try:
        await _failed_then_fixed(pstack, orthanc, stored_series, group_id, "could not be reached")
    finally:
        await pacs_relay.start()
    retried = await export(pstack, group_id)
    assert retried["status"] == "DONE", retried


async def test_export_is_for_the_owner_or_an_admin_and_audited(
    pstack: Stack, stored_series: CtSeries
) -> None:
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    for caller in ("reader", "other"):
        error = await pstack.error(EXPORT, {"id": group_id}, as_=caller)
        assert error["extensions"]["code"] == "FORBIDDEN"
    done = await export(pstack, group_id, as_="admin")
    assert done["status"] == "DONE"
    events = await pstack.data(
        'query($g: ID!) { auditEvents(maskGroupId: $g, action: "mask_group.export_seg") '
        "{ actor } }",
        {"g": group_id},
        as_="admin",
    )
    assert [event["actor"] for event in events["auditEvents"]] == ["admin-1"]


async def test_only_complete_groups_are_exported(pstack: Stack, stored_series: CtSeries) -> None:
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(
        pstack, annotation_id, 30, synthetic_masks(24, 64, ["liver"]), expect_status="UPLOADING"
    )
    error = await pstack.error(EXPORT, {"id": group_id})
    assert error["extensions"]["code"] == "CONFLICT"
    assert "COMPLETE" in error["message"]
    missing = await pstack.error(EXPORT, {"id": "999999"})
    assert missing["extensions"]["code"] == "NOT_FOUND"


async def test_import_refuses_what_is_not_a_seg_of_the_series(
    pstack: Stack, stored_series: CtSeries
) -> None:
    annotation_id = await create_annotation(pstack, stored_series)
    ct = stored_series
    error = await pstack.error(
        IMPORT,
        {
            "annotationId": annotation_id,
            "series": ct.series_instance_uid,
            "sop": ct.sop_instance_uids[0],
        },
    )
    assert error["extensions"]["code"] == "DICOM_MISMATCH"
    assert "not a DICOM Segmentation" in error["message"]
    reader = await pstack.error(
        IMPORT,
        {"annotationId": annotation_id, "series": "1.2.3", "sop": "1.2.3.4"},
        as_="reader",
    )
    assert reader["extensions"]["code"] == "FORBIDDEN"
    bad_uid = await pstack.error(
        IMPORT, {"annotationId": annotation_id, "series": "1.2.3", "sop": "01.x"}
    )
    assert bad_uid["extensions"]["code"] == "BAD_USER_INPUT"
    missing = await pstack.error(
        IMPORT, {"annotationId": annotation_id, "series": "1.2.3", "sop": "1.2.3.4"}
    )
    assert missing["extensions"]["code"] == "NOT_FOUND"
    groups = await pstack.data(
        "query($id: ID!) { annotation(id: $id) { maskGroups { id } } }", {"id": annotation_id}
    )
    assert groups["annotation"]["maskGroups"] == []


async def test_without_a_pacs_the_features_answer_a_coded_error(sqlite_local_stack: Stack) -> None:
    error = await sqlite_local_stack.error(EXPORT, {"id": "1"})
    assert error["extensions"]["code"] == "PACS_NOT_CONFIGURED"
    assert "DICOMWEB_URL" in error["message"]
    error = await sqlite_local_stack.error(
        IMPORT, {"annotationId": "1", "series": "1.2.3", "sop": "1.2.3.4"}
    )
    assert error["extensions"]["code"] == "PACS_NOT_CONFIGURED"


async def _pending_export(stack: Stack, group_id: str) -> DicomExport:
    """A request recorded as the mutation records it, without waking any runner."""
    async with stack.sessionmaker() as session, session.begin():
        row = DicomExport(
            mask_group_id=int(group_id),
            status=DicomExportStatus.PENDING,
            requested_by="test",
            requested_at=utcnow(),
            attempts=0,
        )
        session.add(row)
    return row


async def _settled(stack: Stack, export_id: int) -> DicomExport:
    for _ in range(600):
        async with stack.sessionmaker() as session:
            row = await session.get_one(DicomExport, export_id)
        if row.status in (DicomExportStatus.DONE, DicomExportStatus.FAILED):
            return row
        await asyncio.sleep(0.1)
    raise AssertionError(f"export {export_id} is still {row.status.value}")


async def test_two_runners_export_a_request_once(
    pstack: Stack, orthanc: OrthancServer, stored_series: CtSeries
) -> None:
    """Two replicas' runners woken at once, plus two export runs beside them (as when a job
    lease has run out), plus the served app's own runner: one SEG, one attempt."""
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    row = await _pending_export(pstack, group_id)

    def context(owner: str) -> JobContext:
        return JobContext(pstack.settings, pstack.sessionmaker, pstack.storage, owner)

    runners = [JobRunner(context(f"replica-{name}"), JOBS) for name in "ab"]
    for runner in runners:
        runner.start()
    try:
        for runner in runners:
            runner.wake(EXPORT_JOB)
        reports = await asyncio.gather(export_job(context("run-c")), export_job(context("run-d")))
        done = await wait_for_export(pstack, group_id)
    finally:
        for runner in runners:
            await runner.stop()
    assert done["status"] == "DONE", done
    assert sum(len(report.done) for report in reports) <= 1
    assert seg_series_in_study(orthanc, stored_series.study_instance_uid) == [
        done["seriesInstanceUid"]
    ]
    exported = await _settled(pstack, row.id)
    assert (exported.status, exported.attempts) == (DicomExportStatus.DONE, 1)


async def test_a_pending_export_is_claimed_once(pstack: Stack, stored_series: CtSeries) -> None:
    """Two workers asking for the same export: one runs it, the other is told it is not its."""
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    export_row = await _pending_export(pstack, group_id)
    arguments = {
        "sessionmaker": pstack.sessionmaker,
        "storage": pstack.storage,
        "settings": pstack.settings,
    }
    results = await asyncio.gather(
        run_export(export_row.id, **arguments), run_export(export_row.id, **arguments)
    )
    assert sorted(results, key=str) == sorted([DicomExportStatus.DONE, None], key=str)
    assert (await wait_for_export(pstack, group_id))["status"] == "DONE"


async def test_a_stale_running_export_is_claimed_again(
    pstack: Stack, stored_series: CtSeries
) -> None:
    """A runner that died leaves its export RUNNING; once the claim is stale the export job
    takes it, and leaves a fresh claim alone."""
    annotation_id = await create_annotation(pstack, stored_series)
    group_id = await upload_group(pstack, annotation_id, 24, synthetic_masks(24, 64, ["liver"]))
    rows = {}
    async with pstack.sessionmaker() as session, session.begin():
        for name, claimed in (("fresh", utcnow()), ("stale", utcnow() - 2 * STALE_AFTER)):
            rows[name] = DicomExport(
                mask_group_id=int(group_id),
                status=DicomExportStatus.RUNNING,
                requested_by="test",
                requested_at=utcnow() - timedelta(hours=2),
                claimed_at=claimed,
                attempts=1,
            )
            session.add(rows[name])
    assert await pending_export_ids(pstack.sessionmaker) == [rows["stale"].id]
    report = await export_job(
        JobContext(pstack.settings, pstack.sessionmaker, pstack.storage, "test")
    )
    # The served app's runner may have taken it first; either way it was run once more.
    assert report.failed == []
    stale = await _settled(pstack, rows["stale"].id)
    async with pstack.sessionmaker() as session:
        fresh = await session.get_one(DicomExport, rows["fresh"].id)
    assert (stale.status, stale.attempts) == (DicomExportStatus.DONE, 2)
    assert (fresh.status, fresh.attempts) == (DicomExportStatus.RUNNING, 1)
