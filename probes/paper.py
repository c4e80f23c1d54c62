"""``kvpipe paper``: the paper's Tables 1, 2, 4, 5, 6 and Figures 2, 3, 11-13 in one folder.

Why one command: after extracting and probing several models and datasets, the comparison
with the paper is a matter of reading many results tables; this writes each table and figure
as Markdown (kvpipe's number, the paper's beside it), CSV (table, row, column, value, paper,
where) and PNG, from results already on disk (``paper_tables``, ``paper_figures``). Inputs:
``stores`` (unprefixed: Tables 1, 2, 6, Figure 2), ``prefix_stores`` (Table 4's conditions),
``results`` (``kvpipe paired`` folders: Table 5; ``kvpipe figure3`` folders: Figure 3).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from kvpipe.errors import UsageError
from kvpipe.probes import paper_figures as figs
from kvpipe.probes.paper_tables import (PaperTable, StoreSet, check_plain_store, check_prefix_store, table1, table2,
                                        table4, table5, table6)
from kvpipe.probes.plots import plot_layer_head, plot_panels, plot_table_bars
from kvpipe.provenance import write_run_json

TABLE_COLUMNS = ("table", "row", "column", "value", "paper", "where")


@dataclass
class PaperOutput:
    tables: dict[str, PaperTable] = field(default_factory=dict)
    files: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def parse_renames(items: Sequence[str]) -> dict[str, str]:
    """``--paper-model STORE_MODEL=PAPER_MODEL`` (repeatable) -> {store model: paper model}."""
    out = {}
    for item in items:
        name, sep, paper = item.partition("=")
        if not sep or not name.strip() or not paper.strip():
            raise UsageError(f"--paper-model {item!r} must be STORE_MODEL=PAPER_MODEL, e.g. my-ov-ckpt=llava-ov")
        out[name.strip()] = paper.strip()
    return out


def classify_results(folders: Sequence[str | Path]) -> tuple[list[Path], list[Path]]:
    """(paired folders, figure3 folders); a one-line error for a folder that is neither."""
    paired, fig3 = [], []
    for f in map(Path, folders):
        if (f / "paired.parquet").is_file() or (f / "paired.csv").is_file():
            paired.append(f)
        elif (f / "figure3.csv").is_file():
            fig3.append(f)
        else:
            raise UsageError(f"--results {f}: neither a kvpipe paired folder (paired.parquet) nor a kvpipe figure3 "
                             f"folder (figure3.csv); give the --out folder of one of those commands")
    return paired, fig3


def write_paper(stores: Sequence[str], out: str | Path, *, prefix_stores: Sequence[str] = (),
                results: Sequence[str | Path] = (), renames: Mapping[str, str] | None = None,
                normalise: str = "none", record: dict[str, Any] | None = None) -> PaperOutput:
    """Check every input first (one-line errors), then write OUT/<table|figure>.{md,csv,png}."""
    renames = dict(renames or {})
    figs.check_normalise(normalise)
    if not stores and not prefix_stores and not results:
        raise UsageError("give --stores (and/or --prefix-stores, --results): kvpipe paper reads their results")
    plain = StoreSet.open(stores, renames)
    prefixed = StoreSet.open(prefix_stores, renames)
    for group in plain.by_model.values():
        for path, meta in group:
            check_plain_store(path, meta)
    for group in prefixed.by_model.values():
        for path, meta in group:
            check_prefix_store(path, meta)
    paired, fig3 = classify_results(results)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    result = PaperOutput()
    tables = [table1(plain), table2(plain), table4(plain, prefixed), table5(paired, renames), table6(plain)]
    for t in tables:
        result.tables[t.name] = t
        result.files += write_table(t, out)
        result.notes += [f"{t.name}: {n}" for n in dict.fromkeys(t.notes)]
    panels = figs.model_panels(plain, normalise)
    result.files += write_figure2(panels, out, normalise)
    result.notes += [n for mp in panels for n in mp.notes]
    result.files += write_figure3(figs.figure3_rows(fig3, renames), out)
    result.files.append(write_run_json(out, {**(record or {}), "stores": list(stores),
                                             "prefix_stores": list(prefix_stores),
                                             "results": [str(r) for r in results], "paper_models": renames,
                                             "normalise": normalise}))
    return result


# ------------------------------------------------------------------------------------ writers
def _num(v: Any) -> str:
    if v is None:
        return "–"
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def _write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows([["" if v is None else v for v in r] for r in rows])
    return path


def write_table(t: PaperTable, out: Path) -> list[Path]:
    """OUT/NAME.md (kvpipe | paper per column; – = missing), NAME.csv (tidy) and NAME.png (bars)."""
    header = ["row"] + [x for c in t.columns for x in (c, "paper")]
    lines = [f"# {t.title}", "", "kvpipe's number, the paper's beside it; – : not computed from the given inputs "
             "(or not printed by the paper).", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in t.rows:
        cells = [x for c in t.columns for x in (_num(t.cell(row, c).value), _num(t.cell(row, c).paper))]
        lines.append("| " + " | ".join([row] + cells) + " |")
    if t.notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in dict.fromkeys(t.notes)]
    md = out / f"{t.name}.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    rows = [(t.name, row, c, t.cell(row, c).value, t.cell(row, c).paper, t.cell(row, c).where)
            for row in t.rows for c in t.columns]
    csv_path = _write_csv(out / f"{t.name}.csv", TABLE_COLUMNS, rows)
    numeric = lambda v: v if isinstance(v, float) else None  # noqa: E731
    png = plot_table_bars([f"{r[1]} | {r[2]}" for r in rows], [r[3] for r in rows], [numeric(r[4]) for r in rows],
                          out / f"{t.name}.png", t.title)
    return [md, csv_path, png]


def write_figure2(panels: list[figs.ModelPanels], out: Path, normalise: str) -> list[Path]:
    """figure2.md/.csv, figure2-MODEL.png (averaged panels), figure2-MODEL-tasks.png, and per model
    its Figure 11-13 (segmentation average): NAME.md/.csv/.png."""
    unit = "score (%)" if normalise == "none" else f"score ({normalise}-normalised per task)"
    peaks = figs.paper_peaks()
    files: list[Path] = []
    rows, lines = [], ["# Figure 2: image-value score per (layer, KV head)", "",
                       f"Averaged panels: the per-head mean over the tasks present, normalisation `{normalise}`.", "",
                       "| model | panel | tasks | peak layer (kvpipe) | peak layers (paper) | image |", "|---|---|---|---|---|---|"]
    for mp in panels:
        avg = [(p.scores, f"{name} ({len(p.tasks)} tasks)", p.baseline) for name, p in mp.averages.items()]
        if avg:
            files.append(plot_panels(avg, unit, out / f"figure2-{mp.model}.png", f"{mp.model}: averaged"))
        tasks = [(p.scores, name, p.baseline) for name, p in mp.tasks.items()]
        files.append(plot_panels(tasks, "score (%)", out / f"figure2-{mp.model}-tasks.png", f"{mp.model}: per task"))
        for name, p in {**mp.tasks, **mp.averages}.items():
            paper = peaks.get(name) if mp.model == figs.LLAVA_OV else None
            image = f"figure2-{mp.model}.png" if name in mp.averages else f"figure2-{mp.model}-tasks.png"
            lines.append(f"| {mp.model} | {name} | {', '.join(p.tasks)} | {_num(p.peak_layer())} | {_num(paper)} | "
                         f"![{name}]({image}) |")
            rows += [(mp.model, name, layer, head, None if v != v else float(v))
                     for layer, line in enumerate(p.scores) for head, v in enumerate(line)]
        if "segmentation" in mp.averages:
            files += _appendix_figure(mp.model, mp.averages["segmentation"], out, unit)
    if mp_notes := [n for mp in panels for n in mp.notes]:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in mp_notes]
    if not panels:
        lines += ["", "No store with image-value results was given (--stores, after kvpipe probe)."]
    md = out / "figure2.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    files += [md, _write_csv(out / "figure2.csv", ("model", "panel", "layer", "head", "value"), rows)]
    # figure2.png: the paper's model (else the first) as the paper draws it, averaged panels side by side
    first = next((mp for mp in panels if mp.model == figs.LLAVA_OV), panels[0] if panels else None)
    avg = [(p.scores, name, p.baseline) for name, p in first.averages.items()] if first else []
    files.append(plot_panels(avg, unit, out / "figure2.png", f"{first.model}: averaged" if first else
                             "no image-value results given"))
    return files


def _appendix_figure(model: str, panel: figs.Panel, out: Path, unit: str) -> list[Path]:
    name = figs.appendix_name(model)
    png = plot_layer_head(panel.scores, f"{model}: segmentation averaged over {', '.join(panel.tasks)}", unit,
                          out / f"{name}.png", panel.baseline)
    per_layer = [(layer, None if not (line == line).any() else float(max(v for v in line if v == v)))
                 for layer, line in enumerate(panel.scores)]
    md = out / f"{name}.md"
    md.write_text("\n".join([f"# {name}: {model}, segmentation averaged over {len(panel.tasks)} tasks", "",
                             f"![{name}]({name}.png)", "", "| layer | max over heads |", "|---|---|"]
                            + [f"| {l} | {_num(v)} |" for l, v in per_layer]) + "\n", encoding="utf-8")
    rows = [(model, layer, head, None if v != v else float(v)) for layer, line in enumerate(panel.scores)
            for head, v in enumerate(line)]
    return [md, _write_csv(out / f"{name}.csv", ("model", "layer", "head", "value"), rows), png]


def write_figure3(rows: list[figs.Figure3Row], out: Path) -> list[Path]:
    """figure3.md/.csv/.png: kvpipe's x and y per model, the paper's x beside (Table 6's Average)."""
    from kvpipe.probes.figure3 import plot_figure3

    lines = ["# Figure 3: image-value segmentation against MLM perception accuracy", "",
             "| model | x segmentation (kvpipe) | x (paper) | y MLM accuracy (kvpipe) | y (paper) |", "|---|---|---|---|---|"]
    lines += [f"| {r.model} | {_num(r.x)} | {_num(r.paper_x)} | {_num(r.y)} | – |" for r in rows]
    if not rows:
        lines += ["", "No kvpipe figure3 folder was given (--results)."]
    md = out / "figure3.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    csv_path = _write_csv(out / "figure3.csv", ("model", "x_segmentation", "paper_x", "y_mlm_accuracy", "paper_y",
                                                "where"),
                          [(r.model, r.x, r.paper_x, r.y, None, r.folder) for r in rows])
    points = [r for r in rows if r.x is not None and r.y is not None]
    if points:
        png = plot_figure3([r.model for r in points], [r.x / 100 for r in points], [r.y / 100 for r in points],
                           out / "figure3.png")
    else:
        png = plot_panels([], "", out / "figure3.png", "no kvpipe figure3 results given")
    return [md, csv_path, png]
