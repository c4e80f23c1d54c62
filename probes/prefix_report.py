"""Side by side: one probe's best-head score on stores that differ in their text prefix.

Why: the paper's Table 4 compares image values extracted without a prefix, with a relevant
prefix, and with the random and incorrect controls. Each condition is its own store (a prefix
changes the keys and values, so it is another feature set); this module reads each store's
results table (written by ``kvpipe probe``; nothing is recomputed) and names each row by the
prefix condition recorded in the store's metadata. Without ``params`` the table is the latest
``kvpipe probe`` run's (STORE/probes/TASK/results.parquet); with them, the cached results of
exactly those parameters (what ``kvpipe probe --param`` wrote). ``write_report`` writes the
table as markdown and CSV beside a run.json.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.report import best_row
from kvpipe.probes.runner import cache_key, results_dir
from kvpipe.provenance import write_run_json
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


def results_table(store: FeatureStore, task: str, params: dict[str, Any] | None = None) -> Path:
    """The results file to read: the latest run's, or the cached one of ``params``."""
    if not params:
        table = results_dir(store.root) / task / "results.parquet"
        if not table.is_file():
            raise StoreError(f"no {task} results for {store.root} (looked for {table}); run kvpipe probe "
                             f"--task {task} --store {store.root} first")
        return table
    probe = PROBES.get(task)
    unknown = sorted(set(params) - set(probe.defaults))
    if unknown:
        raise UsageError(f"--param {unknown[0]}: probe {task} takes {', '.join(probe.defaults) or 'no parameters'}")
    key = cache_key(store, task, probe.version, {**probe.defaults, **params})
    table = results_dir(store.root) / ".cache" / f"{task}-{key}.parquet"
    if not table.is_file():
        given = " ".join(f"--param {k}={v}" for k, v in params.items())
        raise StoreError(f"no cached {task} results with {given} for {store.root}; run kvpipe probe --task {task} "
                         f"--store {store.root} {given} first")
    return table


def compare_prefixes(stores: Sequence[str | Path], task: str, kind: str = "values",
                     metric: str | None = None, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per store, in the order given: {"condition", "store", "task", "metric", "kind", "value",
    "layer", "head"} of the best (layer, head) of ``kind`` by ``metric`` (default: the probe's
    primary metric); value, layer and head are None where the results have no such row.
    ``params``: read the cached results of those probe parameters (see the module doc)."""
    if not stores:
        raise UsageError("name at least one --store")
    metric = metric or PROBES.get(task).primary_metric
    out = []
    for path in stores:
        store = FeatureStore.open(path)
        table = results_table(store, task, params)
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


REPORT_COLUMNS = ("condition", "task", "metric", "kind", "value", "layer", "head", "store")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value).replace("|", "\\|")


def write_report(rows: list[dict[str, Any]], out_dir: str | Path, record: dict[str, Any]) -> list[Path]:
    """OUT/report_prefix.md (a markdown table), OUT/report_prefix.csv and OUT/run.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    types = {"value": pa.float64(), "layer": pa.int64(), "head": pa.int64()}
    table = pa.Table.from_pylist([{c: r[c] for c in REPORT_COLUMNS} for r in rows],
                                 schema=pa.schema([(c, types.get(c, pa.string())) for c in REPORT_COLUMNS]))
    csv = out / "report_prefix.csv"
    pacsv.write_csv(table, csv)
    lines = ["| " + " | ".join(REPORT_COLUMNS) + " |", "|" + "---|" * len(REPORT_COLUMNS)]
    lines += ["| " + " | ".join(_cell(r[c]) for c in REPORT_COLUMNS) + " |" for r in rows]
    md = out / "report_prefix.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [md, csv, write_run_json(out, record)]
