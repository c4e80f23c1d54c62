"""One page (Markdown or HTML) summarising every probe run on a store.

Why: after ``kvpipe probe --task all`` the results are spread over STORE/probes/<task>/; a
reader wants the paper's Table 1 -- per task, the best image value and image key (layer, head)
against the post-projection baseline -- and the plots, in one file that renders anywhere
(GitHub, a browser) and whose images are relative paths next to it.

Input: the results tables STORE/probes/<task>/results.parquet (and run.json, the parameters;
``runner.results_dir``: ./kvpipe-probes/<url> for a store given by URL),
written by ``run_probe``; nothing is recomputed. Where a probe saved predictions
(``predictions/``), the page also shows a few of them as pictures (the paper's Figures 16-18:
predicted masks over the images, propagated video frames, keypoint matches, PCA colours of the
image keys), drawn by ``probes/gallery.py`` into ``figures/`` next to the page. Tasks whose probe is ``ranked`` (higher is
better) enter the summary table; the others (input-agnostic: a variance statistic) get the
spread of their metrics and their flags instead.
"""

from __future__ import annotations

import html
import json
import math
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Target
from kvpipe.probes.gallery import (load_saved, pca_pictures, pick_saved, prediction_pictures, record_target,
                                   saved_records, shown_images)
from kvpipe.probes.images import ImageSource
from kvpipe.probes.predictions import target_label
from kvpipe.probes.runner import results_dir
from kvpipe.provenance import read_run_json
from kvpipe.store import FeatureStore

REPRESENTATIONS = (("post_proj", "Visual encoder (post-proj)"), ("values", "LM image value (max)"),
                   ("keys", "LM image key (max)"), ("hidden", "Vision encoder block output (max)"))

PICTURES_PER_TASK = 3  # prediction pictures per task in the report
Block = tuple  # ("h1"|"h2"|"h3"|"p", text) | ("table", header, rows) | ("img", path, alt) | ("list", items)


# ----------------------------------------------------------------------------- table logic
def best_row(rows: Iterable[dict[str, Any]], metric: str, kind: str) -> dict[str, Any] | None:
    """The row of ``kind`` with the largest finite ``metric`` (post_proj: its single row)."""
    cands = [r for r in rows if r["kind"] == kind and r["metric"] == metric and _finite(r["value"])
             and (kind == "post_proj" or r["layer"] >= 0)]
    return max(cands, key=lambda r: r["value"]) if cands else None


def metrics_at(rows: Iterable[dict[str, Any]], at: dict[str, Any]) -> dict[str, float]:
    """Every metric of the same (kind, layer, head) as ``at``."""
    return {r["metric"]: r["value"] for r in rows
            if (r["kind"], r["layer"], r["head"]) == (at["kind"], at["layer"], at["head"])}


def metric_statistics(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (metric, kind) over swept heads (layer >= 0): n, min, median, max; ``flagged`` counts the
    ones of a 0/1 metric (None for other metrics)."""
    groups: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        if r["layer"] >= 0 and _finite(r["value"]):
            groups.setdefault((r["metric"], r["kind"]), []).append(float(r["value"]))
    out = []
    for (metric, kind), vals in sorted(groups.items()):
        v = np.array(vals)
        binary = bool(np.isin(v, (0.0, 1.0)).all())
        out.append({"metric": metric, "kind": kind, "n": len(v), "min": float(v.min()),
                    "median": float(np.median(v)), "max": float(v.max()),
                    "flagged": int(v.sum()) if binary else None})
    return out


def flagged_heads(rows: Iterable[dict[str, Any]], metric: str, kind: str) -> str:
    """"0: 1,3; 5: 0" -- the (layer: heads) where a 0/1 metric is 1."""
    by_layer: dict[int, list[int]] = {}
    for r in rows:
        if r["metric"] == metric and r["kind"] == kind and r["layer"] >= 0 and r["value"] == 1.0:
            by_layer.setdefault(r["layer"], []).append(r["head"])
    return "; ".join(f"{l}: {','.join(str(h) for h in sorted(hs))}" for l, hs in sorted(by_layer.items()))


def summary_rows(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows that are not a (layer, head) or post-proj score: thresholds, counts, chosen layers."""
    return [r for r in rows if r["layer"] < 0 and r["kind"] != "post_proj"]


# ------------------------------------------------------------------------------- the page
def build_report(store_path: str | Path, out: str | Path | None = None, results: str | Path | None = None) -> Path:
    """Write the report of every <results>/<task>/results.parquet (default results: STORE/probes,
    where ``kvpipe probe`` writes without --out); Markdown unless ``out`` ends in .html / .htm.
    Default ``out``: <results>/report.md. Returns the path written."""
    store = FeatureStore.open(store_path)
    probes_dir = Path(results) if results is not None else results_dir(store.root)
    found = sorted(p for p in probes_dir.glob("*/results.parquet") if not p.parent.name.startswith("."))
    if not found:
        raise StoreError(f"no probe results under {probes_dir}; run kvpipe probe --task all --store {store.root} "
                         f"first (or point --results at the --out directory it used)")
    out = Path(out) if out is not None else probes_dir / "report.md"
    fmt = "html" if out.suffix.lower() in (".html", ".htm") else "md"
    if fmt == "md" and out.suffix.lower() not in (".md", ".markdown", ""):
        raise UsageError(f"--out {out}: the report is Markdown (.md) or HTML (.html); choose one of those")
    tasks = []
    for path in found:
        task = path.parent.name
        try:
            rows = pq.read_table(path).to_pylist()
        except Exception as err:
            raise StoreError(f"{path} is unreadable ({err}); rerun kvpipe probe --task {task} --no-cache") from None
        probe = PROBES.get(task) if task in PROBES else None
        metric = probe.primary_metric if probe else _first_metric(rows)
        ranked = probe.ranked if probe else True
        kinds = probe.kinds if probe else ("keys", "values")
        run = read_run_json(path) or {}
        plots = sorted(path.parent.glob("*.png"))
        tasks.append({"task": task, "rows": rows, "metric": metric, "ranked": ranked, "kinds": kinds,
                      "params": run.get("params"), "plots": plots, "dir": path.parent})
    blocks = _blocks(store, tasks, out.parent)
    blocks += _prediction_blocks(store, tasks, out.parent)
    out.parent.mkdir(parents=True, exist_ok=True)
    title = f"kvpipe report: {store.meta.model.name} on {store.meta.dataset.name}"
    out.write_text(_render_html(title, blocks) if fmt == "html" else _render_md(blocks))
    return out


def _blocks(store: FeatureStore, tasks: list[dict[str, Any]], base: Path) -> list[Block]:
    meta = store.meta
    blocks: list[Block] = [("h1", f"kvpipe report: {meta.model.name} on {meta.dataset.name}")]
    d = store.describe()
    blocks.append(("table", ["feature set", ""], [[k, str(d[k])] for k in
                   ("path", "model", "dataset", "images", "layers", "kv heads", "kinds", "keys", "dtype", "template")
                   if k in d]))
    ranked = [t for t in tasks if t["ranked"]]
    if ranked:
        blocks.append(("h2", "Summary (the paper's Table 1)"))
        blocks.append(("p", "Best score over every (layer, KV head) of the language model for image values and "
                            "image keys, against the visual features after the projector that the LM receives. "
                            "Scores that are fractions are shown x100; (L, H) = layer, KV head."))
        header = ["representation"] + [f"{t['task']} ({t['metric']})" for t in ranked]
        table = []
        for kind, label in REPRESENTATIONS:
            cells = []
            for t in ranked:
                b = best_row(t["rows"], t["metric"], kind)
                pct = _is_fraction(t["rows"], t["metric"])
                cells.append("-" if b is None else _fmt(b["value"], pct) +
                             ("" if kind == "post_proj" else f" (L{b['layer']} H{b['head']})"))
            if any(c != "-" for c in cells):
                table.append([label] + cells)
        blocks.append(("table", header, table))
    for t in tasks:
        blocks += _task_blocks(t, base)
    return blocks


def _task_blocks(t: dict[str, Any], base: Path) -> list[Block]:
    rows = t["rows"]
    out: list[Block] = [("h2", t["task"])]
    if t["params"]:
        out.append(("p", "parameters: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(t["params"].items()))))
    if t["ranked"]:
        metrics = sorted({r["metric"] for r in rows if r["layer"] >= 0 or r["kind"] == "post_proj"})
        table = []
        for kind, label in REPRESENTATIONS:
            b = best_row(rows, t["metric"], kind)
            if b is None:
                continue
            at = metrics_at(rows, b)
            table.append([label, "-" if kind == "post_proj" else str(b["layer"]),
                          "-" if kind == "post_proj" else str(b["head"])] +
                         [_fmt(at[m], False) if m in at else "" for m in metrics])
        out.append(("p", f"best (layer, KV head) by {t['metric']}; every metric at that head:"))
        out.append(("table", ["representation", "layer", "head"] + metrics, table))
    else:
        out.append(("p", f"{t['metric']} is a statistic, not a score: its spread over (layer, KV head)."))
        out.append(("table", ["metric", "kind", "heads", "min", "median", "max", "flagged"],
                    [[s["metric"], s["kind"], str(s["n"]), _fmt(s["min"], False), _fmt(s["median"], False),
                      _fmt(s["max"], False), "" if s["flagged"] is None else f"{s['flagged']} of {s['n']}"]
                     for s in metric_statistics(rows)]))
        for s in metric_statistics(rows):
            if s["flagged"]:
                out.append(("p", f"{s['metric']} = 1 at (layer: KV heads) " + flagged_heads(rows, s["metric"], s["kind"])))
    extra = summary_rows(rows)
    if extra:
        out.append(("list", [f"{r['metric']}: {_fmt(r['value'], False)}" for r in extra]))
    for p in t["plots"]:
        out.append(("img", Path(os.path.relpath(p, base)).as_posix(), p.stem))
    return out


def _prediction_blocks(store: FeatureStore, tasks: list[dict[str, Any]], base: Path) -> list[Block]:
    """Pictures of the predictions ``kvpipe probe`` saved (the best image values' by default):
    masks over images, propagated frames, keypoint matches, and the PCA colours of the same
    images' keys; PNG files under ``<report dir>/figures/<task>/``."""
    images = ImageSource(store)
    out: list[Block] = []
    for t in tasks:
        record = pick_saved(saved_records(t["dir"]), None)
        if record is None:
            continue
        try:
            preds = load_saved(t["dir"], record)
        except StoreError:
            continue
        target = record_target(record)
        pictures = prediction_pictures(store, preds, images, PICTURES_PER_TASK)
        pca_target = Target("keys", target.layer, target.head) if target.kind == "values" and \
            "keys" in store.meta.kinds else target
        pictures += pca_pictures(store, pca_target, shown_images(store, preds, 1), images)
        if not pictures:
            continue
        folder = base / "figures" / t["task"]
        folder.mkdir(parents=True, exist_ok=True)
        out.append(("h2", f"{t['task']}: predictions at {target_label(target)}"))
        out.append(("p", f"{record['why']}; saved in {Path(os.path.relpath(t['dir'] / record['path'], base)).as_posix()}"
                    + (f"; {images.problem}" if images.problem else "")))
        for i, pic in enumerate(pictures):
            path = folder / f"{i:02d}.png"
            pic.image.save(path)
            out.append(("img", Path(os.path.relpath(path, base)).as_posix(), f"{pic.title}. {pic.caption}"))
    return out


# ------------------------------------------------------------------------------- renderers
def _render_md(blocks: list[Block]) -> str:
    lines: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            lines += ["#" * int(b[0][1]) + " " + b[1], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "list":
            lines += [f"- {item}" for item in b[1]] + [""]
        elif b[0] == "table":
            header, rows = b[1], b[2]
            lines.append("| " + " | ".join(_md_cell(c) for c in header) + " |")
            lines.append("|" + "|".join(["---"] * len(header)) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render_html(title: str, blocks: list[Block]) -> str:
    e = html.escape
    body: list[str] = []
    for b in blocks:
        if b[0] in ("h1", "h2", "h3"):
            body.append(f"<{b[0]}>{e(b[1])}</{b[0]}>")
        elif b[0] == "p":
            body.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "list":
            body.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b[1]) + "</ul>")
        elif b[0] == "table":
            head = "".join(f"<th>{e(str(c))}</th>" for c in b[1])
            rows = "".join("<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif b[0] == "img":
            body.append(f'<figure><img src="{e(b[1], quote=True)}" alt="{e(b[2], quote=True)}">'
                        f"<figcaption>{e(b[2])}</figcaption></figure>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:0.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "text-align:left}th{background:#f3f3f3}img{max-width:100%}figcaption{color:#666;font-size:90%}")
    return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{e(title)}</title>"
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# ----------------------------------------------------------------------------------- helpers
def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _is_fraction(rows: list[dict[str, Any]], metric: str) -> bool:
    vals = [r["value"] for r in rows if r["metric"] == metric and _finite(r["value"])]
    return bool(vals) and all(0.0 <= v <= 1.0 for v in vals)


def _fmt(v: float, percent: bool) -> str:
    if not _finite(v):
        return "nan"
    return f"{100 * v:.1f}" if percent else f"{v:.4g}"


def _first_metric(rows: list[dict[str, Any]]) -> str:
    metrics = [r["metric"] for r in rows if r["layer"] >= 0]
    return metrics[0] if metrics else (rows[0]["metric"] if rows else "")


