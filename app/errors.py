from __future__ import annotations

from collections.abc import Iterable
from typing import Any, ClassVar


class AppError(Exception):
    """An expected failure, reported to clients with a stable `extensions.code`."""

    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str, *, slice_indexes: Iterable[int] = (), **extra: Any) -> None:
        super().__init__(message)
        self.message = message
        self.slice_indexes = sorted(set(slice_indexes))
        self.extra = extra

    @property
    def extensions(self) -> dict[str, Any]:
        extensions: dict[str, Any] = {"code": self.code, **self.extra}
        if self.slice_indexes:
            extensions["sliceIndexes"] = self.slice_indexes
        return extensions


class BadUserInput(AppError):
    code = "BAD_USER_INPUT"


class NotFound(AppError):
    code = "NOT_FOUND"


class Unauthenticated(AppError):
    code = "UNAUTHENTICATED"


class Forbidden(AppError):
    code = "FORBIDDEN"


class Conflict(AppError):
    code = "CONFLICT"


class UploadIncomplete(AppError):
    code = "UPLOAD_INCOMPLETE"


class ChecksumMismatch(AppError):
    code = "CHECKSUM_MISMATCH"


class StorageUnavailable(AppError):
    code = "STORAGE_UNAVAILABLE"
