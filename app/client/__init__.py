"""The inference workers' client: an async library over the GraphQL API and storage, and the
`pacs-masks upload / validate / watch` commands built on it.

    from app.client import PacsMasksClient, UploadRequest, png_folder, upload

    async with PacsMasksClient(server, token) as client:
        result = await upload(client, UploadRequest(study_instance_uid=...), png_folder(path))
"""

from app.client.api import PacsMasksClient
from app.client.errors import (
    BadInput,
    ClientError,
    ServerRefused,
    StorageRefused,
    TransportFailure,
)
from app.client.sources import (
    Manifest,
    SliceSource,
    load_manifest,
    nifti_volume,
    npy_volume,
    png_folder,
)
from app.client.upload import GroupUpload, UploadRequest, UploadResult, upload

__all__ = [
    "BadInput",
    "ClientError",
    "GroupUpload",
    "Manifest",
    "PacsMasksClient",
    "ServerRefused",
    "SliceSource",
    "StorageRefused",
    "TransportFailure",
    "UploadRequest",
    "UploadResult",
    "load_manifest",
    "nifti_volume",
    "npy_volume",
    "png_folder",
    "upload",
]
