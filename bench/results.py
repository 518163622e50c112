"""Runs every benchmark of `BENCHES` with `--json` and writes bench/RESULTS.md: the date, the
machine and the peers' versions, then one table per benchmark (figure, value, goal, met, note).

    .venv/bin/python bench/results.py [--only load,run] [--output bench/RESULTS.md]
        [--keep-json DIR] [--from-json DIR]

A benchmark joins by one line in `BENCHES` (its script must accept `--json PATH`, see
bench/figures.py). Each runs alone in its own process, one after the other, so their figures
do not disturb each other; a missing script or a failed run is written down, not fatal.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from figures import machine

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Bench:
    name: str  # the script is bench/<name>.py
    args: list[str] = field(default_factory=list)
    timeout: float = 1800
    about: str = ""


BENCHES = [
    Bench("load", about="goal 1 (50 viewers + 2 uploads); goals 2 and 3 beside PostGraphile"),
    Bench("small_trees", about="small trees at concurrency 8 and 50"),
    Bench("big_trees", about="10 x 1000 and 10 x 10,000 trees: time and peak memory"),
    Bench("batches", about="requestMaskUploadUrls / completeMaskUpload batches, GC"),
    Bench("run", ["--repeat", "3"], about="the server's own figures (Server-Timing), moto"),
    Bench("upload_cli", about="`pacs-masks upload` end to end"),
    Bench("viewer", ["--repeat", "3"], about="the web viewer in headless Chromium"),
    Bench("seg_export", about="DICOM SEG export of 500 slices"),
    Bench("admission", about="admission checks before authentication"),
]


@dataclass
class Outcome:
    bench: Bench
    seconds: float = 0.0
    data: dict[str, Any] | None = None
    problem: str | None = None  # why there are no figures


def supports_json(script: Path) -> bool:
    text = script.read_text()
    return '"--json"' in text or "add_json_argument(" in text


def run_bench(bench: Bench, json_dir: Path) -> Outcome:
    script = HERE / f"{bench.name}.py"
    if not script.exists():
        return Outcome(bench, problem=f"bench/{bench.name}.py is not on this branch")
    if not supports_json(script):
        return Outcome(bench, problem=f"bench/{bench.name}.py has no --json yet")
    out = json_dir / f"{bench.name}.json"
    log = json_dir / f"{bench.name}.log"
    command = [sys.executable, str(script), *bench.args, "--json", str(out)]
    print(f"== {' '.join(['bench/' + script.name, *bench.args])}", flush=True)
    started = time.monotonic()
    with log.open("w") as output:
        try:
            # Its own output goes to the log and to the console, as it comes.
            process = subprocess.Popen(
                command,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                cwd=HERE.parent,
            )
            assert process.stdout is not None
            deadline = threading.Timer(bench.timeout, process.kill)
            deadline.start()
            try:
                for line in process.stdout:
                    output.write(line)
                    print(f"   {line}", end="", flush=True)
                returncode = process.wait()
            finally:
                deadline.cancel()
        except OSError as error:
            return Outcome(bench, problem=f"could not run: {error}")
    seconds = time.monotonic() - started
    if returncode != 0 or not out.exists():
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["no output"]
        return Outcome(bench, seconds, problem=f"failed (exit {returncode}): {tail[0][:300]}")
    return Outcome(bench, seconds, data=json.loads(out.read_text()))


def version_of(command: list[str]) -> str:
    if shutil.which(command[0]) is None and not Path(command[0]).exists():
        return "not installed"
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0].strip() if lines else "unknown"


def package_version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


async def postgres_version() -> str:
    import asyncpg
    from harness import ADMIN_URL

    try:
        connection = await asyncpg.connect(ADMIN_URL)
    except (OSError, asyncpg.PostgresError) as error:
        return f"unreachable ({error})"
    try:
        return str(await connection.fetchval("SHOW server_version"))
    finally:
        await connection.close()


def environment() -> dict[str, Any]:
    """The machine, and the version of every peer the figures depend on."""
    from harness import weed_version
    from peers import CACHE

    postgraphile = CACHE / "postgraphile" / "node_modules" / "postgraphile" / "package.json"
    return {
        **machine(),
        "postgresql": asyncio.run(postgres_version()),
        "node": version_of(["node", "--version"]),
        "postgraphile": json.loads(postgraphile.read_text())["version"]
        if postgraphile.exists()
        else "not installed (bench/peers.py installs it)",
        "seaweedfs": weed_version(),
        "moto": package_version("moto"),
        "chromium": version_of(["chromium", "--version"]),
        "wrk": version_of(["wrk", "-v"]),
        "uvicorn": package_version("uvicorn"),
        "strawberry-graphql": package_version("strawberry-graphql"),
    }


def number(value: float) -> str:
    if not math.isfinite(value):
        return str(value)
    if value == int(value):
        return f"{int(value):,}"
    size = abs(value)
    digits = 0 if size >= 100 else 1 if size >= 10 else 2 if size >= 0.1 else 3
    return f"{value:,.{digits}f}"


def cell(text: Any) -> str:
    return "" if text is None else str(text).replace("|", "\\|").replace("\n", " ")


def verdict(ok: bool | None) -> str:
    return {True: "met", False: "**not met**", None: ""}[ok]


def table(data: dict[str, Any]) -> list[str]:
    lines = ["| figure | value | goal | met | note |", "| --- | --- | --- | --- | --- |"]
    for item in data.get("figures", []):
        value = item.get("value")
        shown = number(float(value)) if isinstance(value, int | float) else cell(value)
        unit = item.get("unit") or ""
        lines.append(
            f"| {cell(item.get('name'))} | {shown} {cell(unit)}".rstrip()
            + f" | {cell(item.get('goal'))} | {verdict(item.get('ok'))} | {cell(item.get('note'))} |"
        )
    return lines


MACHINE_ROWS = [
    ("cores", "cores"),
    ("CPU", "cpu"),
    ("memory", "memory_gib"),
    ("kernel", "kernel"),
    ("Python", "python"),
    ("PostgreSQL", "postgresql"),
    ("Node", "node"),
    ("PostGraphile", "postgraphile"),
    ("SeaweedFS", "seaweedfs"),
    ("moto", "moto"),
    ("Chromium", "chromium"),
    ("wrk", "wrk"),
    ("uvicorn", "uvicorn"),
    ("Strawberry", "strawberry-graphql"),
    ("load average at the start", "load_average"),
]


# Shown once, in the machine table, rather than beside every benchmark.
MACHINE_KEYS = {"cores", "cpu", "memory_gib", "kernel", "platform", "python", "postgresql"}


def render(when: datetime, env: dict[str, Any], outcomes: list[Outcome], notes: list[str]) -> str:
    lines = [
        "# Benchmark results",
        "",
        (
            "Generated by `.venv/bin/python bench/results.py` (every benchmark in bench/ with "
            "`--json`, one after the other); do not edit by hand."
        ),
        "",
        f"Date: {when:%Y-%m-%d %H:%M} UTC.",
        "",
        "| machine | |",
        "| --- | --- |",
    ]
    for label, key in MACHINE_ROWS:
        value = env.get(key, "")
        if key == "memory_gib":
            value = f"{value} GiB"
        elif isinstance(value, list):
            value = ", ".join(str(item) for item in value)
        lines.append(f"| {label} | {cell(value)} |")
    lines.append("")
    lines += [f"- {note}" for note in notes]
    if notes:
        lines.append("")
    met = sum(1 for o in outcomes if o.data for f in o.data["figures"] if f.get("ok") is True)
    missed = sum(1 for o in outcomes if o.data for f in o.data["figures"] if f.get("ok") is False)
    lines += [f"Goals: {met} met, {missed} not met.", ""]
    for outcome in outcomes:
        bench = outcome.bench
        title = outcome.data.get("title") if outcome.data else None
        lines.append(f"## bench/{bench.name}.py" + (f": {title}" if title else ""))
        lines.append("")
        command = " ".join([f"`.venv/bin/python bench/{bench.name}.py", *bench.args]) + "`"
        about = f" ({bench.about})" if bench.about else ""
        ran = f", {outcome.seconds:.0f} s" if outcome.seconds else ""
        lines.append(f"{command}{about}{ran}.")
        lines.append("")
        if outcome.data is None:
            lines += [f"No figures: {outcome.problem}.", ""]
            continue
        lines += table(outcome.data)
        context = {
            key: value
            for key, value in (outcome.data.get("context") or {}).items()
            if key not in MACHINE_KEYS and env.get(key) != value
        }
        if context:
            shown = "; ".join(f"{key}: {cell(value)}" for key, value in context.items())
            lines += ["", f"Context: {shown}."]
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


NOISE = (
    "The machine is shared: other jobs run on the same cores while the benchmarks run, so "
    "absolute figures vary by tens of percent between runs; ratios measured side by side in "
    "one run (ours beside PostGraphile, beside json_agg) are the steadier figures."
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated names from BENCHES (default: all)")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--keep-json", type=Path, help="keep each benchmark's JSON and log here")
    parser.add_argument(
        "--from-json", type=Path, help="render earlier --keep-json files, run nothing"
    )
    parser.add_argument("--note", action="append", default=[], help="a line for the notes")
    args = parser.parse_args()
    names = {bench.name for bench in BENCHES}
    chosen = BENCHES
    if args.only:
        wanted = [name.strip().removesuffix(".py") for name in args.only.split(",")]
        unknown = sorted(set(wanted) - names)
        if unknown:
            parser.error(
                f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(sorted(names))}"
            )
        chosen = [bench for bench in BENCHES if bench.name in wanted]
    when = datetime.now(UTC)
    env = environment()
    outcomes: list[Outcome] = []
    if args.from_json:
        for bench in chosen:
            path = args.from_json / f"{bench.name}.json"
            data = json.loads(path.read_text()) if path.exists() else None
            missing = not (HERE / f"{bench.name}.py").exists()
            problem = f"bench/{bench.name}.py is not on this branch" if missing else "not run"
            outcomes.append(Outcome(bench, data=data, problem=None if data else problem))
    else:
        json_dir = args.keep_json or Path(tempfile.mkdtemp(prefix="pacs-masks-results-"))
        json_dir.mkdir(parents=True, exist_ok=True)
        try:
            outcomes = [run_bench(bench, json_dir) for bench in chosen]
        finally:
            if args.keep_json is None:
                shutil.rmtree(json_dir, ignore_errors=True)
    args.output.write_text(render(when, env, outcomes, [NOISE, *args.note]))
    print(f"wrote {args.output}")
    failed = [outcome.bench.name for outcome in outcomes if outcome.data is None]
    if failed:
        print(f"no figures from: {', '.join(failed)}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
