"""The paper's own numbers, transcribed into CSV files beside this module (``paper_numbers/``).

Why data, not code: each number carries the table and row it was copied from, so a reader can
check the transcription against the paper, and ``kvpipe paper`` prints it beside kvpipe's cell.
One file per table or figure; columns ``table, row, column, value, source``; an empty value is
a cell the paper leaves empty ("-"). Reading needs the standard library only.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from kvpipe.errors import UsageError

DATA_DIR = Path(__file__).parent / "paper_numbers"


@dataclass(frozen=True)
class PaperNumber:
    table: str
    row: str
    column: str
    value: float | str | None  # a number, a text such as "14-15", or None where the paper prints "-"
    source: str


def _value(text: str) -> float | str | None:
    text = text.strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        return text


def paper_numbers(name: str) -> list[PaperNumber]:
    """Every transcribed number of ``name`` (``table1``, ``table2``, ``table4``, ``table5``,
    ``table6``, ``figure2``, ``figure3``), in file order."""
    path = DATA_DIR / f"{name}.csv"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in DATA_DIR.glob("*.csv")))
        raise UsageError(f"no transcription of the paper's {name} (known: {known})")
    with path.open(encoding="utf-8", newline="") as f:
        return [PaperNumber(r["table"], r["row"], r["column"], _value(r["value"]), r["source"])
                for r in csv.DictReader(f)]


def paper_cells(name: str) -> dict[tuple[str, str], float | str | None]:
    """{(row, column): value} of one table."""
    return {(n.row, n.column): n.value for n in paper_numbers(name)}
