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
    """The request breaks a rule of the API; sent again unchanged it fails again."""

    code = "BAD_USER_INPUT"


class NotFound(AppError):
    code = "NOT_FOUND"


class Unauthenticated(AppError):
    """No usable credentials: a missing, unknown, expired or revoked token, or a bearer token
    the identity provider did not sign for us. Answered with 401 and a Bearer challenge."""

    code = "UNAUTHENTICATED"


class Forbidden(AppError):
    code = "FORBIDDEN"


class Conflict(AppError):
    """The request clashes with what is stored (a slice already registered)."""

    code = "CONFLICT"


class UploadIncomplete(AppError):
    code = "UPLOAD_INCOMPLETE"


class ChecksumMismatch(AppError):
    """Storage holds an object for the slice, but not the one declared: size or MD5 differ.
    The client uploads again with fresh URLs."""

    code = "CHECKSUM_MISMATCH"


class StorageUnavailable(AppError):
    code = "STORAGE_UNAVAILABLE"
