"""Result tables for the terminal: best (layer, head) per kind against the post-proj baseline."""

from __future__ import annotations

import math

from rich.console import Console
from rich.table import Table

from kvpipe.probes import PROBES, ProbeRun


def print_probe_run(console: Console, run: ProbeRun) -> None:
    probe = PROBES.get(run.task)
    rows = run.table.to_pylist()
    for note in run.skipped:
        console.print(f"[yellow]note[/] {run.task} skipped {note}", soft_wrap=True, highlight=False)
    if not probe.ranked:
        _print_statistics(console, run, rows)
        return
    metrics = sorted({r["metric"] for r in rows if r["layer"] >= 0 or r["kind"] == "post_proj"})
    table = Table(title=f"{run.task} ({'cached, ' if run.cached else ''}{run.seconds:.1f} s)")
    for col in ("representation", "best layer", "best head", *metrics):
        table.add_column(col)
    for kind in (*probe.kinds, "post_proj"):
        kind_rows = [r for r in rows if r["kind"] == kind and r["layer"] >= 0 or
                     (kind == "post_proj" and r["kind"] == "post_proj")]
        if not kind_rows:
            continue
        primary = [r for r in kind_rows if r["metric"] == probe.primary_metric and not math.isnan(r["value"])]
        if not primary:
            continue
        best = max(primary, key=lambda r: r["value"])
        at = {r["metric"]: r["value"] for r in kind_rows if r["layer"] == best["layer"] and r["head"] == best["head"]}
        label = "post-proj (baseline)" if kind == "post_proj" else f"image {kind} (max)"
        table.add_row(label, "-" if kind == "post_proj" else str(best["layer"]),
                      "-" if kind == "post_proj" else str(best["head"]),
                      *(f"{at[m]:.4g}" if m in at else "" for m in metrics))
    console.print(table)
    _print_footer(console, run, rows)


def _print_statistics(console: Console, run: ProbeRun, rows: list[dict]) -> None:
    """A probe whose metrics are statistics (no best head): their spread over (layer, head)."""
    from kvpipe.probes.report import metric_statistics

    table = Table(title=f"{run.task} ({'cached, ' if run.cached else ''}{run.seconds:.1f} s)")
    for col in ("metric", "kind", "heads", "min", "median", "max", "flagged"):
        table.add_column(col)
    for st in metric_statistics(rows):
        table.add_row(st["metric"], st["kind"], str(st["n"]), f"{st['min']:.4g}", f"{st['median']:.4g}",
                      f"{st['max']:.4g}", "" if st["flagged"] is None else f"{st['flagged']} of {st['n']}")
    console.print(table)
    _print_footer(console, run, rows)


def _print_footer(console: Console, run: ProbeRun, rows: list[dict]) -> None:
    for r in rows:
        if r["layer"] < 0 and r["kind"] != "post_proj":
            console.print(f"  {r['metric']}: {r['value']:.4g}")
    console.print(f"  table: {run.out_dir / 'results.parquet'} (+ .csv)")
    for p in run.plots:
        console.print(f"  plot: {p}")
    for saved in run.predictions:
        console.print(f"  predictions: {run.out_dir / saved['path']} ({saved['why']})", soft_wrap=True,
                      highlight=False)
