"""The PACS over DICOMweb (QIDO-RS, WADO-RS, STOW-RS) with the maintained dicomweb-client.

dicomweb-client is synchronous (requests): every call runs in a worker thread so the event
loop keeps serving. Failures become PacsUnavailable or NotFound with the reason in words.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from app.config import Settings
from app.dicom.errors import PacsNotConfigured, PacsUnavailable
from app.dicom.source import SourceSeries, datasets_from_metadata, order_series
from app.errors import NotFound

T = TypeVar("T")
SEG_MODALITY = "SEG"


class Pacs:
    def __init__(self, settings: Settings) -> None:
        if not settings.dicomweb_url:
            raise PacsNotConfigured()
        self.url = settings.dicomweb_url.rstrip("/")
        session = requests.Session()
        if settings.dicomweb_token:
            session.headers["Authorization"] = f"Bearer {settings.dicomweb_token}"
        elif settings.dicomweb_username:
            session.auth = (settings.dicomweb_username, settings.dicomweb_password or "")
        self._session = session
        self._client = DICOMwebClient(self.url, session=session, timeout=settings.dicomweb_timeout)

    def close(self) -> None:
        self._session.close()

    async def _call(self, what: str, function: Callable[[], T]) -> T:
        try:
            return await asyncio.to_thread(function)
        except requests.HTTPError as error:
            status = error.response.status_code if error.response is not None else None
            if status == 404:
                raise NotFound(f"{what}: the PACS has no such object") from error
            raise PacsUnavailable(f"{what}: the PACS answered HTTP {status}") from error
        except requests.RequestException as error:
            raise PacsUnavailable(
                f"{what}: the PACS at {self.url} could not be reached ({type(error).__name__})"
            ) from error

    async def source_series(
        self, study_instance_uid: str, series_instance_uid: str
    ) -> SourceSeries:
        """The series' instance metadata (WADO-RS metadata: no pixel data), in slice order."""
        what = f"series {series_instance_uid} of study {study_instance_uid}"
        try:
            items = await self._call(
                f"reading {what}",
                lambda: self._client.retrieve_series_metadata(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                ),
            )
        except NotFound as error:
            raise NotFound(f"source {what} was not found in the PACS") from error
        datasets = await asyncio.to_thread(datasets_from_metadata, items)
        return order_series(study_instance_uid, series_instance_uid, datasets)

    async def store(self, dataset: Dataset) -> None:
        """STOW-RS, then QIDO-RS for the instance: a STOW answer alone has been seen to
        report success for an instance the PACS did not keep."""
        study, series, sop = (
            str(dataset.StudyInstanceUID),
            str(dataset.SeriesInstanceUID),
            str(dataset.SOPInstanceUID),
        )
        await self._call(
            f"storing SEG {sop}", lambda: self._client.store_instances(datasets=[dataset])
        )
        found = await self._call(
            f"checking SEG {sop}",
            lambda: self._client.search_for_instances(
                study_instance_uid=study,
                series_instance_uid=series,
                search_filters={"SOPInstanceUID": sop},
            ),
        )
        if not found:
            raise PacsUnavailable(
                f"the PACS accepted SEG {sop} (STOW-RS) but does not list it (QIDO-RS)"
            )

    async def retrieve_instance(
        self, study_instance_uid: str, series_instance_uid: str, sop_instance_uid: str
    ) -> Dataset:
        try:
            dataset: Dataset = await self._call(
                f"retrieving instance {sop_instance_uid}",
                lambda: self._client.retrieve_instance(
                    study_instance_uid=study_instance_uid,
                    series_instance_uid=series_instance_uid,
                    sop_instance_uid=sop_instance_uid,
                ),
            )
        except (NotFound, InvalidDicomError) as error:
            # Some PACS answer an unknown instance with an empty multipart body, not 404.
            raise NotFound(
                f"instance {sop_instance_uid} of series {series_instance_uid} was not found "
                "in the PACS"
            ) from error
        return dataset
