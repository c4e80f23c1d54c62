"""The paper's Figures 2, 3 and 11-13 from stores' probe results and ``kvpipe figure3`` folders.

Figure 2: per model, every task's per-(layer, KV head) image-value score (per-layer max on top,
heads x layers below, post-proj baseline in red) and the averaged panels, segmentation (the
four segmentation tasks) and correspondence (SPair-71K, DAVIS). The caption names no
normalisation, and Table 6's "Average" is the plain mean of the four raw task scores
((26.2 + 61.6 + 54.6 + 64.8) / 4 = 51.8, likewise 47.5 and 53.5), so the averaged panels are
the plain per-(layer, head) mean of the tasks' scores in percent (``normalise="none"``);
``minmax`` (each task's map scaled to [0, 1] before averaging) is offered for comparing shapes.
Figures 11-13 are the segmentation panel of LLaVA-OneVision 7B, Qwen2.5-VL 7B and
Llama-3-LLaVA-NeXT 8B; other models get one such figure each.
Figure 3: the rows of figure3.csv re-plotted; the paper prints no numbers for it, but its x is
Table 6's Average for the two models Table 6 shares with it, which stand beside kvpipe's x.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.paper_data import paper_cells
from kvpipe.probes.paper_tables import LLAMA3_NEXT, LLAVA_OV, PERCENT, QWEN25, StoreSet
from kvpipe.probes.prefix_report import results_table
from kvpipe.probes.runner import layer_head_matrix
from kvpipe.store import FeatureStore

SEG_TASKS = ("fg-seg", "cosegmentation", "semantic-seg", "refexp-seg")
CORR_TASKS = ("semantic-corr", "temporal-corr")
PANELS = {"segmentation": SEG_TASKS, "correspondence": CORR_TASKS}
APPENDIX_FIGURES = {LLAVA_OV: "figure11", QWEN25: "figure12", LLAMA3_NEXT: "figure13"}
PAPER_LABELS = {LLAVA_OV: "LLaVA-OneVision 7B", QWEN25: "Qwen-2.5VL 7B"}  # figure3.csv rows


def _none(m: np.ndarray) -> np.ndarray:
    return m


def _minmax(m: np.ndarray) -> np.ndarray:
    finite = np.isfinite(m)
    if not finite.any():
        return m
    lo, hi = m[finite].min(), m[finite].max()
    return np.zeros_like(m) if hi == lo else (m - lo) / (hi - lo)


NORMALISATIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {"none": _none, "minmax": _minmax}


def check_normalise(name: str) -> None:
    if name not in NORMALISATIONS:
        raise UsageError(f"--normalise {name!r} must be one of {', '.join(NORMALISATIONS)}")


@dataclass
class Panel:
    """One heatmap: a task or an average of tasks, of one model: (layers, heads) in percent."""

    model: str
    name: str  # a task, "segmentation" or "correspondence"
    scores: np.ndarray
    baseline: float | None = None  # post-proj, percent
    tasks: tuple[str, ...] = ()
    where: str = ""

    def peak_layer(self) -> int | None:
        finite = np.isfinite(self.scores)
        if not finite.any():
            return None
        return int(np.argmax(np.where(finite, self.scores, -np.inf).max(axis=1)))


@dataclass
class ModelPanels:
    model: str
    tasks: dict[str, Panel] = field(default_factory=dict)
    averages: dict[str, Panel] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def task_panel(model: str, stores, task: str) -> Panel | None:
    """The model's first store with ``task`` results: its image-value matrix over every layer and head."""
    metric = PROBES.get(task).primary_metric
    for path, meta in stores:
        if task not in (meta.dataset.tasks or ()) or "values" not in meta.kinds:
            continue
        try:
            table = pq.read_table(results_table(FeatureStore.open(path), task))
        except StoreError:
            continue
        layers, heads = tuple(range(meta.n_layers)), tuple(range(meta.n_kv_heads))
        m = layer_head_matrix(table, metric, "values", layers, heads) * PERCENT
        base = [r["value"] for r in table.to_pylist() if r["kind"] == "post_proj" and r["metric"] == metric]
        return Panel(model, task, m, base[0] * PERCENT if base else None, (task,), path)
    return None


def model_panels(stores: StoreSet, normalise: str = "none") -> list[ModelPanels]:
    """Per model with image values: its task panels and the averaged panels of the tasks present."""
    check_normalise(normalise)
    norm = NORMALISATIONS[normalise]
    out = []
    for model in stores.models_with("values"):
        mp = ModelPanels(model)
        group = stores.by_model[model]
        for task in SEG_TASKS + CORR_TASKS:
            panel = task_panel(model, group, task)
            if panel is not None:
                mp.tasks[task] = panel
        for name, tasks in PANELS.items():
            have = [mp.tasks[t] for t in tasks if t in mp.tasks]
            if not have:
                continue
            if len({p.scores.shape for p in have}) > 1:
                mp.notes.append(f"{model} {name}: the tasks' stores hold different layer/head counts; not averaged")
                continue
            missing = [t for t in tasks if t not in mp.tasks]
            if missing:
                mp.notes.append(f"{model} {name}: averaged over {len(have)} of {len(tasks)} tasks "
                                f"(no results for {', '.join(missing)})")
            with np.errstate(invalid="ignore"):
                avg = np.mean(np.stack([norm(p.scores) for p in have]), axis=0)
            bases = [p.baseline for p in have]
            base = float(np.mean(bases)) if normalise == "none" and all(b is not None for b in bases) else None
            mp.averages[name] = Panel(model, name, avg, base, tuple(p.name for p in have))
        if mp.tasks:
            out.append(mp)
    return out


def appendix_name(model: str) -> str:
    return APPENDIX_FIGURES.get(model, f"figure-seg-{model}")


def paper_peaks() -> dict[str, str]:
    """{panel: the paper's peak layers} (Section 3.1, LLaVA-OneVision 7B)."""
    return {row: str(v) for (row, col), v in paper_cells("figure2").items() if col == "peak layers"}


# ---------------------------------------------------------------------------------------- Figure 3
@dataclass
class Figure3Row:
    model: str
    x: float | None
    y: float | None
    paper_x: float | None
    folder: str


def figure3_rows(folders: Sequence[Path], rename: Mapping[str, str]) -> list[Figure3Row]:
    """figure3.csv rows of ``kvpipe figure3`` folders (percent), with the paper's x where known."""
    paper = {row: v for (row, col), v in paper_cells("figure3").items() if col == "x segmentation"}
    by_label = {label: paper.get(label) for label in paper}
    for key, label in PAPER_LABELS.items():
        by_label[key] = paper.get(label)
    out = []
    for folder in folders:
        path = folder / "figure3.csv"
        with path.open(encoding="utf-8", newline="") as f:
            for r in csv.DictReader(f):
                name = rename.get(r["model"], r["model"])
                x, y = r.get("x_segmentation"), r.get("y_mlm_accuracy")
                out.append(Figure3Row(name, float(x) * PERCENT if x else None, float(y) * PERCENT if y else None,
                                      by_label.get(name), str(folder)))
    return out
