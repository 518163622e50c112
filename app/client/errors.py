"""Typed failures of the client. Each kind has the exit code the command line uses:
2 bad input (ours to fix), 3 the server or storage refused, 4 nothing could be reached."""

from __future__ import annotations

from typing import Any, ClassVar


class ClientError(Exception):
    exit_code: ClassVar[int] = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadInput(ClientError):
    """The files, manifest or options given to the client are unusable."""

    exit_code = 2


class ServerRefused(ClientError):
    """The API answered with a GraphQL error; `code` is its `extensions.code`."""

    exit_code = 3
    code: ClassVar[str] = "INTERNAL_SERVER_ERROR"

    def __init__(self, message: str, extensions: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.extensions = extensions or {}

    @property
    def slice_indexes(self) -> list[int]:
        return list(self.extensions.get("sliceIndexes") or [])


class BadUserInputError(ServerRefused):
    code = "BAD_USER_INPUT"


class NotFoundError(ServerRefused):
    code = "NOT_FOUND"


class UnauthenticatedError(ServerRefused):
    code = "UNAUTHENTICATED"


class ForbiddenError(ServerRefused):
    code = "FORBIDDEN"


class ConflictError(ServerRefused):
    code = "CONFLICT"


class UploadIncompleteError(ServerRefused):
    code = "UPLOAD_INCOMPLETE"


class ChecksumMismatchError(ServerRefused):
    code = "CHECKSUM_MISMATCH"


class StorageUnavailableError(ServerRefused):
    code = "STORAGE_UNAVAILABLE"


class InternalServerError(ServerRefused):
    code = "INTERNAL_SERVER_ERROR"


class StorageRefused(ServerRefused):
    """Object storage refused a PUT for a reason other than expiry (e.g. 400 BadDigest)."""

    code = "STORAGE_REFUSED"


class TransportFailure(ClientError):
    """The API or storage could not be reached, or kept failing (5xx) through every retry."""

    exit_code = 4


ERRORS_BY_CODE: dict[str, type[ServerRefused]] = {
    error.code: error
    for error in (
        BadUserInputError,
        NotFoundError,
        UnauthenticatedError,
        ForbiddenError,
        ConflictError,
        UploadIncompleteError,
        ChecksumMismatchError,
        StorageUnavailableError,
        InternalServerError,
    )
}


def server_error(error: dict[str, Any]) -> ServerRefused:
    extensions = error.get("extensions") or {}
    code = str(extensions.get("code") or "INTERNAL_SERVER_ERROR")
    kind = ERRORS_BY_CODE.get(code, ServerRefused)
    refused = kind(str(error.get("message") or code), extensions)
    return refused
