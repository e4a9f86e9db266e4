"""
The fault matrix's table, rendered from the test that runs it:

    python docs/examples/faultmatrix.py OUTPUT_DIR

C{tests/slow/test_faults.py} keeps its cells as data (C{MATRIX}: fault,
phase, the outcome the test requires; C{MEANINGLESS}: the pairs with no
test, and why), and makes one test of each cell.  This writes them as
Markdown tables (C{matrix.md}, C{untested.md}), so the page shows exactly
what the test checks.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.getcwd())

from tests.slow.test_faults import MATRIX, MEANINGLESS, Fault, Outcome, Phase  # noqa: E402

SHORT = {
    Outcome.SOURCE: "source",
    Outcome.DESTINATION: "destination",
    Outcome.RETRY: "destination, after a retried restore",
}


def matrix() -> list[str]:
    cells: dict[tuple[Fault, Phase], list[str]] = {}
    for cell in MATRIX:
        cells.setdefault((cell.fault, cell.phase), []).append(
            f"{SHORT[cell.outcome]} (`{cell.name}`)"
        )
    lines = [
        "| fault \\ phase | " + " | ".join(p.value for p in Phase) + " |",
        "|---" * (len(Phase) + 1) + "|",
    ]
    for fault in Fault:
        row = []
        for phase in Phase:
            row.append("; ".join(cells.get((fault, phase), ["-"])))
        lines.append(f"| {fault.value} | " + " | ".join(row) + " |")
    return lines


def untested() -> list[str]:
    lines = ["| fault | phase | why no test |", "|---|---|---|"]
    for (fault, phase), why in MEANINGLESS.items():
        lines.append(f"| {fault.value} | {phase.value} | {why} |")
    return lines


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python docs/examples/faultmatrix.py OUTPUT_DIR")
    for name, lines in (("matrix.md", matrix()), ("untested.md", untested())):
        with open(os.path.join(sys.argv[1], name), "w") as f:
            f.write("\n".join(lines) + "\n")
