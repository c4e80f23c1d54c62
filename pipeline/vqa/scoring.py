"""Paired tasks: the MLM's answer against the image values' answer on the same questions.

Why a 2x2 table: the paper's Table 5 asks how often the information the MLM needs is in its
image values but does not reach its answer (values right, MLM wrong), and how often the MLM is
right without it (values wrong, MLM right); "MLM or values right" is what a model that surfaced
its values would reach.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvpipe.errors import UsageError

CELLS = ("mlm_right_value_right", "mlm_right_value_wrong", "mlm_wrong_value_right", "mlm_wrong_value_wrong")


def paired_table(mlm_correct: Sequence[bool], value_correct: Sequence[bool]) -> dict[str, Any]:
    """The 2x2 counts and percentages of per-question correctness, plus Table 5's rows.

    Returns {"n", "counts": {cell: int}, "percent": {cell: float}, "mlm_right",
    "value_right_mlm_wrong", "value_wrong_mlm_right", "either_right", "value_right"} where the
    last five are percentages of n (Table 5: "MLM ✓", "Value ✓ MLM ✗", "Value ✗ MLM ✓",
    "(MLM ∪ Value) ✓"; value_right added for completeness).
    """
    mlm, val = list(mlm_correct), list(value_correct)
    if len(mlm) != len(val):
        raise UsageError(f"paired answers differ in length: {len(mlm)} MLM answers, {len(val)} value answers; "
                         f"pair them question by question")
    if not mlm:
        raise UsageError("no paired answers to compare")
    if not all(isinstance(v, bool) for v in mlm + val):
        raise UsageError("paired answers must be booleans (answer correct or not)")
    counts = {
        "mlm_right_value_right": sum(m and v for m, v in zip(mlm, val)),
        "mlm_right_value_wrong": sum(m and not v for m, v in zip(mlm, val)),
        "mlm_wrong_value_right": sum(v and not m for m, v in zip(mlm, val)),
        "mlm_wrong_value_wrong": sum(not m and not v for m, v in zip(mlm, val)),
    }
    n = len(mlm)
    percent = {k: 100.0 * c / n for k, c in counts.items()}
    return {
        "n": n,
        "counts": counts,
        "percent": percent,
        "mlm_right": percent["mlm_right_value_right"] + percent["mlm_right_value_wrong"],
        "value_right_mlm_wrong": percent["mlm_wrong_value_right"],
        "value_wrong_mlm_right": percent["mlm_right_value_wrong"],
        "either_right": 100.0 - percent["mlm_wrong_value_wrong"],
        "value_right": percent["mlm_right_value_right"] + percent["mlm_wrong_value_right"],
    }


def paired_rows(table: dict[str, Any], subset: str) -> list[dict[str, Any]]:
    """A paired_table as tidy rows {subset, metric, value}: counts, percentages and Table 5's rows."""
    rows = [{"subset": subset, "metric": "n", "value": float(table["n"])}]
    for cell in CELLS:
        rows.append({"subset": subset, "metric": f"{cell}_count", "value": float(table["counts"][cell])})
        rows.append({"subset": subset, "metric": f"{cell}_pct", "value": table["percent"][cell]})
    for key in ("mlm_right", "value_right_mlm_wrong", "value_wrong_mlm_right", "either_right", "value_right"):
        rows.append({"subset": subset, "metric": f"{key}_pct", "value": table[key]})
    return rows
