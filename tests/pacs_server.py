"""A real PACS for tests: Debian's Orthanc with its DICOMweb plugin, one per test session.

Orthanc runs unprivileged from a temporary JSON config on a free loopback port, with the DICOM
port off and a test user (so the client's basic auth is exercised); it is stopped by PID.
`synthetic_ct_series` makes a small CT series with real geometry for it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import http.client
import json
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import unavailable
from dicomweb_client.api import DICOMwebClient
from pydicom.dataset import Dataset, FileMetaDataset, validate_file_meta
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from storage_servers import _free_port

ORTHANC = Path("/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
START_TIMEOUT_SECONDS = 30.0
PACS_USER = "pacs-test"


@dataclass(frozen=True)
class OrthancServer:
    base_url: str
    dicomweb_url: str
    username: str
    password: str
    pid: int

    def request(self, method: str, path: str) -> tuple[int, bytes]:
        """Orthanc's own REST API (outside DICOMweb), e.g. to delete what a test stored."""
        host, port = self.base_url.removeprefix("http://").split(":")
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        token = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        try:
            connection.request(method, path, headers={"Authorization": f"Basic {token}"})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()


def _answers(host: str, port: int, authorization: str) -> bool:
    connection = http.client.HTTPConnection(host, port, timeout=1)
    try:
        connection.request("GET", "/system", headers={"Authorization": authorization})
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


@pytest.fixture(scope="session")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    if not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists():
        unavailable("Orthanc is not installed (apt-get install orthanc orthanc-dicomweb)")
    base = tmp_path_factory.mktemp("orthanc")
    password = secrets.token_hex(12)
    port = _free_port()
    config = {
        "Name": "pacs-masks-test",
        "StorageDirectory": str(base / "storage"),
        "IndexDirectory": str(base / "index"),
        "HttpPort": port,
        "RemoteAccessAllowed": False,
        "DicomServerEnabled": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {PACS_USER: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "StableAge": 1,
    }
    config_path = base / "orthanc.json"
    config_path.write_text(json.dumps(config))
    log_path = base / "orthanc.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [str(ORTHANC), str(config_path)],
            cwd=base,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    authorization = "Basic " + base64.b64encode(f"{PACS_USER}:{password}".encode()).decode()
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not _answers("127.0.0.1", port, authorization):
        if process.poll() is not None or time.monotonic() > deadline:
            _stop(process)
            tail = ""
            with contextlib.suppress(OSError):
                tail = log_path.read_text(errors="replace")[-2000:]
            unavailable(f"Orthanc did not start: {tail or 'no output'}")
        time.sleep(0.1)
    base_url = f"http://127.0.0.1:{port}"
    try:
        yield OrthancServer(
            base_url=base_url,
            dicomweb_url=f"{base_url}/dicom-web",
            username=PACS_USER,
            password=password,
            pid=process.pid,
        )
    finally:
        _stop(process)


@dataclass(frozen=True)
class CtSeries:
    study_instance_uid: str
    series_instance_uid: str
    # In slice order along the normal (sliceIndex 0 first).
    datasets: list[Dataset]

    @property
    def sop_instance_uids(self) -> list[str]:
        return [str(dataset.SOPInstanceUID) for dataset in self.datasets]


def synthetic_ct_series(slices: int = 24, size: int = 64, *, tilted: bool = True) -> CtSeries:
    """A CT series with real geometry: a slightly tilted axial stack, slices 2.5 mm apart,
    stored with instance numbers that do not follow the geometry (so nobody may rely on them)."""
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    angle = 0.1 if tilted else 0.0
    row_direction = np.array([1.0, 0.0, 0.0])
    column_direction = np.array([0.0, np.cos(angle), -np.sin(angle)])
    normal = np.cross(row_direction, column_direction)
    origin = np.array([-40.0, -40.0, 100.0])
    datasets = []
    rng = np.random.default_rng(7)
    for index in range(slices):
        dataset = Dataset()
        dataset.file_meta = FileMetaDataset()
        dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        dataset.file_meta.MediaStorageSOPClassUID = CTImageStorage
        dataset.SOPClassUID = CTImageStorage
        dataset.SOPInstanceUID = generate_uid()
        dataset.file_meta.MediaStorageSOPInstanceUID = dataset.SOPInstanceUID
        # A whole Part 10 file (the PACS keeps and returns what it was sent).
        dataset.preamble = b"\0" * 128
        validate_file_meta(dataset.file_meta, enforce_standard=True)
        dataset.StudyInstanceUID = study
        dataset.SeriesInstanceUID = series
        dataset.FrameOfReferenceUID = frame_of_reference
        dataset.PositionReferenceIndicator = ""
        dataset.Modality = "CT"
        dataset.PatientName = "Synthetic^Phantom"
        dataset.PatientID = "PACS-MASKS-TEST"
        dataset.PatientBirthDate = "19700101"
        dataset.PatientSex = "O"
        dataset.StudyDate = "20260101"
        dataset.StudyTime = "120000"
        dataset.StudyID = "1"
        dataset.AccessionNumber = "A1"
        dataset.ReferringPhysicianName = ""
        dataset.SeriesNumber = 1
        dataset.InstanceNumber = slices - index
        dataset.Manufacturer = "pacs-masks tests"
        dataset.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        dataset.KVP = 120
        dataset.AcquisitionNumber = 1
        dataset.ImageOrientationPatient = [*row_direction.tolist(), *column_direction.tolist()]
        position = origin + normal * 2.5 * index
        dataset.ImagePositionPatient = [round(float(value), 6) for value in position]
        dataset.SliceLocation = round(float(position[2]), 6)
        dataset.PixelSpacing = [1.25, 1.25]
        dataset.SliceThickness = 2.5
        dataset.Rows = size
        dataset.Columns = size
        dataset.SamplesPerPixel = 1
        dataset.PhotometricInterpretation = "MONOCHROME2"
        dataset.BitsAllocated = 16
        dataset.BitsStored = 16
        dataset.HighBit = 15
        dataset.PixelRepresentation = 1
        dataset.RescaleIntercept = 0
        dataset.RescaleSlope = 1
        dataset.RescaleType = "HU"
        dataset.PixelData = rng.integers(-1000, 1000, (size, size), dtype=np.int16).tobytes()
        datasets.append(dataset)
    return CtSeries(study, series, datasets)


async def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's (dicom3tools) error lines for a DICOM file; its warnings are allowed."""
    if shutil.which("dciodvfy") is None:
        unavailable("dciodvfy is not installed (apt-get install dicom3tools)")
    checked = await asyncio.to_thread(
        subprocess.run, ["dciodvfy", str(path)], capture_output=True, text=True, check=False
    )
    return [line for line in checked.stderr.splitlines() if line.startswith("Error")]


def dicomweb_client(server: OrthancServer) -> DICOMwebClient:
    session = requests.Session()
    session.auth = (server.username, server.password)
    return DICOMwebClient(server.dicomweb_url, session=session)


def store_series(server: OrthancServer, series: CtSeries) -> None:
    """STOW-RS, then QIDO-RS: a STOW answer alone has been seen to claim what was not stored."""
    client = dicomweb_client(server)
    client.store_instances(series.datasets)
    found = client.search_for_instances(
        study_instance_uid=series.study_instance_uid,
        series_instance_uid=series.series_instance_uid,
    )
    assert len(found) == len(series.datasets), "Orthanc did not keep the whole series"


@pytest.fixture(scope="session")
def ct_series(orthanc: OrthancServer) -> CtSeries:
    """24 slices of 64x64, stored in the session's Orthanc."""
    series = synthetic_ct_series()
    store_series(orthanc, series)
    return series
