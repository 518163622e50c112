"""Bucket set-up for S3 / MinIO / SeaweedFS: the bucket, CORS for the viewer origins, lifecycle
rules, and the least-privilege IAM policy for the service's credentials.

The documents (CORS rule, lifecycle rules, policy) are built here and nowhere else:
`pacs-masks setup-storage` applies them, `--print-iam-policy` prints the policy, and
docs/iam-policy.json is that output for the default bucket (a test keeps them equal).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from app.storage import KEY_ROOT, StorageRefused

log = logging.getLogger(__name__)

S3Call = Callable[..., Awaitable[dict[str, Any]]]

ABORT_MULTIPART_RULE_ID = "abort-incomplete-multipart"
EXPIRE_MASKS_RULE_ID = "expire-masks"
MASK_PREFIX = f"{KEY_ROOT}/"
OUR_RULE_IDS = frozenset({ABORT_MULTIPART_RULE_ID, EXPIRE_MASKS_RULE_ID})
CORS_MAX_AGE_SECONDS = 3000

# HEAD answers carry no body, so a missing bucket there is just "404".
_NO_SUCH_BUCKET_CODES = frozenset({"NoSuchBucket", "NotFound", "404"})
# Servers without bucket sub-resource APIs answer in several ways: NotImplemented (the S3
# spelling), 405/501, or, as rclone's gofakes3 does, by treating PUT ?cors as CreateBucket.
_UNSUPPORTED_CODES = frozenset(
    {
        "NotImplemented",
        "MethodNotAllowed",
        "501",
        "405",
        "BucketAlreadyExists",
        "BucketAlreadyOwnedByYou",
    }
)


def cors_rule(origins: Sequence[str]) -> dict[str, Any]:
    """Browsers PUT with the signed Content-Type and Content-MD5 and read the ETag back."""
    return {
        "AllowedOrigins": list(origins),
        "AllowedMethods": ["PUT", "GET", "HEAD"],
        "AllowedHeaders": ["Content-Type", "Content-MD5"],
        "ExposeHeaders": ["ETag"],
        "MaxAgeSeconds": CORS_MAX_AGE_SECONDS,
    }


def lifecycle_rules(mask_expiry_days: int | None) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = [
        {
            "ID": ABORT_MULTIPART_RULE_ID,
            "Filter": {"Prefix": MASK_PREFIX},
            "Status": "Enabled",
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        }
    ]
    if mask_expiry_days is not None:
        rules.append(
            {
                "ID": EXPIRE_MASKS_RULE_ID,
                "Filter": {"Prefix": MASK_PREFIX},
                "Status": "Enabled",
                "Expiration": {"Days": mask_expiry_days},
            }
        )
    return rules


def iam_policy(bucket: str) -> dict[str, Any]:
    """What the service's credentials need: objects under mask/ only, listing only that prefix,
    reading and writing the bucket's CORS and lifecycle for setup-storage, and nothing over
    plain HTTP."""
    bucket_arn = f"arn:aws:s3:::{bucket}"
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "MaskObjects",
                "Effect": "Allow",
                "Action": [
                    "s3:PutObject",
                    "s3:GetObject",
                    "s3:DeleteObject",
                    "s3:AbortMultipartUpload",
                ],
                "Resource": f"{bucket_arn}/{MASK_PREFIX}*",
            },
            {
                "Sid": "ListMaskPrefixOnly",
                "Effect": "Allow",
                "Action": "s3:ListBucket",
                "Resource": bucket_arn,
                "Condition": {"StringLike": {"s3:prefix": [f"{MASK_PREFIX}*"]}},
            },
            {
                "Sid": "BucketSetUp",
                "Effect": "Allow",
                "Action": [
                    "s3:GetBucketLocation",
                    "s3:GetBucketCORS",
                    "s3:PutBucketCORS",
                    "s3:GetLifecycleConfiguration",
                    "s3:PutLifecycleConfiguration",
                ],
                "Resource": bucket_arn,
            },
            {
                "Sid": "RefuseInsecureTransport",
                "Effect": "Deny",
                "Action": "s3:*",
                "Resource": [bucket_arn, f"{bucket_arn}/*"],
                "Condition": {"Bool": {"aws:SecureTransport": "false"}},
            },
        ],
    }


async def configure_bucket(
    call: S3Call,
    bucket: str,
    region: str,
    cors_origins: Sequence[str],
    mask_expiry_days: int | None,
) -> None:
    """Idempotent: creates what is missing, replaces our CORS and lifecycle rules, keeps the
    lifecycle rules an operator added."""
    await _create_bucket_if_missing(call, bucket, region)
    if cors_origins:
        await _put_cors(call, bucket, cors_origins)
    await _put_lifecycle(call, bucket, lifecycle_rules(mask_expiry_days))


async def _create_bucket_if_missing(call: S3Call, bucket: str, region: str) -> None:
    try:
        await call("head_bucket", Bucket=bucket)
        return
    except StorageRefused as exc:
        if exc.code not in _NO_SUCH_BUCKET_CODES:
            raise
    params: dict[str, Any] = {"Bucket": bucket}
    if region != "us-east-1":
        params["CreateBucketConfiguration"] = {"LocationConstraint": region}
    try:
        await call("create_bucket", **params)
        log.info("created bucket %s", bucket)
    except StorageRefused as exc:
        if exc.code == "BucketAlreadyOwnedByYou":
            return
        if exc.code == "BucketAlreadyExists":
            # Either another replica won the race (fine) or another account owns the name.
            await call("head_bucket", Bucket=bucket)
            return
        raise


async def _put_cors(call: S3Call, bucket: str, cors_origins: Sequence[str]) -> None:
    try:
        await call(
            "put_bucket_cors",
            Bucket=bucket,
            CORSConfiguration={"CORSRules": [cors_rule(cors_origins)]},
        )
    except StorageRefused as exc:
        if exc.code not in _UNSUPPORTED_CODES:
            raise
        log.warning(
            "storage server does not support bucket CORS (%s); browsers may be refused", exc.code
        )


async def _put_lifecycle(call: S3Call, bucket: str, ours: list[dict[str, Any]]) -> None:
    try:
        current = await call("get_bucket_lifecycle_configuration", Bucket=bucket)
        rules: list[dict[str, Any]] = list(current.get("Rules") or [])
    except StorageRefused as exc:
        if exc.code == "NoSuchLifecycleConfiguration":
            current, rules = {}, []
        elif exc.code in _UNSUPPORTED_CODES:
            _warn_no_lifecycle(exc.code)
            return
        else:
            raise
    # Rules added by operators (transitions, other prefixes) are kept; only ours are replaced.
    others = [rule for rule in rules if rule.get("ID") not in OUR_RULE_IDS]
    present = [rule for rule in rules if rule.get("ID") in OUR_RULE_IDS]
    if sorted(present, key=_rule_id) == sorted(ours, key=_rule_id):
        return
    params: dict[str, Any] = {
        "Bucket": bucket,
        "LifecycleConfiguration": {"Rules": [*others, *ours]},
    }
    # A PUT without it would silently reset an operator's bucket-wide choice.
    if current.get("TransitionDefaultMinimumObjectSize"):
        params["TransitionDefaultMinimumObjectSize"] = current["TransitionDefaultMinimumObjectSize"]
    try:
        await call("put_bucket_lifecycle_configuration", **params)
    except StorageRefused as exc:
        if exc.code not in _UNSUPPORTED_CODES:
            raise
        _warn_no_lifecycle(exc.code)


def _rule_id(rule: dict[str, Any]) -> str:
    return str(rule.get("ID"))


def _warn_no_lifecycle(code: str) -> None:
    log.warning(
        "storage server does not support bucket lifecycle rules (%s); incomplete "
        "multipart uploads will not be aborted automatically",
        code,
    )
