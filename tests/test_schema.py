"""schema.graphql is the exported schema, and it honours the public contract."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONTRACTS = ROOT.parent / "shared" / "specs"


def test_schema_file_is_current() -> None:
    exported = subprocess.run(
        [sys.executable, "-m", "app.cli", "export-schema"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert (ROOT / "schema.graphql").read_text() == exported, (
        "schema.graphql is stale: run `pacs-masks export-schema > schema.graphql`"
    )


@pytest.mark.parametrize("contract", ["contract.graphql", "contract-pacs.graphql"])
def test_schema_honours_the_contract(contract: str) -> None:
    checker = ROOT.parent / "shared" / "tools" / "contract_check.py"
    if not checker.exists():
        pytest.skip("../shared/tools/contract_check.py is not beside this checkout")
    result = subprocess.run(
        [
            sys.executable,
            str(checker),
            str(ROOT / "schema.graphql"),
            str(CONTRACTS / contract),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout
