"""Side by side: one probe's best-head score on stores that differ in their text prefix.

Why: the paper's Table 4 compares image values extracted without a prefix, with a relevant
prefix, and with the random and incorrect controls. Each condition is its own store (a prefix
changes the keys and values, so it is another feature set); this module reads each store's
results table (written by ``kvpipe probe``; nothing is recomputed) and names each row by the
prefix condition recorded in the store's metadata.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.report import best_row
from kvpipe.probes.runner import results_dir
from kvpipe.store import FeatureStore
from kvpipe.store.schema import FeatureSetMeta

CONTROL_NAMES = {"none": "Prefixing", "random": "Prefixing-random", "incorrect": "Prefixing-incorrect"}


def prefix_condition(meta: FeatureSetMeta) -> str:
    """The store's prefix condition as a Table-4 row name, e.g. "Prefixing (class)"."""
    choice = meta.prefix_choice
    if choice:
        name = CONTROL_NAMES.get(choice.control, f"Prefixing-{choice.control}")
        return f"{name} ({choice.source})" if choice.source else name
    if meta.prefix:
        text = meta.prefix if len(meta.prefix) <= 40 else meta.prefix[:37] + "..."
        return f'Prefix "{text}"'
    return "No prefixing"


def compare_prefixes(stores: Sequence[str | Path], task: str, kind: str = "values",
                     metric: str | None = None) -> list[dict[str, Any]]:
    """Per store, in the order given: {"condition", "store", "task", "metric", "kind", "value",
    "layer", "head"} of the best (layer, head) of ``kind`` by ``metric`` (default: the probe's
    primary metric); value, layer and head are None where the results have no such row."""
    if not stores:
        raise UsageError("name at least one --store")
    metric = metric or PROBES.get(task).primary_metric
    out = []
    for path in stores:
        store = FeatureStore.open(path)
        table = results_dir(store.root) / task / "results.parquet"
        if not table.is_file():
            raise StoreError(f"no {task} results for {store.root} (looked for {table}); run kvpipe probe "
                             f"--task {task} --store {store.root} first")
        try:
            rows = pq.read_table(table).to_pylist()
        except Exception as err:
            raise StoreError(f"{table} is unreadable ({err}); rerun kvpipe probe --task {task} --no-cache") from None
        best = best_row(rows, metric, kind)
        out.append({"condition": prefix_condition(store.meta), "store": str(store.root), "task": task,
                    "metric": metric, "kind": kind, "value": None if best is None else float(best["value"]),
                    "layer": None if best is None else int(best["layer"]),
                    "head": None if best is None else int(best["head"])})
    return out
