"""The knock-out experiment: one benchmark, the unmodified model and one knock-out head set.

Why: the paper's Tables 3 and 7-10 compare a benchmark's scores with and without blocking a
head set; running both here, into sibling directories of one output (``none/`` and one per
head set), lets several head sets share one baseline and one table, and every answer already
generated is reused on a rerun.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from kvpipe.pipeline.evaluation.evaluate import (Condition, EvalResult, evaluate, with_condition,
                                      write_condition_table)
from kvpipe.pipeline.evaluation.head_sets import (layer_range, overlap_with_treatment, read_variance_table,
                                                  select_heads)
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.vqa.base import Benchmark, VQAItem

SEEDED = ("input-dependent", "random")  # the controls draw at random; their seed is part of the name


def knockout_condition(table_path: str | Path, *, heads: str, layers: str, n_layers: int, n_kv_heads: int,
                       threshold: float | None = None, seed: int = 0, store: str = "") -> Condition:
    """The head set ``heads`` (input-agnostic | input-dependent | random) in ``layers``, from the
    input-agnostic probe's table at ``table_path``."""
    table = read_variance_table(table_path, n_layers, n_kv_heads, threshold)
    layer_list = layer_range(layers, n_layers)
    chosen = select_heads(table, heads, layer_list, seed)
    name = f"{heads}-{re.sub(r'[^A-Za-z0-9-]+', '_', layers)}"
    details: dict[str, Any] = {"store": store, "threshold": table.threshold, "layer_list": layer_list}
    if heads in SEEDED:
        name += f"-seed{seed}"
        details["seed"] = seed
        # the control's heads that are also input-agnostic heads of the range (the treatment)
        details["treatment_heads"] = len(select_heads(table, "input-agnostic", layer_list))
        details["overlap_with_treatment"] = overlap_with_treatment(table, layer_list, chosen)
    if threshold is not None:
        name += f"-t{threshold:g}"
    return Condition(name, heads, layers, chosen, details)


@dataclass
class Intervention:
    baseline: EvalResult
    knocked: EvalResult
    condition: Condition
    rows: list[dict[str, Any]]  # tidy: model, benchmark, condition, heads, layers, n_heads, subset, metric, value
    table: Path


def run_intervention(adapter: ModelAdapter, bench: Benchmark, items: list[VQAItem], out_dir: str | Path,
                     condition: Condition, *, max_new_tokens: int = 128, batch_size: int = 8,
                     progress: Callable[[str, int], None] | None = None) -> Intervention:
    """Answer ``items`` with the unmodified model (OUT/none) and under ``condition`` (OUT/<name>)."""
    out = Path(out_dir)
    runs = []
    for cond in (Condition(), condition):
        step = (lambda n, c=cond.name: progress(c, n)) if progress else None
        runs.append(evaluate(adapter, bench, items, out / cond.name, condition=cond,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, progress=step))
    rows = with_condition(runs[0].scores, Condition()) + with_condition(runs[1].scores, condition)
    path, _ = write_condition_table(rows, out)
    return Intervention(runs[0], runs[1], condition, rows, path)
