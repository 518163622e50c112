"""Property-based checks of every mutation's validation, over HTTP against the real server:
whatever the input, it is either accepted or refused with a coded error, and a refused call
writes nothing (the database is compared before and after).

Deterministic (derandomized, no example database) so that CI never flakes; PostgreSQL runs
fewer examples than SQLite."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import string
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from conftest import Stack
from flows import create_annotation, create_group, upload
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from operations import COMPLETE, CREATE_ANNOTATION, CREATE_GROUP, DELETE_GROUP, REQUEST_URLS
from sqlalchemy import func, select

from app.models import Annotation, AuditEvent, Mask, MaskGroup, MaskUpload

CODES = {"BAD_USER_INPUT", "NOT_FOUND", "FORBIDDEN", "CONFLICT", "UPLOAD_INCOMPLETE"}
CODES |= {"CHECKSUM_MISMATCH"}
UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")
LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
EXAMPLES = {"sqlite-local": 60, "postgresql-s3": 15}


async def prove(
    stack: Stack,
    check: Callable[..., Awaitable[None]],
    factor: float = 1.0,
    **strategies: st.SearchStrategy[Any],
) -> None:
    """Runs `check` on generated values. Hypothesis drives the examples from a thread of its
    own; each example runs on the test's event loop, where the stack's clients live."""
    loop = asyncio.get_running_loop()

    @settings(
        max_examples=int(EXAMPLES[stack.name] * factor),
        derandomize=True,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(**strategies)
    def run(**values: Any) -> None:
        asyncio.run_coroutine_threadsafe(check(**values), loop).result()

    await asyncio.to_thread(run)


# --- values: valid ones, near misses and anything at all ----------------------------------

_digits = st.text(string.digits, min_size=1, max_size=12).filter(lambda s: s[0] != "0")
uids = st.lists(_digits, min_size=1, max_size=8).map(".".join)
any_text = st.text(max_size=80) | st.text(string.printable, max_size=300)
uid_like = uids | any_text | uids.map(lambda uid: uid + "\n") | st.just("1." + "2" * 70)
labels = st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z") | any_text
md5s = st.binary(min_size=16, max_size=16).map(lambda b: base64.b64encode(b).decode())
int32 = st.integers(-(2**31), 2**31 - 1)
small_or_any = st.integers(-3, 12) | int32
ids = st.sampled_from(["0", "1", "2147483647", "2147483648", "9" * 30, "-1", "x", "", "²"])
ids = ids | _digits | any_text
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=20,
)
# Just over and under MAX_JSON_INPUT_BYTES, and nested deeper than anything legitimate.
big_json = st.integers(65_000, 66_000).map(lambda n: {"blob": "x" * n})


def _nested(levels: int) -> list[Any]:
    value: list[Any] = []
    for _ in range(levels):
        value = [value]
    return value


deep_json = st.integers(20, 200).map(_nested)


def maybe(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


# --- the database before and after ----------------------------------------------------------


async def snapshot(stack: Stack) -> tuple[int, ...]:
    counts = []
    async with stack.sessionmaker() as session:
        for model in (Annotation, MaskGroup, Mask, MaskUpload, AuditEvent):
            counts.append(await session.scalar(select(func.count()).select_from(model)))
        counts.append(await session.scalar(select(func.sum(MaskGroup.uploaded_slice_count))))
    return tuple(count or 0 for count in counts)


async def call(stack: Stack, query: str, variables: dict[str, Any]) -> dict[str, Any] | None:
    """The data of an accepted call, or None after checking that the refusal is coded and
    left the database as it was."""
    before = await snapshot(stack)
    response = await stack.client.post("/graphql", json={"query": query, "variables": variables})
    assert response.status_code in (200, 400), response.text
    body: dict[str, Any] = response.json()
    if not body.get("errors"):
        data: dict[str, Any] = body["data"]
        return data
    for error in body["errors"]:
        assert error.get("extensions", {}).get("code") in CODES, (variables, body)
    assert await snapshot(stack) == before, (variables, body)
    return None


# --- one property per mutation --------------------------------------------------------------


async def test_create_annotation(stack: Stack) -> None:
    async def check(study: str, series: str | None, label: str | None) -> None:
        variables = {"studyInstanceUid": study, "seriesInstanceUid": series, "label": label}
        data = await call(stack, CREATE_ANNOTATION, {"input": variables})
        if data is not None:
            created = data["createAnnotation"]
            assert (created["studyInstanceUid"], created["label"]) == (study, label)
            # Accepted means valid by the documented rules (a trailing newline is not).
            assert all(UID.fullmatch(uid) for uid in (study, series or "1"))

    await prove(stack, check, 1.0, study=uid_like, series=maybe(uid_like), label=maybe(any_text))


async def test_create_mask_group(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)

    async def check(
        annotation: str,
        slice_count: int,
        texts: dict[str, str | None],
        mask_type: str,
        confidence: float | None,
        parameters: Any,
    ) -> None:
        group = {
            "annotationId": annotation,
            "sliceCount": slice_count,
            "maskType": mask_type,
            "confidence": confidence,
            "inferenceParameters": parameters,
            **texts,
        }
        data = await call(stack, CREATE_GROUP, {"input": group})
        if data is not None:
            assert data["createMaskGroup"]["sliceCount"] == slice_count
            assert len(json.dumps(parameters, ensure_ascii=False).encode()) <= 64 * 1024

    await prove(
        stack,
        check,
        1.0,
        annotation=st.just(annotation_id) | ids,
        slice_count=small_or_any | st.integers(99_990, 100_010),
        texts=st.dictionaries(
            st.sampled_from(["groupName", "modelName", "version", "modality", "description"]),
            maybe(any_text),
        ),
        mask_type=st.sampled_from(["segmentation", "", "  "]) | any_text,
        confidence=maybe(st.floats() | st.integers()),
        parameters=maybe(json_values | big_json | deep_json),
    )


def _upload_slices(slice_count: int) -> st.SearchStrategy[list[dict[str, Any]]]:
    one = st.fixed_dictionaries(
        {
            "sliceIndex": st.integers(-2, slice_count + 2) | int32,
            "fileSize": st.integers(-2, 100) | st.integers(0, 2**80) | st.just("12"),
            "contentMd5": md5s | any_text,
        },
        optional={
            "labelName": maybe(labels),
            "contentType": st.sampled_from(["image/png", "image/webp", "text/plain"]) | any_text,
        },
    )
    return st.lists(one, max_size=6)


async def test_request_mask_upload_urls(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 8)
    others = await create_group(stack, annotation_id, 8)
    await upload(stack, others, [0])

    async def check(group: str, slices: list[dict[str, Any]], ttl: int | None) -> None:
        variables = {"groupId": group, "slices": slices, "ttl": ttl}
        data = await call(stack, REQUEST_URLS, variables)
        if data is not None:
            assert len(data["requestMaskUploadUrls"]) == len(slices)
            assert all(LABEL.fullmatch(item.get("labelName") or "a") for item in slices)

    await prove(
        stack,
        check,
        1.5,
        group=st.sampled_from([group_id, others]) | ids,
        slices=_upload_slices(8),
        ttl=maybe(st.integers(-2, 4000) | int32),
    )


async def test_complete_mask_upload(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 6)
    # Slices 0-2 are in storage, not yet registered: some batches can succeed.
    await upload(stack, group_id, range(3), complete=False)
    completed = st.fixed_dictionaries(
        {"sliceIndex": st.integers(-1, 7) | int32},
        optional={
            "labelName": maybe(labels),
            "sopInstanceUid": maybe(uid_like),
            "width": maybe(st.integers(-1, 70_000)),
            "height": maybe(st.integers(-1, 70_000)),
        },
    )

    async def check(group: str, slices: list[dict[str, Any]]) -> None:
        data = await call(stack, COMPLETE, {"groupId": group, "slices": slices})
        if data is not None:
            registered = data["completeMaskUpload"]["masks"]
            assert {mask["sliceIndex"] for mask in registered} <= {0, 1, 2}

    await prove(
        stack, check, 1.5, group=st.just(group_id) | ids, slices=st.lists(completed, max_size=5)
    )


async def test_delete_mask_group(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    kept = await create_group(stack, annotation_id, 2)

    async def check(target: str) -> None:
        if target == "fresh":
            target = await create_group(stack, annotation_id, 2)
        elif target == "kept":
            target = kept
        data = await call(stack, DELETE_GROUP, {"id": target})
        if data is not None:
            assert data["deleteMaskGroup"]["id"] == target

    await prove(stack, check, 0.5, target=st.sampled_from(["fresh", "kept"]) | ids)


@pytest.mark.parametrize("served_stack", ["sqlite-local"], indirect=True)
async def test_other_users_groups_are_refused_without_writes(stack: Stack) -> None:
    annotation_id = await create_annotation(stack)
    group_id = await create_group(stack, annotation_id, 4)

    async def check(slices: list[dict[str, Any]]) -> None:
        before = await snapshot(stack)
        response = await stack.client.post(
            "/graphql",
            json={"query": REQUEST_URLS, "variables": {"groupId": group_id, "slices": slices}},
            headers=stack.auth("other"),
        )
        assert response.status_code in (200, 400), response.text
        assert response.json()["errors"][0]["extensions"]["code"] in CODES
        assert await snapshot(stack) == before

    await prove(stack, check, 0.5, slices=_upload_slices(4))
