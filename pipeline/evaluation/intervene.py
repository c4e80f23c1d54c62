"""The knock-out experiment: one benchmark, the unmodified model and knock-out head sets.

Why: the paper's Tables 3 and 7-10 compare a benchmark's scores with and without blocking a
head set (input-agnostic, and the input-dependent and random controls). One output folder keeps
all of it: the unmodified model's answers in OUT itself -- exactly what ``kvpipe answer --out
OUT`` writes, so a baseline ``answer`` already made there is reused, not recomputed or
replaced -- one folder per knock-out condition (OUT/<condition>/), and OUT/knockout.parquet
(+ .csv), every condition's scores side by side. Running a condition again replaces only its
rows of that table; every answer already generated is reused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from kvpipe.pipeline.evaluation.evaluate import (Condition, EvalResult, evaluate, with_condition,
                                                 write_condition_table)
from kvpipe.pipeline.evaluation.head_sets import (layer_range, overlap_with_treatment, read_variance_table,
                                                  select_heads)
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.vqa.base import Benchmark, VQAItem

SEEDED = ("input-dependent", "random")  # the controls draw at random; their seed is part of the name


def knockout_condition(table_path: str | Path, *, heads: str, layers: str, n_layers: int, n_kv_heads: int,
                       threshold: float | None = None, control_seed: int = 0, store: str = "") -> Condition:
    """The head set ``heads`` (input-agnostic | input-dependent | random) in ``layers``, from the
    input-agnostic probe's table at ``table_path``; ``control_seed`` draws the controls."""
    table = read_variance_table(table_path, n_layers, n_kv_heads, threshold)
    layer_list = layer_range(layers, n_layers)
    chosen = select_heads(table, heads, layer_list, control_seed)
    name = f"{heads}-{re.sub(r'[^A-Za-z0-9-]+', '_', layers)}"
    details: dict[str, Any] = {"store": store, "threshold": table.threshold, "layer_list": layer_list}
    if heads in SEEDED:
        name += f"-seed{control_seed}"
        details["control_seed"] = control_seed
        # the control's heads that are also input-agnostic heads of the range (the treatment)
        details["treatment_heads"] = len(select_heads(table, "input-agnostic", layer_list))
        details["overlap_with_treatment"] = overlap_with_treatment(table, layer_list, chosen)
    if threshold is not None:
        name += f"-t{threshold:g}"
    return Condition(name, heads, layers, chosen, details)


@dataclass
class Intervention:
    baseline: EvalResult
    knocked: list[EvalResult]  # one per condition, in order
    conditions: list[Condition]
    rows: list[dict[str, Any]]  # tidy: model, benchmark, condition, heads, layers, n_heads, subset, metric, value
    table: Path  # OUT/knockout.parquet: these rows and those of earlier conditions


def run_intervention(adapter: ModelAdapter, bench: Benchmark, items: list[VQAItem], out_dir: str | Path,
                     conditions: Condition | Sequence[Condition], *, max_new_tokens: int = 128, batch_size: int = 8,
                     progress: Callable[[str, int], None] | None = None,
                     provenance: dict[str, Any] | None = None) -> Intervention:
    """Answer ``items`` with the unmodified model (OUT, as ``kvpipe answer`` would) and under each
    condition (OUT/<name>); merge their scores into OUT/knockout.parquet."""
    out = Path(out_dir)
    conds = [conditions] if isinstance(conditions, Condition) else list(conditions)

    def run(cond: Condition, folder: Path) -> EvalResult:
        step = (lambda n, c=cond.name: progress(c, n)) if progress else None
        return evaluate(adapter, bench, items, folder, condition=cond, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=step, provenance=provenance)

    baseline = run(Condition(), out)
    knocked = [run(c, out / c.name) for c in conds]
    rows = with_condition(baseline.scores, Condition())
    for cond, res in zip(conds, knocked):
        rows += with_condition(res.scores, cond)
    path, _ = write_condition_table(rows, out)
    return Intervention(baseline, knocked, conds, rows, path)
