"""The import graph of app/: one direction, no cycles, counting every import statement wherever
it stands (inside functions and `if TYPE_CHECKING:` blocks too).

Read from the source with `ast` rather than by importing: an import inside a function never
runs at import time, which is exactly how cycles hide."""

from __future__ import annotations

import ast
import graphlib
import subprocess
import sys
from pathlib import Path

APP = Path(__file__).resolve().parent.parent / "app"


def _module_name(path: Path) -> str:
    parts = path.relative_to(APP.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(APP.rglob("*.py"))}


def _imported(node: ast.Import | ast.ImportFrom) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level or node.module is None:
        raise AssertionError(f"relative import at line {node.lineno}: use absolute imports")
    # `from app import masks` imports the module app.masks; `from app.x import y` imports app.x.
    submodules = [f"{node.module}.{alias.name}" for alias in node.names]
    return [name for name in submodules if name in MODULES] or [node.module]


def _imports(path: Path) -> dict[str, list[int]]:
    """app modules imported by the file, with the line numbers of the import statements."""
    found: dict[str, list[int]] = {}
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import | ast.ImportFrom):
            for name in _imported(node):
                if name in MODULES:
                    found.setdefault(name, []).append(node.lineno)
    return found


GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """The modules of an import cycle, if there is one (the standard library's graphlib finds
    it; one cycle at a time is enough to fail and to name)."""
    try:
        graphlib.TopologicalSorter(
            {name: list(targets) for name, targets in GRAPH.items()}
        ).prepare()
    except graphlib.CycleError as error:
        return [sorted(set(error.args[1]))]
    return []


def test_the_graph_is_read() -> None:
    # A parser that found nothing would pass the other tests vacuously.
    assert "app.main" in MODULES
    assert "app.models" in GRAPH["app.main"] or "app.graphql.schema" in GRAPH["app.main"]
    assert "app.principals" in GRAPH["app.models"]


def test_no_import_cycles_in_app() -> None:
    assert _cycles() == []


# The modules that load the DICOM stack (highdicom, pydicom, NumPy, dicomweb-client: ~70 MB
# per process) are imported where an export or import runs, so a server process that never
# exports does not carry it. They still count in the layers and cycles above.
LOADED_WHEN_USED = {"app.dicom.imports", "app.dicom.pacs", "app.dicom.seg", "app.dicom.source"}


def test_app_modules_are_imported_at_module_top() -> None:
    nested: list[str] = []
    for name, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        top = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            is_nested = isinstance(node, ast.Import | ast.ImportFrom) and id(node) not in top
            if is_nested and {t for t in _imported(node) if t in MODULES} - LOADED_WHEN_USED:
                nested.append(f"{name}:{node.lineno}")
    assert nested == []


def test_a_server_process_does_not_load_the_dicom_stack() -> None:
    # What `pacs-masks serve` and each of its workers import before any request.
    loaded = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, app.main, app.cli, app.workers; print(' '.join(sorted(sys.modules)))",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"highdicom", "pydicom", "dicomweb_client"} & set(loaded) == set()


def test_cycle_detection_finds_a_hidden_cycle() -> None:
    # The detector itself, on a pair that imports each other only inside a function.
    graph = {"a": {"b": [1]}, "b": {"a": [3]}, "c": {"a": [1]}}
    original = dict(GRAPH)
    GRAPH.clear()
    GRAPH.update(graph)
    try:
        assert _cycles() == [["a", "b"]]
    finally:
        GRAPH.clear()
        GRAPH.update(original)


# Lowest first; a module imports only from its own layer or those before it. A new module
# must be placed here, which is the moment to decide where it belongs.
LAYERS = [
    # The inference workers' client: lowest, so it can import none of the server's modules.
    (
        "client library",
        {
            "app.client",
            "app.client.api",
            "app.client.cli",
            "app.client.errors",
            "app.client.sources",
            "app.client.upload",
            "app.client.watch",
        },
    ),
    ("base", {"app.config", "app.errors", "app.dicom.errors"}),
    (
        "models and storage",
        {
            "app.db",
            "app.models",
            "app.principals",
            "app.storage",
            "app.s3",
            "app.sigv4",
            "app.local_storage",
            "app.bucket_setup",
            # Counters only; the domain counts what it does where it happens.
            "app.metrics",
        },
    ),
    (
        "domain",
        {
            "app.annotations",
            "app.upload_urls",
            "app.completion",
            "app.deletion",
            "app.restoration",
            "app.slices",
            "app.validation",
            "app.group_validation",
            "app.validation_job",
            "app.json_input",
            "app.tokens",
            "app.audit",
            "app.oidc",
            "app.events",
            "app.view_urls",
            "app.jobs",
            "app.sweeper",
            "app.readiness",
            "app.log_redaction",
            "app.logging_setup",
            "app.gc_tuning",
            "app.usage",
            # DICOM SEG: domain reads, storage and the PACS; transport calls it.
            "app.dicom",
            "app.dicom.refs",
            "app.dicom.source",
            "app.dicom.pacs",
            "app.dicom.seg",
            "app.dicom.seg_volume",
            "app.dicom.export",
            "app.dicom.imports",
        },
    ),
    (
        "transport",
        {
            "app.main",
            "app.warmup",
            "app.state",
            "app.routes",
            "app.auth",
            "app.cli",
            "app.cli_failures",
            "app.workers",
            "app.access",
            "app.metrics_http",
            "app.slow_clients",
            "app.static_routes",
            "app.dicom.routes",
            "app.dicom.cli",
        },
    ),
]


def _layer(module: str) -> int:
    if module in ("app", "app.graphql") or module.startswith("app.graphql."):
        return len(LAYERS) - 1
    for position, (_, members) in enumerate(LAYERS):
        if module in members:
            return position
    raise AssertionError(f"{module} is in no layer: add it to LAYERS in tests/test_layout.py")


def test_imports_go_one_way() -> None:
    upward = [
        f"{name} ({LAYERS[_layer(name)][0]}) imports {target} ({LAYERS[_layer(target)][0]})"
        for name, targets in GRAPH.items()
        for target in targets
        if _layer(target) > _layer(name)
    ]
    assert upward == []
