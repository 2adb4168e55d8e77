"""Run every performance bench and write its tables into docs/performance.md.

    python bench/run_all.py            # full sizes (3 minutes), rewrites the doc's tables
    python bench/run_all.py --quick    # tiny sizes, prints only (a smoke run)
    python bench/run_all.py --no-write # full sizes, prints only

Each bench runs in a process of its own (``python bench/<name>.py``), one after the
other, and prints Markdown tables; they replace what lies between the
``<!-- bench:begin -->`` and ``<!-- bench:end -->`` markers of docs/performance.md,
under a line describing the machine. The peers (``pip install -e '.[bench]'``) are
measured where installed and skipped with a note where not.
"""

from __future__ import annotations

import argparse
import datetime
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "performance.md"
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"

# script, full-size arguments, tiny arguments (seconds, for tests/test_bench.py)
BENCHES: list[tuple[str, list[str], list[str]]] = [
    ("commit_cost.py", ["--keys", "20", "--rounds", "15"], ["--keys", "2", "--rounds", "2"]),
    ("redis_commit.py", ["--keys", "40", "--rounds", "8"], ["--keys", "2", "--rounds", "2"]),
    (
        "checkpoint_cost.py",
        ["--sizes", "10,1000,5000,20000", "--rounds", "60", "--naive-rounds", "10"],
        ["--sizes", "10,30", "--rounds", "3", "--naive-rounds", "1"],
    ),
    (
        "restore_cost.py",
        ["--sizes", "10,1000,5000,20000", "--rounds", "10", "--processes", "8"],
        ["--sizes", "10,30", "--rounds", "2", "--processes", "1"],
    ),
    (
        "loop_block.py",
        ["--sizes", "10,1000,5000,20000", "--rounds", "60", "--big", "5,50"],
        ["--sizes", "10,30", "--rounds", "2", "--big", "1", "--big-rounds", "1"],
    ),
    (
        "scale.py",
        [
            *("--sessions", "200", "--period", "5", "--duration", "30"),
            *("--sizes", "100", "--back-to-back", "5"),
        ],
        [
            *("--sessions", "3", "--period", "0.2", "--duration", "0.5"),
            *("--sizes", "10", "--back-to-back", "1"),
        ],
    ),
    (
        "listing.py",
        ["--sessions", "10000", "--rounds", "5"],
        ["--sessions", "20", "--rounds", "1"],
    ),
    (
        "peers.py",
        ["--sizes", "10,1000,5000", "--rounds", "30"],
        ["--sizes", "10,30", "--rounds", "2"],
    ),
]


def run(script: str, args: list[str]) -> str:
    """One bench's stdout; its stderr passes through."""
    argv = [sys.executable, str(HERE / script), *args]
    print(f"$ {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    done = subprocess.run(argv, stdout=subprocess.PIPE, text=True, check=True)
    return done.stdout


def as_markdown(script: str, out: str) -> str:
    """A bench that prints plain text goes into the doc as a titled text block."""
    if "### " in out:
        return out
    return f"### `python bench/{script}`\n\n```text\n{out.strip()}\n```\n\n"


def measured(outputs: list[str]) -> str:
    """The tables, with the machine line (the first comment a bench printed) on top."""
    machine = ""
    body: list[str] = []
    for out in outputs:
        for line in out.splitlines():
            if line.startswith("<!-- ") and line.endswith(" -->"):
                machine = machine or line[5:-4]
                continue
            body.append(line)
    today = datetime.date.today().isoformat()
    head = f"Measured {today} on: {machine}. One command: `python bench/run_all.py`."
    return head + "\n\n" + "\n".join(body).strip() + "\n"


def write(doc: Path, text: str) -> None:
    old = doc.read_text()
    if BEGIN in old and END in old:
        before, rest = old.split(BEGIN, 1)
        after = rest.split(END, 1)[1]
    else:
        before, after = old.rstrip() + "\n\n## Measured\n\n", "\n"
    doc.write_text(f"{before}{BEGIN}\n{text}{END}{after}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes, print only")
    ap.add_argument("--no-write", action="store_true", help="print, leave the doc alone")
    ap.add_argument("--only", default="", help="comma-separated script names to run")
    args = ap.parse_args()
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    outputs = [
        as_markdown(script, run(script, tiny if args.quick else full))
        for script, full, tiny in BENCHES
        if not only or script in only or script.removesuffix(".py") in only
    ]
    text = measured(outputs)
    print(text)
    if not (args.quick or args.no_write):
        write(DOC, text)
        print(f"written to {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
