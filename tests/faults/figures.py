"""The figures each scenario measures, and the table the suite prints at its end.

A scenario asserts its invariants first and records a `Row` only once they held, so a
printed figure always comes from a run that could have failed.
"""

from __future__ import annotations

import os
import platform
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Figures", "Row", "collect_from_worker", "machine"]

# where an xdist worker hands its rows to the controller, which prints them
_WORKER_ROWS = "livekit_resume_fault_rows"
_PLUGIN = "livekit-resume-fault-figures"

COLUMNS = (
    "scenario",
    "store",
    "runs",
    "faults injected",
    "versions acknowledged",
    "versions lost",
    "corrupt reads",
    "time to recover (median)",
    "notes",
)


@dataclass
class Row:
    scenario: str
    store: str
    runs: int = 0
    faults: int = 0
    acked: int = 0
    lost: int = 0
    corrupt: int = 0
    recover: list[float] = field(default_factory=list)
    notes: str = ""

    def cells(self) -> list[str]:
        median = f"{statistics.median(self.recover) * 1000:.0f} ms" if self.recover else "-"
        return [
            self.scenario,
            self.store,
            str(self.runs),
            str(self.faults),
            str(self.acked),
            str(self.lost),
            str(self.corrupt),
            median,
            self.notes,
        ]


def machine() -> str:
    """One line describing where the figures were taken."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{os.cpu_count()} cores ({cpu}), {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


class Figures:
    """Rows collected over the test session; a pytest plugin that prints them at the end."""

    def __init__(self, soak: int) -> None:
        self.soak = soak
        self.rows: list[Row] = []

    def add(self, row: Row) -> None:
        self.rows.append(row)

    def table(self) -> str:
        lines = [
            "| " + " | ".join(COLUMNS) + " |",
            "| " + " | ".join("---" for _ in COLUMNS) + " |",
        ]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        return "\n".join(lines)

    def report(self) -> str:
        return f"machine: {machine()}; RESUME_SOAK={self.soak}\n\n{self.table()}\n"

    @classmethod
    def of(cls, config: Any, soak: int) -> Figures:
        """The session's table, registered as a plugin so that it prints at the very end
        (in an xdist worker, handed to the controller, which prints them all)."""
        fig = config.pluginmanager.get_plugin(_PLUGIN)
        if fig is None:
            fig = cls(soak)
            config.pluginmanager.register(fig, _PLUGIN)
        return fig  # type: ignore[no-any-return]

    def pytest_sessionfinish(self, session: Any) -> None:
        workeroutput = getattr(session.config, "workeroutput", None)
        if workeroutput is not None:
            workeroutput[_WORKER_ROWS] = {
                "soak": self.soak,
                "rows": [asdict(row) for row in self.rows],
            }

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not self.rows:
            return
        terminalreporter.write_sep("=", "fault-injection figures (issue 13)")
        terminalreporter.write_line(self.report())
        out = os.environ.get("RESUME_FAULTS_TABLE")
        if out:
            Path(out).write_text(self.report())
            terminalreporter.write_line(f"(also written to {out})")


def collect_from_worker(config: Any, workeroutput: dict[str, Any]) -> None:
    """On the xdist controller: the rows a worker measured, into the printed table."""
    handed = workeroutput.get(_WORKER_ROWS)
    if handed and handed["rows"]:
        fig = Figures.of(config, handed["soak"])
        for row in handed["rows"]:
            fig.add(Row(**row))
