"""The benchmark harness's own plumbing (no benchmark runs here, nothing is timed): every bench
script writes --json, bench/results.py knows them all and renders their figures as tables."""

from __future__ import annotations

import ast
import sys
from datetime import UTC, datetime
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

from results import BENCHES, Bench, Outcome, render, supports_json

# Modules that other bench scripts import; they are not benchmarks themselves.
LIBRARIES = {"figures", "harness", "results"}


def scripts() -> list[Path]:
    """bench/*.py that run as a program."""
    return [
        path
        for path in sorted(BENCH.glob("*.py"))
        if path.stem not in LIBRARIES and '__name__ == "__main__"' in path.read_text()
    ]


def test_every_bench_script_writes_json() -> None:
    assert scripts()
    lacking = [path.name for path in scripts() if not supports_json(path)]
    assert lacking == []


def test_results_runs_every_bench_script() -> None:
    listed = {bench.name for bench in BENCHES}
    # peers.py's comparisons run inside load.py, on the same server and data.
    missing = [path.stem for path in scripts() if path.stem not in listed | {"peers"}]
    assert missing == []


def test_bench_scripts_parse_a_json_argument() -> None:
    """--json is a real argparse option, not a word in a docstring."""
    for path in scripts():
        tree = ast.parse(path.read_text())
        calls = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.Call)
            and (
                (isinstance(node.func, ast.Name) and node.func.id == "add_json_argument")
                or (
                    isinstance(node.func, ast.Attribute)
                    and node.func.attr == "add_argument"
                    and any(
                        isinstance(arg, ast.Constant) and arg.value == "--json" for arg in node.args
                    )
                )
            )
        ]
        assert calls, path.name


def test_render_makes_a_table_per_bench() -> None:
    figures = [
        {"name": "viewers p95", "value": 180.5, "unit": "ms", "goal": "<= 200 ms", "ok": True},
        {"name": "errors", "value": 3, "unit": "", "goal": "<= 0", "ok": False, "note": "a|b"},
        {"name": "requests/s", "value": 63.3, "unit": "req/s"},
    ]
    outcomes = [
        Outcome(Bench("load"), 70.0, {"title": "Load", "figures": figures, "context": {}}),
        Outcome(Bench("gone"), problem="bench/gone.py is not on this branch"),
    ]
    environment = {"cores": 2, "cpu": "AMD EPYC", "postgraphile": "4.14.1"}
    text = render(datetime(2026, 11, 25, 8, 0, tzinfo=UTC), environment, outcomes, ["noisy"])
    lines = text.splitlines()
    assert "Date: 2026-11-25 08:00 UTC." in lines
    assert "| PostGraphile | 4.14.1 |" in lines
    assert "- noisy" in lines
    assert "Goals: 1 met, 1 not met." in lines
    assert "## bench/load.py: Load" in lines
    assert "| viewers p95 | 180 ms | <= 200 ms | met |  |" in lines
    assert "| errors | 3 | <= 0 | **not met** | a\\|b |" in lines
    assert "| requests/s | 63.3 req/s |  |  |  |" in lines
    assert "No figures: bench/gone.py is not on this branch." in lines
