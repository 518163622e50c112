"""Errors of the PACS features, with their stable codes."""

from __future__ import annotations

from app.errors import AppError


class PacsNotConfigured(AppError):
    code = "PACS_NOT_CONFIGURED"

    def __init__(self) -> None:
        super().__init__(
            "no PACS is configured: set DICOMWEB_URL to the PACS's DICOMweb root "
            "(and DICOMWEB_USERNAME/DICOMWEB_PASSWORD or DICOMWEB_TOKEN if it needs them)"
        )


class PacsUnavailable(AppError):
    code = "PACS_UNAVAILABLE"


class DicomMismatch(AppError):
    """The masks do not fit the source series (counts, dimensions, UIDs, geometry)."""

    code = "DICOM_MISMATCH"
