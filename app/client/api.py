"""GraphQL over HTTP to the pacs-masks API, with retries, over one httpx connection pool that
the storage PUTs share (the pool is per origin, so the API token never travels to storage)."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from types import TracebackType
from typing import Any, Self

import httpx

from app.client.errors import (
    StorageUnavailableError,
    TransportFailure,
    server_error,
)

CREATE_ANNOTATION = """mutation($input: CreateAnnotationInput!) {
  createAnnotation(input: $input) { id }
}"""
FIND_ANNOTATION = """query($study: String!, $series: String) {
  annotations(studyInstanceUid: $study, seriesInstanceUid: $series, limit: 1) { id }
}"""
GROUP_FIELDS = "id annotationId sliceCount status uploadedSliceCount totalBytes"
CREATE_GROUP = f"""mutation($input: CreateMaskGroupInput!) {{
  createMaskGroup(input: $input) {{ {GROUP_FIELDS} }}
}}"""
GROUP_STATE = f"""query($id: ID!) {{
  maskGroup(id: $id) {{ {GROUP_FIELDS} missingSliceIndexes masks {{ sliceIndex labelName }} }}
}}"""
GROUP_SUMMARY = f"""query($id: ID!) {{
  maskGroup(id: $id) {{ {GROUP_FIELDS} missingSliceIndexes }}
}}"""
REQUEST_URLS = """mutation($groupId: ID!, $slices: [SliceUploadInput!]!, $ttl: Int) {
  requestMaskUploadUrls(groupId: $groupId, slices: $slices, ttlSeconds: $ttl) {
    sliceIndex labelName url method headers { name value } expiresAt
  }
}"""
COMPLETE = f"""mutation($groupId: ID!, $slices: [CompletedSliceInput!]!) {{
  completeMaskUpload(groupId: $groupId, slices: $slices) {{ maskGroup {{ {GROUP_FIELDS} }} }}
}}"""
REPORT_FIELDS = "status checkedAt problemCount problems { sliceIndex code message }"
VALIDATE = f"""mutation($id: ID!) {{ validateMaskGroup(id: $id) {{ {REPORT_FIELDS} }} }}"""

# Statuses worth another try: the request may not have been served at all.
RETRYABLE_STATUSES = {429, 500, 502, 503, 504}


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    attempts: int = 6
    base_delay: float = 0.2
    max_delay: float = 10.0

    def delay(self, attempt: int) -> float:
        # "Full jitter": concurrent workers that failed together do not retry together.
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


@dataclass(frozen=True, slots=True)
class UploadTarget:
    slice_index: int
    label_name: str | None
    url: str
    method: str
    headers: dict[str, str]
    # time.monotonic() values: measured against the server's clock (Date header) so a skewed
    # client clock cannot make a URL look younger than it is.
    issued_at: float
    deadline: float


class PacsMasksClient:
    def __init__(
        self,
        server: str,
        token: str | None,
        *,
        concurrency: int = 16,
        retry: RetryPolicy | None = None,
        timeout: float = 60.0,
    ) -> None:
        self.server = server.rstrip("/")
        self.retry = retry or RetryPolicy()
        self._auth = {"Authorization": f"Bearer {token}"} if token else {}
        limits = httpx.Limits(
            max_connections=concurrency + 4, max_keepalive_connections=concurrency
        )
        self.http = httpx.AsyncClient(timeout=timeout, limits=limits)

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.http.aclose()

    async def _post(
        self, query: str, variables: dict[str, Any], *, idempotent: bool
    ) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self.http.post(
                    f"{self.server}/graphql",
                    json={"query": query, "variables": variables},
                    headers=self._auth,
                )
            except httpx.TransportError as error:
                # A request that never reached the server can always be sent again; one that
                # may have run (read error) only when running it twice is harmless.
                sent = not isinstance(error, httpx.ConnectError | httpx.ConnectTimeout)
                if (sent and not idempotent) or attempt + 1 >= self.retry.attempts:
                    raise TransportFailure(
                        f"cannot reach {self.server}: {type(error).__name__} {error}".strip()
                    ) from error
            else:
                if response.status_code not in RETRYABLE_STATUSES:
                    return response
                if not idempotent or attempt + 1 >= self.retry.attempts:
                    raise TransportFailure(
                        f"{self.server} answered HTTP {response.status_code} "
                        f"after {attempt + 1} attempt(s)"
                    )
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def gql(
        self, query: str, variables: dict[str, Any] | None = None, *, idempotent: bool = True
    ) -> dict[str, Any]:
        data, _ = await self._gql(query, variables or {}, idempotent=idempotent)
        return data

    async def _gql(
        self, query: str, variables: dict[str, Any], *, idempotent: bool
    ) -> tuple[dict[str, Any], httpx.Response]:
        attempt = 0
        while True:
            response = await self._post(query, variables, idempotent=idempotent)
            try:
                body = response.json()
            except ValueError as error:
                raise TransportFailure(
                    f"{self.server} answered HTTP {response.status_code} without a GraphQL body"
                ) from error
            errors = body.get("errors") if isinstance(body, dict) else None
            if not errors:
                if response.status_code != 200 or not isinstance(body.get("data"), dict):
                    raise TransportFailure(f"{self.server} answered HTTP {response.status_code}")
                data: dict[str, Any] = body["data"]
                return data, response
            refused = server_error(errors[0])
            if not (isinstance(refused, StorageUnavailableError) and idempotent):
                raise refused
            if attempt + 1 >= self.retry.attempts:
                raise refused
            await asyncio.sleep(self.retry.delay(attempt))
            attempt += 1

    async def find_or_create_annotation(
        self, study_instance_uid: str, series_instance_uid: str | None, label: str | None = None
    ) -> str:
        """The newest annotation of the study/series, created when there is none. Two workers
        racing on a new series may each create one; both are valid annotations."""
        found = await self.gql(
            FIND_ANNOTATION, {"study": study_instance_uid, "series": series_instance_uid}
        )
        if found["annotations"]:
            return str(found["annotations"][0]["id"])
        created = await self.gql(
            CREATE_ANNOTATION,
            {
                "input": {
                    "studyInstanceUid": study_instance_uid,
                    "seriesInstanceUid": series_instance_uid,
                    "label": label,
                }
            },
            idempotent=False,
        )
        return str(created["createAnnotation"]["id"])

    async def create_mask_group(self, fields: dict[str, Any]) -> dict[str, Any]:
        data = await self.gql(CREATE_GROUP, {"input": fields}, idempotent=False)
        group: dict[str, Any] = data["createMaskGroup"]
        return group

    async def mask_group(self, group_id: str, *, with_masks: bool = False) -> dict[str, Any] | None:
        data = await self.gql(GROUP_STATE if with_masks else GROUP_SUMMARY, {"id": group_id})
        group: dict[str, Any] | None = data["maskGroup"]
        return group

    async def request_upload_urls(
        self, group_id: str, slices: list[dict[str, Any]], ttl_seconds: int | None = None
    ) -> list[UploadTarget]:
        data, response = await self._gql(
            REQUEST_URLS,
            {"groupId": group_id, "slices": slices, "ttl": ttl_seconds},
            idempotent=True,
        )
        received = time.monotonic()
        server_now = _server_time(response)
        targets = []
        for item in data["requestMaskUploadUrls"]:
            expires_at = _parse_time(item["expiresAt"])
            lifetime = expires_at - (server_now if server_now is not None else time.time())
            targets.append(
                UploadTarget(
                    slice_index=item["sliceIndex"],
                    label_name=item["labelName"],
                    url=item["url"],
                    method=item["method"],
                    headers={header["name"]: header["value"] for header in item["headers"]},
                    issued_at=received,
                    deadline=received + lifetime,
                )
            )
        return targets

    async def complete_upload(self, group_id: str, slices: list[dict[str, Any]]) -> dict[str, Any]:
        data = await self.gql(COMPLETE, {"groupId": group_id, "slices": slices})
        group: dict[str, Any] = data["completeMaskUpload"]["maskGroup"]
        return group

    async def validate_mask_group(self, group_id: str) -> dict[str, Any]:
        data = await self.gql(VALIDATE, {"id": group_id})
        report: dict[str, Any] = data["validateMaskGroup"]
        return report


def _parse_time(value: str) -> float:
    return datetime.fromisoformat(value).timestamp()


def _server_time(response: httpx.Response) -> float | None:
    header = response.headers.get("date")
    if not header:
        return None
    try:
        # Date has whole seconds: count the URL as issued at the end of that second.
        return parsedate_to_datetime(header).timestamp() + 1.0
    except (TypeError, ValueError):
        return None
