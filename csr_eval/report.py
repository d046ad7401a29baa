"""A benchmark's results as files: its rows as CSV and its markdown table, side by side (`<output>.csv`, `.md`)."""

from __future__ import annotations

import csv
from pathlib import Path


def write_results(rows: list[dict], output: str | Path, lines: list[str]) -> None:
    """rows → `<output>.csv` (a column per key any row has, in first-seen order; a row without it leaves it empty),
    lines → `<output>.md`; prints the markdown."""
    out = Path(output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(dict.fromkeys(key for row in rows for key in row)))
        writer.writeheader()
        writer.writerows(rows)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
