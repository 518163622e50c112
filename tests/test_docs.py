"""Documents that operators copy from must be right."""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path

from graphql import build_schema, parse, validate
from sqlalchemy import text

from app.cli import build_parser
from app.config import Settings
from app.db import create_engine, upgrade_database

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
        "mask_group.restore",
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


def _documents() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _prose(text: str) -> str:
    """The text a Markdown renderer turns into links: fenced blocks and code spans removed."""
    text = re.sub(r"(?ms)^```.*?^```", "", text)
    return re.sub(r"`[^`\n]*`", "", text)


def test_no_link_leaves_the_repository() -> None:
    """A clone has nothing but the repository: links to ../shared, or to the internet, are
    dead for its readers (the contract they see is schema.graphql)."""
    leaving: list[str] = []
    for document in _documents():
        text = document.read_text()
        name = document.relative_to(ROOT).as_posix()
        if "../shared" in text:
            leaving.append(f"{name}: mentions ../shared")
        prose = _prose(text)
        targets = re.findall(r"\]\(\s*([^)\s]+)", prose)
        targets += re.findall(r"(?m)^\s*\[[^\]]+\]:\s*(\S+)", prose)
        targets += re.findall(r"<([a-z][a-z0-9+.-]*:[^>\s]+)>", prose)
        # Bare URLs outside code: renderers link them by themselves.
        targets += re.findall(r"(?<![(<\w])(?:https?|ftp)://[^\s)>\]]+", prose)
        for target in targets:
            path = target.split("#", 1)[0]
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.IGNORECASE):
                leaving.append(f"{name}: {target} is outside the repository")
            elif path:
                resolved = (document.parent / path).resolve()
                if not resolved.is_relative_to(ROOT):
                    leaving.append(f"{name}: {target} is outside the repository")
                elif not resolved.exists():
                    leaving.append(f"{name}: {target} does not exist")
    assert leaving == []


SPEC = ROOT / "docs" / "specs" / "pacs_mask_upload_v2.md"


def test_spec_examples_are_valid_against_the_schema() -> None:
    schema = build_schema((ROOT / "schema.graphql").read_text())
    examples = re.findall(r"```graphql\n(.*?)```", SPEC.read_text(), re.DOTALL)
    assert len(examples) >= 9
    for example in examples:
        assert validate(schema, parse(example)) == [], example


def test_spec_covers_the_seed_deliverable() -> None:
    text = SPEC.read_text()
    for heading in (
        "Architecture",
        "Data model",
        "Key rule",
        "API, with examples",
        "Flows",
        "Security model",
        "Limits",
        "Performance",
    ):
        assert re.search(rf"(?m)^## \d+\. {re.escape(heading)}$", text), heading
    diagrams = re.findall(r"```mermaid\n(.*?)```", text, re.DOTALL)
    sequences = [diagram for diagram in diagrams if diagram.startswith("sequenceDiagram")]
    assert len(sequences) == 2  # the viewer's flow and the inference flow
    # Every setting a limit names exists.
    for name in re.findall(r"`([A-Z][A-Z_]+)`", text[text.index("## 7. Limits") :]):
        assert name.lower() in Settings.model_fields, name


OPERATIONS = ROOT / "docs" / "operations.md"


def test_runbook_has_every_entry() -> None:
    text = OPERATIONS.read_text()
    for heading in (
        "## Storage sweeper and orphans",
        "## Restoring a deleted group",
        "## PACS: DICOM SEG export and import",
        "### Storage down",
        "### Database down",
        "### Expired URLs",
        "### Orphans and the sweeper",
        "### Restoring a deleted group",
        "### Rotating S3 credentials and tokens",
        "### Changing the S3 prefix policy",
        "### Backup and restore of database and bucket together",
        "### Upgrading with migrations",
        "### Reading the metrics and logs",
    ):
        assert f"\n{heading}\n" in text, heading


def test_documented_commands_exist() -> None:
    """Every `pacs-masks COMMAND --option` the documents show is one the CLI accepts."""
    parser = build_parser()
    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    ).choices
    for document in _documents():
        for line in re.findall(r"pacs-masks ([a-z][a-z-]+[^\n`|]*)", document.read_text()):
            words = line.split()
            name = words[0]
            if name in ("serve", "migrate") or name in commands:
                options = {word.split("=")[0] for word in words[1:] if word.startswith("--")}
                known = {
                    option for action in commands[name]._actions for option in action.option_strings
                }
                assert options <= known, f"{document.name}: pacs-masks {line}"
            else:
                assert not re.fullmatch(r"[a-z]+(-[a-z]+)+", name) or name in commands, (
                    f"{document.name}: pacs-masks {name} is no command"
                )


async def test_runbook_queries_run(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'runbook.db'}"
    await asyncio.to_thread(upgrade_database, url)
    queries = [
        statement.strip()
        for block in re.findall(r"```sql\n(.*?)```", OPERATIONS.read_text(), re.DOTALL)
        for statement in block.split(";")
        if statement.strip()
    ]
    # ... and the inline ones (`SELECT ... FROM ...`), not prose that quotes SQL syntax.
    inline = re.findall(r"`(SELECT [^`]+ FROM [^`]+)`", OPERATIONS.read_text().replace("\n", " "))
    queries += inline
    assert len(queries) >= 4
    engine = create_engine(url)
    try:
        async with engine.connect() as connection:
            for query in queries:
                await connection.execute(text(query))
    finally:
        await engine.dispose()
