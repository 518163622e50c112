"""The figures every bench script writes with `--json PATH` (the convention of issue 12), and
the machine and the processes they were measured on. `bench/results.py` reads these files into
RESULTS.md.

    {"title": str, "figures": [{"name", "value", "unit", "goal", "ok", "note"}], "context": {}}
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Figure:
    name: str
    value: float
    unit: str
    goal: str | None = None
    ok: bool | None = None
    note: str | None = None


@dataclass
class Report:
    title: str
    figures: list[Figure] = field(default_factory=list)
    context: dict[str, Any] = field(default_factory=dict)

    def add(
        self,
        name: str,
        value: float,
        unit: str,
        *,
        at_most: float | None = None,
        at_least: float | None = None,
        goal: str | None = None,
        note: str | None = None,
    ) -> Figure:
        """One figure; `at_most`/`at_least` make the goal text and the verdict from the value."""
        ok: bool | None = None
        if at_most is not None:
            goal, ok = goal or f"<= {at_most:g} {unit}".strip(), value <= at_most
        elif at_least is not None:
            goal, ok = goal or f">= {at_least:g} {unit}".strip(), value >= at_least
        figure = Figure(name, float(value), unit, goal, ok, note)
        self.figures.append(figure)
        return figure

    def write(self, path: str | None) -> None:
        if path is None:
            return
        body = {
            "title": self.title,
            "figures": [asdict(figure) for figure in self.figures],
            "context": self.context,
        }
        Path(path).write_text(json.dumps(body, indent=2, allow_nan=False, default=str) + "\n")


def figure_dict(
    name: str,
    value: float,
    unit: str,
    goal: str | None = None,
    ok: bool | None = None,
    note: str | None = None,
    *,
    digits: int,
) -> dict[str, Any]:
    """A figure as the JSON holds it, its value rounded to `digits` (an int stays an int), for
    the scripts that write their JSON themselves."""
    return asdict(Figure(name, round(value, digits), unit, goal, ok, note))


def add_json_argument(parser: Any) -> None:
    parser.add_argument("--json", metavar="PATH", help="also write the figures as JSON to PATH")


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of a process, from /proc/PID/status: VmRSS, or VmHWM (its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def machine() -> dict[str, Any]:
    """What the figures depend on that is not the code: cores, CPU, memory, kernel, Python."""
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "kernel": platform.release(),
        "platform": platform.platform(),
        "python": f"{sys.version.split()[0]} ({platform.python_implementation()})",
        "load_average": [round(value, 2) for value in os.getloadavg()],
    }


# Which of the machine's processes a CPU share is counted under, by the first match in its
# command line; the rest is "other".
CPU_CATEGORIES = (
    ("our server", "pacs-masks serve"),
    ("uploads (pacs-masks upload)", "pacs-masks upload"),
    ("PostgreSQL", "postgres"),
    ("SeaweedFS", "weed"),
    ("wrk", "wrk"),
    ("PostGraphile", "postgraphile"),
)


class CpuShares:
    """CPU seconds each kind of process spent while a run lasted, read from /proc every half
    second: a process that ends in between is counted up to its last reading."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[str, int, int]] = {}  # pid: category, first, last ticks

    def sample(self) -> None:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                ticks = int(fields[11]) + int(fields[12])  # utime stime
                known = self._seen.get(pid)
                if known is None:
                    command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    parent = self._seen.get(int(fields[1]))
                    category = next(
                        (name for name, mark in CPU_CATEGORIES if mark in command),
                        # `serve --workers N` spawns its workers: they count as their parent.
                        parent[0] if parent is not None else "other",
                    )
                    # A process first seen now started (or was first read) in this run.
                    self._seen[pid] = (category, ticks, ticks)
                else:
                    self._seen[pid] = (known[0], known[1], ticks)
            except (OSError, IndexError, ValueError):
                continue

    def seconds(self) -> dict[str, float]:
        per_tick = 1 / os.sysconf("SC_CLK_TCK")
        totals: dict[str, float] = {}
        for category, first, last in self._seen.values():
            totals[category] = totals.get(category, 0.0) + (last - first) * per_tick
        return dict(sorted(totals.items(), key=lambda item: -item[1]))
