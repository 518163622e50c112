"""A representative batch run inside the server at start-up, before it answers anyone.

The first large batch after a start used to take about three times as long as the next ones:
it paid for what is built on first use (graphql-core's and Strawberry's machinery for a list
of input objects and for the error path, the presigner's first calls, the JSON encoder's) and
for a full garbage collection over everything imported. The warm-up pays for the former here;
`app.gc_tuning` then freezes the result with the rest of start-up.

It touches neither the database nor storage and writes nothing: the batch mutations run as a
principal without the UPLOADER role, which they refuse before a session opens, and the URLs
are signed (a computation) for keys nobody uploads to and then dropped."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from app.audit import Actor
from app.config import Settings
from app.events import EventBus
from app.graphql.context import Context
from app.graphql.schema import Schema
from app.jobs import JobRunner
from app.principals import Principal, Role
from app.storage import Storage, mask_key
from app.view_urls import ViewUrlSigner

log = logging.getLogger(__name__)

WARM_UP_SLICES = 1000
_MD5 = "1B2M2Y8AsgTpgAmY7PhCfg=="
_REQUEST_URLS = """mutation WarmUp($groupId: ID!, $slices: [SliceUploadInput!]!) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices) {
    sliceIndex labelName filePath url method headers { name value } expiresAt } }"""
_COMPLETE = """mutation WarmUp($groupId: ID!, $slices: [CompletedSliceInput!]!) {
  completeMaskUpload(groupId: $groupId, slices: $slices) {
    maskGroup { id status uploadedSliceCount } masks { id sliceIndex checksum viewUrl } } }"""


async def warm_up(
    schema: Schema,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    jobs: JobRunner,
    events: EventBus,
) -> None:
    try:
        await _warm_up(schema, settings, sessionmaker, storage, jobs, events)
    except Exception:
        # Not worth refusing to start over: the server works, only colder.
        log.warning("start-up warm-up failed", exc_info=True)


async def _warm_up(
    schema: Schema,
    settings: Settings,
    sessionmaker: async_sessionmaker[AsyncSession],
    storage: Storage,
    jobs: JobRunner,
    events: EventBus,
) -> None:
    count = min(WARM_UP_SLICES, settings.max_slices_per_call)
    context = Context(
        settings=settings,
        sessionmaker=sessionmaker,
        storage=storage,
        actor=Actor(principal=Principal(user="pacs-masks-warm-up", role=Role.READER)),
        jobs=jobs,
        events=events,
        view_urls=ViewUrlSigner.from_settings(settings),
    )
    batches = [
        (
            _REQUEST_URLS,
            [{"sliceIndex": i, "fileSize": 1, "contentMd5": _MD5} for i in range(count)],
        ),
        (_COMPLETE, [{"sliceIndex": i, "width": 1, "height": 1} for i in range(count)]),
    ]
    for document, slices in batches:
        result = await schema.execute(
            document, variable_values={"groupId": "1", "slices": slices}, context_value=context
        )
        codes = {(error.extensions or {}).get("code") for error in result.errors or ()}
        if codes != {"FORBIDDEN"}:
            log.warning("start-up warm-up answered %s instead of FORBIDDEN", codes)
    now = datetime.now(UTC)
    targets = [
        storage.presign_put(
            mask_key(1, 1, index, None, "image/png"),
            content_type="image/png",
            content_md5=_MD5,
            content_length=1,
            expires_in=600,
            now=now,
        )
        for index in range(count)
    ]
    json.dumps(
        [{"url": target.url, "headers": target.headers} for target in targets],
        separators=(",", ":"),
        ensure_ascii=False,
    )
