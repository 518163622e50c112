"""`pacs-masks setup-storage` against SeaweedFS and moto: bucket, CORS and lifecycle read back,
a browser's preflight answered, idempotent, operator rules kept; the IAM policy it prints."""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from commands import clean_env, run_cli
from storage_servers import MotoServer, SeaweedServer

from app.cli_failures import ExitCode

ROOT = Path(__file__).resolve().parent.parent
VIEWER = "http://viewer.hospital.test"
OTHER_VIEWER = "https://pacs.hospital.test"


@dataclass(frozen=True)
class S3Target:
    name: str
    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self) -> Any:
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name="us-east-1",
            config=Config(signature_version="s3v4", s3={"addressing_style": "path"}),
        )

    def env(self, bucket: str, **settings: str) -> dict[str, str]:
        return clean_env(
            STORAGE_PROVIDER="s3",
            S3_ENDPOINT_URL=self.endpoint_url,
            S3_BUCKET_NAME=bucket,
            AWS_ACCESS_KEY_ID=self.access_key,
            AWS_SECRET_ACCESS_KEY=self.secret_key,
            **settings,
        )


@pytest.fixture(params=["seaweedfs", "moto"])
def target(request: pytest.FixtureRequest) -> Iterator[S3Target]:
    if request.param == "seaweedfs":
        seaweed: SeaweedServer = request.getfixturevalue("seaweed_server")
        yield S3Target("seaweedfs", seaweed.endpoint_url, seaweed.access_key, seaweed.secret_key)
    else:
        moto: MotoServer = request.getfixturevalue("moto_server")
        yield S3Target("moto", moto.endpoint_url, "testing", "testing")


def _ok(result: Any) -> str:
    assert result.returncode == 0, result.stderr
    output: str = result.stdout
    return output


def test_setup_storage_creates_bucket_cors_and_lifecycle(target: S3Target, tmp_path: Path) -> None:
    bucket = f"setup-{secrets.token_hex(4)}"
    env = target.env(bucket, CORS_ORIGINS=f"{VIEWER},{OTHER_VIEWER}", S3_MASK_EXPIRY_DAYS="30")
    output = _ok(run_cli(tmp_path, env, "setup-storage"))
    assert f"bucket {bucket} ready" in output
    assert "masks expire after 30 days" in output
    client = target.client()

    [rule] = client.get_bucket_cors(Bucket=bucket)["CORSRules"]
    assert rule["AllowedOrigins"] == [VIEWER, OTHER_VIEWER]
    assert sorted(rule["AllowedMethods"]) == ["GET", "HEAD", "PUT"]
    assert sorted(rule["AllowedHeaders"]) == ["Content-MD5", "Content-Type"]
    assert rule["ExposeHeaders"] == ["ETag"]
    rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(rules, key=lambda rule: rule["ID"]) == [
        {
            "ID": "abort-incomplete-multipart",
            "Filter": {"Prefix": "mask/"},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        },
        {
            "ID": "expire-masks",
            "Filter": {"Prefix": "mask/"},
            "Status": "Enabled",
            "Expiration": {"Days": 30},
        },
    ]

    # An operator's own rule survives; switching expiry off removes ours; running twice is fine.
    operator_rule = {
        "ID": "expire-scratch",
        "Filter": {"Prefix": "scratch/"},
        "Status": "Enabled",
        "Expiration": {"Days": 7},
    }
    client.put_bucket_lifecycle_configuration(
        Bucket=bucket, LifecycleConfiguration={"Rules": [operator_rule, *rules]}
    )
    env = target.env(bucket, CORS_ORIGINS=VIEWER)
    for _ in range(2):
        assert "masks never expire" in _ok(run_cli(tmp_path, env, "setup-storage"))
    rules = client.get_bucket_lifecycle_configuration(Bucket=bucket)["Rules"]
    assert sorted(rule["ID"] for rule in rules) == ["abort-incomplete-multipart", "expire-scratch"]
    assert client.get_bucket_cors(Bucket=bucket)["CORSRules"][0]["AllowedOrigins"] == [VIEWER]


async def test_seaweedfs_answers_a_browser_preflight(
    seaweed_server: SeaweedServer, tmp_path: Path
) -> None:
    """What the viewer's browser asks before its PUT of a mask, and what it must be told."""
    target = S3Target(
        "seaweedfs",
        seaweed_server.endpoint_url,
        seaweed_server.access_key,
        seaweed_server.secret_key,
    )
    bucket = f"preflight-{secrets.token_hex(4)}"
    _ok(run_cli(tmp_path, target.env(bucket, CORS_ORIGINS=VIEWER), "setup-storage"))
    url = f"{target.endpoint_url}/{bucket}/mask/1/2/slice_00000.png"
    async with httpx.AsyncClient() as browser:
        allowed = await browser.options(
            url,
            headers={
                "Origin": VIEWER,
                "Access-Control-Request-Method": "PUT",
                "Access-Control-Request-Headers": "content-type,content-md5",
            },
        )
        stranger = await browser.options(
            url,
            headers={"Origin": "https://elsewhere.test", "Access-Control-Request-Method": "PUT"},
        )
    assert allowed.status_code == 200
    assert allowed.headers["Access-Control-Allow-Origin"] == VIEWER
    assert "PUT" in allowed.headers["Access-Control-Allow-Methods"]
    allowed_headers = allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "content-md5" in allowed_headers
    assert "content-type" in allowed_headers
    assert allowed.headers["Access-Control-Expose-Headers"] == "ETag"
    assert "Access-Control-Allow-Origin" not in stranger.headers


def test_iam_policy_is_printed_from_the_one_definition(tmp_path: Path) -> None:
    printed = _ok(run_cli(tmp_path, clean_env(), "setup-storage", "--print-iam-policy"))
    # docs/iam-policy.json is this output for the default bucket, byte for byte.
    assert printed == (ROOT / "docs" / "iam-policy.json").read_text()
    other = _ok(
        run_cli(
            tmp_path,
            clean_env(S3_BUCKET_NAME="radiology-masks"),
            "setup-storage",
            "--print-iam-policy",
        )
    )
    policy = json.loads(other)
    assert policy["Statement"][0]["Resource"] == "arn:aws:s3:::radiology-masks/mask/*"
    assert "pacs-masks" not in other


def test_unreachable_storage_fails_with_one_line(tmp_path: Path) -> None:
    env = clean_env(
        STORAGE_PROVIDER="s3",
        S3_ENDPOINT_URL="http://127.0.0.1:9",
        AWS_ACCESS_KEY_ID="x",
        AWS_SECRET_ACCESS_KEY="y",
    )
    result = run_cli(tmp_path, env, "setup-storage")
    assert result.returncode == ExitCode.STORAGE
    assert "Traceback" not in result.stderr
    [line] = [line for line in result.stderr.splitlines() if line.startswith("pacs-masks:")]
    assert "storage unavailable" in line


def test_invalid_settings_fail_with_one_line(tmp_path: Path) -> None:
    result = run_cli(tmp_path, clean_env(S3_MASK_EXPIRY_DAYS="0"), "setup-storage")
    assert result.returncode == ExitCode.CONFIGURATION
    assert result.stderr.strip() == (
        "pacs-masks: invalid setting: S3_MASK_EXPIRY_DAYS: "
        "Input should be greater than or equal to 1; fix the environment or .env"
    )


def test_setup_storage_on_the_embedded_default_makes_the_folder(tmp_path: Path) -> None:
    output = _ok(run_cli(tmp_path, clean_env(), "setup-storage"))
    assert output.strip() == f"pacs-masks: local storage ready in {tmp_path / 'var' / 'storage'}"
    assert (tmp_path / "var" / "storage").is_dir()
