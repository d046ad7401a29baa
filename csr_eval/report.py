"""A benchmark's results as files: its rows as CSV and its markdown table, side by side (`<output>.csv`, `.md`)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_results(rows: list[dict], output: str | Path, lines: list[str]) -> None:
    """rows → `<output>.csv` (one column per key of the first row), lines → `<output>.md`; prints the markdown."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
