"""``kvpipe report-prefix``: the paper's Table 4 in shape, from stores that differ in their prefix.

Thin: options -> ``kvpipe.probes.prefix_report.compare_prefixes``; registered on the main app
by ``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kvpipe.cli.common import console, parse_params
from kvpipe.provenance import provenance


def report_prefix(
    store: list[str] = typer.Option(..., help="a store made by kvpipe extract (repeatable: one per prefix "
                                              "condition, e.g. none, --prefix-from class, controls)"),
    task: str = typer.Option(..., help="probe whose results to compare (see `kvpipe tasks`), e.g. refexp-seg"),
    kind: str = typer.Option("values", help="representation: values (the paper's Table 4) | keys | post_proj"),
    metric: Optional[str] = typer.Option(None, help="metric to rank heads by (default: the probe's primary one)"),
    param: list[str] = typer.Option([], help="probe parameter KEY=VALUE (repeatable), as given to kvpipe probe: read "
                                             "the cached results of those parameters (default: the latest run's)"),
    out: Optional[Path] = typer.Option(None, help="output directory: report_prefix.md, report_prefix.csv, run.json "
                                                  "(default: FIRST_STORE/probes/TASK/report-prefix)"),
) -> None:
    """Best (layer, head) score of each store side by side, rows named by the store's prefix condition."""
    called = provenance("report-prefix", dict(locals()))
    from kvpipe.probes.prefix_report import compare_prefixes, write_report

    params = parse_params(param)
    rows = compare_prefixes(store, task, kind=kind, metric=metric, params=params)
    fraction = all(r["value"] is None or 0.0 <= r["value"] <= 1.0 for r in rows)
    table = Table()
    table.add_column("prefix", no_wrap=True, min_width=max(len(r["condition"]) for r in rows))
    table.add_column(f"{task} {rows[0]['metric']} ({kind}{', x100' if fraction else ''})")
    table.add_column("layer")
    table.add_column("head")
    table.add_column("store", overflow="fold")
    for r in rows:
        value = "-" if r["value"] is None else (f"{100 * r['value']:.1f}" if fraction else f"{r['value']:.4g}")
        table.add_row(r["condition"], value, "-" if r["layer"] is None else str(r["layer"]),
                      "-" if r["head"] is None else str(r["head"]), r["store"])
    console.print(table)
    if out is None:
        from kvpipe.probes.runner import results_dir
        from kvpipe.store import FeatureStore

        out = results_dir(FeatureStore.open(store[0]).root) / task / "report-prefix"
    paths = write_report(rows, out, {**called, "task": task, "kind": kind, "metric": rows[0]["metric"],
                                     "probe_params": params, "stores": list(store)})
    console.print(f"-> {', '.join(str(p) for p in paths)}")


def register(app: typer.Typer) -> None:
    app.command("report-prefix")(report_prefix)
