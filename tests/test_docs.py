"""Documents that operators copy from must be right."""

from __future__ import annotations

import json
from pathlib import Path

from app.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def test_iam_policy_limits_objects_to_the_mask_prefix() -> None:
    policy = json.loads((ROOT / "docs" / "iam-policy.json").read_text())
    allows = [statement for statement in policy["Statement"] if statement["Effect"] == "Allow"]
    for statement in allows:
        actions = (
            statement["Action"] if isinstance(statement["Action"], list) else [statement["Action"]]
        )
        object_actions = [action for action in actions if "Object" in action]
        if object_actions:
            assert statement["Resource"] == "arn:aws:s3:::pacs-masks/mask/*"
        if "s3:ListBucket" in actions:
            assert statement["Condition"]["StringLike"]["s3:prefix"] == ["mask/*"]
        assert "s3:*" not in actions
    denies = [statement for statement in policy["Statement"] if statement["Effect"] == "Deny"]
    assert denies[0]["Condition"]["Bool"]["aws:SecureTransport"] == "false"


def test_security_page_names_every_audit_action() -> None:
    page = (ROOT / "docs" / "security.md").read_text()
    for action in (
        "annotation.create",
        "mask_group.create",
        "upload_urls.issue",
        "upload.complete",
        "mask_group.delete",
        "mask_group.validate",
        "token.create",
        "token.revoke",
    ):
        assert f"`{action}`" in page


def test_limits_are_documented_with_their_defaults() -> None:
    defaults = Settings(_env_file=None)
    readme = (ROOT / "README.md").read_text()
    security = (ROOT / "docs" / "security.md").read_text()
    limits = security[security.index("## Limits") :]
    for name in (
        "max_query_cost",
        "max_request_bytes",
        "max_json_input_bytes",
        "max_query_depth",
        "max_query_aliases",
        "max_query_tokens",
        "max_slices_per_call",
    ):
        setting = f"`{name.upper()}`"
        assert f"| {setting} | `{getattr(defaults, name)}` |" in readme, name
        assert f"| {setting} |" in limits, name
