"""The paper's Figure 3: image-value segmentation quality against the MLM's perception accuracy.

Why: Section 3.1 (and Appendix A.5) compares, across models, (x) the best image value of the
language model averaged over the four segmentation probes -- foreground segmentation,
co-segmentation, semantic segmentation, referring-expression segmentation -- with (y) the
MLM's own accuracy on perception-heavy VQA: CV-Bench (2,637 test questions) plus BLINK's
Counting, Object_Localization, Relative_Depth and Spatial_Relation (1,021 questions: val 509 +
test 512, the counts of the BLINK-Benchmark/BLINK dataset card), 3,658 in all. BLINK's test
answers are not public, so ``kvpipe answer --benchmark blink --split perception`` scores the 509
val questions (3,146 in all with CV-Bench) unless given a copy with test answers
(``--option data_split=val+test``); the note printed then says which part is missing.

One point per model:

* x: for each segmentation task, the first of the model's stores whose dataset supports it is
  probed (``run_probe``, cached like ``kvpipe probe``) and its best (layer, head) of image
  values on the probe's primary metric is taken (fg-seg mIoU, cosegmentation J_m,
  semantic-seg mIoU, refexp-seg mIoU); x is the mean of the four.
* y: the score files of ``kvpipe answer`` (scores.csv / scores.parquet; or answers.parquet).
  ``pooled`` (default): total correct over total questions of all files -- for 3,658
  questions, correct / 3,658, the paper's "evaluate MLMs across these 3,658 test samples".
  A scores file contributes accuracy x n of its "all" rows (BLINK: ``accuracy_pooled``, the
  pooled accuracy; CV-Bench: ``accuracy``, already pooled); an answers file its ``correct``
  column. ``mean``: the unweighted mean of the files' pooled accuracies.

Things that belong together are checked: a point's stores must come from one model, and a
score file with a run.json beside it (what ``kvpipe answer`` writes) from that same model and
from the unmodified model (not a knock-out condition); otherwise a one-line refusal.
``params`` pick which cached probe results are read (``--param KEY=VALUE`` for every task that
takes KEY, ``--param TASK.KEY=VALUE`` for one).

Outputs: figure3.csv (one row per model: x, y, the per-task bests and where they came from,
questions and correct answers), figure3.png (scatter, labelled points, in percent) and run.json
(kvpipe version, command line, parameters, and per point its stores' model and datasets and
its score files' runs).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from kvpipe.errors import UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.paired import correct_flags, read_answer_table
from kvpipe.probes.runner import run_probe
from kvpipe.provenance import describe_model, model_identity, model_mismatch, read_run_json, write_run_json
from kvpipe.store import FeatureStore

SEGMENTATION_TASKS = ("fg-seg", "cosegmentation", "semantic-seg", "refexp-seg")
Y_MODES = ("pooled", "mean")
CVBENCH_QUESTIONS = 2637  # CV-Bench test
BLINK_PERCEPTION_VAL, BLINK_PERCEPTION_TEST = 509, 512  # pipeline/vqa/blink.py PERCEPTION_COUNTS
PAPER_QUESTIONS = CVBENCH_QUESTIONS + BLINK_PERCEPTION_VAL + BLINK_PERCEPTION_TEST  # 3,658


def questions_note(name: str, n: int) -> str:
    """What a point's question count says about the paper's 3,658 (CV-Bench test + BLINK
    perception val + test); "" when it is the paper's set."""
    if n == PAPER_QUESTIONS:
        return ""
    if n == CVBENCH_QUESTIONS + BLINK_PERCEPTION_VAL:
        return (f"{name}: {n} questions = CV-Bench {CVBENCH_QUESTIONS} + BLINK perception val "
                f"{BLINK_PERCEPTION_VAL}; the paper's {PAPER_QUESTIONS} also count BLINK's {BLINK_PERCEPTION_TEST} "
                f"perception test questions (answers not public)")
    return (f"{name}: {n} questions (the paper's set: CV-Bench {CVBENCH_QUESTIONS} + BLINK perception "
            f"{BLINK_PERCEPTION_VAL + BLINK_PERCEPTION_TEST} (val {BLINK_PERCEPTION_VAL} + test "
            f"{BLINK_PERCEPTION_TEST}) = {PAPER_QUESTIONS})")


@dataclass(frozen=True)
class ModelPoint:
    """One model: a label, its stores (segmentation datasets) and its VQA score files."""

    name: str
    stores: tuple[str, ...]
    scores: tuple[str, ...]


@dataclass
class Figure3Result:
    rows: list[dict[str, Any]]
    csv: Path
    png: Path
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------ specification
def parse_point(text: str) -> ModelPoint:
    """ "NAME:STORE1,STORE2,...:SCORES1,SCORES2,..." (store URLs such as s3://b/s may contain ":")."""
    if text.count(":") < 2:
        raise UsageError(f"--point {text!r} must look like NAME:STORE1,STORE2:SCORES.csv")
    name, rest = text.split(":", 1)
    stores, scores = rest.rsplit(":", 1)
    return _point(name, stores.split(","), scores.split(","), f"--point {text!r}")


def read_spec(path: str | Path) -> list[ModelPoint]:
    """A JSON (or YAML) file: [{"name", "stores": [...], "scores": [...]}, ...] or {"points": [...]}."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise UsageError(f"--spec {path} is unreadable ({err.strerror or err})") from None
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--spec {path}: reading YAML needs pyyaml (pip install pyyaml), or write "
                                 f"the spec as JSON") from None
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except UsageError:
        raise
    except Exception as err:
        raise UsageError(f"--spec {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'} ({err})") from None
    if isinstance(data, dict):
        data = data.get("points")
    if not isinstance(data, list) or not data:
        raise UsageError(f"--spec {path} must hold a list of points {{name, stores, scores}} (or {{points: [...]}})")
    out = []
    for n, p in enumerate(data):
        if not isinstance(p, dict) or not {"name", "stores", "scores"} <= set(p):
            raise UsageError(f"--spec {path}: point {n} needs name, stores and scores")
        stores = [p["stores"]] if isinstance(p["stores"], str) else p["stores"]
        scores = [p["scores"]] if isinstance(p["scores"], str) else p["scores"]
        out.append(_point(str(p["name"]), stores, scores, f"--spec {path} point {n}"))
    return out


def _point(name: str, stores: Sequence[Any], scores: Sequence[Any], where: str) -> ModelPoint:
    stores = tuple(str(s).strip() for s in stores if str(s).strip())
    scores = tuple(str(s).strip() for s in scores if str(s).strip())
    if not name.strip() or not stores or not scores:
        raise UsageError(f"{where}: a point needs a name, at least one store and at least one score file")
    return ModelPoint(name.strip(), stores, scores)


# -------------------------------------------------------------------------------------- x
def segmentation_score(stores: Sequence[str], tasks: Sequence[str] = SEGMENTATION_TASKS, kind: str = "values",
                       use_cache: bool = True, params: dict[str, dict[str, Any]] | None = None,
                       on_task: Callable[[str, str], None] | None = None) -> tuple[float, dict[str, dict[str, Any]]]:
    """Mean over ``tasks`` of the best ``kind`` (layer, head) score, and per task: value, metric,
    layer, head, store. Each task runs on the first store whose dataset supports it."""
    metas = {s: FeatureStore.open(s).meta for s in stores}
    best: dict[str, dict[str, Any]] = {}
    for task in tasks:
        probe = PROBES.get(task)
        store = next((s for s in stores if task in (metas[s].dataset.tasks or ())
                      and not probe.unavailable(metas[s])), None)
        if store is None:
            raise UsageError(f"no store among {', '.join(stores)} supports {task}; add a store extracted from a "
                             f"{task} dataset (Figure 3 averages {', '.join(tasks)})")
        if on_task is not None:
            on_task(task, store)
        run = run_probe(store, task, (params or {}).get(task), use_cache=use_cache)
        row = run.best(probe.primary_metric, kind)
        if row is None:
            raise UsageError(f"{task} on {store} has no finite {probe.primary_metric} for image {kind}; is "
                             f"{kind} stored?")
        best[task] = {"value": float(row["value"]), "metric": probe.primary_metric, "layer": int(row["layer"]),
                      "head": int(row["head"]), "store": str(store)}
    return float(np.mean([b["value"] for b in best.values()])), best


# -------------------------------------------------------------------------------------- y
def file_accuracy(path: str | Path) -> tuple[float, int]:
    """(correct answers, questions) of one ``kvpipe answer`` scores or answers file."""
    table = read_answer_table(path, "score file", "scores.csv")
    cols = table.column_names
    if "correct" in cols:  # answers.parquet: one row per question
        flags = correct_flags(table.column("correct").to_pylist())
        if not flags:
            raise UsageError(f"answers file {path} has no rows")
        return float(sum(flags)), len(flags)
    if not {"subset", "metric", "value"} <= set(cols):
        raise UsageError(f"{path} is neither a kvpipe answer scores file (subset, metric, value) nor an answers "
                         f"file (qid, correct)")
    overall = {r["metric"]: r["value"] for r in table.to_pylist() if str(r["subset"]) == "all"}
    acc = overall.get("accuracy_pooled", overall.get("accuracy"))
    n = overall.get("n")
    if acc is None or n is None or not n > 0:
        raise UsageError(f"scores file {path} has no 'all' accuracy and n rows; pass the scores.csv of kvpipe answer")
    return float(acc) * float(n), int(round(float(n)))


def mlm_accuracy(files: Sequence[str], mode: str = "pooled") -> tuple[float, float, int]:
    """(y, correct, questions) over the score files; ``mode`` pooled or mean (see the module doc)."""
    if mode not in Y_MODES:
        raise UsageError(f"--y {mode!r} must be one of {', '.join(Y_MODES)}")
    parts = [file_accuracy(f) for f in files]
    correct = sum(c for c, _ in parts)
    n = sum(k for _, k in parts)
    y = correct / n if mode == "pooled" else float(np.mean([c / k for c, k in parts]))
    return y, correct, n


# ---------------------------------------------------------------------------------- checks
def task_params(params: dict[str, Any], tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """--param items as per-task parameters: ``TASK.KEY`` for that task, ``KEY`` for every task
    whose probe takes it (a KEY no task takes is a UsageError)."""
    out: dict[str, dict[str, Any]] = {t: {} for t in tasks}
    for key, value in params.items():
        task, dot, name = key.rpartition(".")
        if dot:
            if task not in out:
                raise UsageError(f"--param {key}: {task!r} is not one of the tasks {', '.join(tasks)}")
            out[task][name] = value
            continue
        takers = [t for t in tasks if key in PROBES.get(t).defaults]
        if not takers:
            raise UsageError(f"--param {key}: none of {', '.join(tasks)} takes it; use TASK.KEY=VALUE")
        for t in takers:
            out[t][key] = value
    return {t: p for t, p in out.items() if p}


def check_point(point: ModelPoint) -> dict[str, Any]:
    """Refuse (one line) a point whose stores or score files come from different models, or a
    score file of a knock-out condition; return what its run.json records of the point."""
    metas = {s: FeatureStore.open(s).meta for s in point.stores}
    first, model = next(iter(metas.items()))
    for store, meta in metas.items():
        other = model_mismatch(model.model, meta.model)
        if other:
            raise UsageError(f"point {point.name!r}: stores {first} and {store} come from different models "
                             f"({other}); one point is one model")
    runs = {}
    for scores in point.scores:
        run = read_run_json(scores)
        if run is None:
            continue
        other = model_mismatch(model.model, run)
        if other:
            raise UsageError(f"point {point.name!r}: {scores} was answered by another model than its stores "
                             f"({other}); give the score files of the stores' model")
        condition = (run.get("condition") or {}).get("name", "none")
        if condition != "none":
            raise UsageError(f"point {point.name!r}: {scores} holds answers under knock-out {condition!r}; give "
                             f"the unmodified model's scores (kvpipe answer's scores.csv)")
        runs[scores] = {k: run.get(k) for k in ("model", "checkpoint", "revision", "benchmark", "data_root",
                                                 "split", "limit", "options")}
    return {"model": describe_model(model_identity(model.model)),
            "stores": {s: {"model": m.model, "dataset": m.dataset} for s, m in metas.items()}, "score_runs": runs}


# ---------------------------------------------------------------------------------- figure
def figure3(points: Sequence[ModelPoint], out_dir: str | Path, tasks: Sequence[str] = SEGMENTATION_TASKS,
            y_mode: str = "pooled", use_cache: bool = True,
            on_task: Callable[[str, str, str], None] | None = None,
            params: dict[str, dict[str, Any]] | None = None,
            provenance: dict[str, Any] | None = None) -> Figure3Result:
    """Compute every point, write figure3.csv, figure3.png and run.json under ``out_dir``."""
    if not points:
        raise UsageError("Figure 3 needs at least one point (--point NAME:STORES:SCORES)")
    names = [p.name for p in points]
    if len(set(names)) < len(names):
        raise UsageError(f"point names must differ; {sorted(n for n in names if names.count(n) > 1)[0]!r} repeats")
    checked = {p.name: check_point(p) for p in points}  # before any probe runs
    rows, notes = [], []
    for p in points:
        x, best = segmentation_score(p.stores, tasks, use_cache=use_cache, params=params,
                                     on_task=(lambda t, s, name=p.name: on_task(name, t, s)) if on_task else None)
        y, correct, n = mlm_accuracy(p.scores, y_mode)
        note = questions_note(p.name, n)
        if note:
            notes.append(note)
        row: dict[str, Any] = {"model": p.name, "x_segmentation": x, "y_mlm_accuracy": y, "y_mode": y_mode,
                               "mlm_correct": correct, "mlm_questions": n}
        for task, b in best.items():
            row[f"{task}_{b['metric']}"] = b["value"]
            row[f"{task}_at"] = f"L{b['layer']}H{b['head']}@{b['store']}"
        row["score_files"] = ";".join(p.scores)
        rows.append(row)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "figure3.csv"
    pacsv.write_csv(pa.Table.from_pylist(rows), csv)
    png = plot_figure3([r["model"] for r in rows], [r["x_segmentation"] for r in rows],
                       [r["y_mlm_accuracy"] for r in rows], out / "figure3.png", tasks)
    write_run_json(out, {**(provenance or {}), "tasks": list(tasks), "y_mode": y_mode, "probe_params": params or {},
                         "points": [{"name": p.name, "stores": list(p.stores), "scores": list(p.scores),
                                     **checked[p.name]} for p in points]})
    return Figure3Result(rows, csv, png, notes)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) < 3 or np.std(x) == 0 or np.std(y) == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def plot_figure3(labels: Sequence[str], x: Sequence[float], y: Sequence[float], path: str | Path,
                 tasks: Sequence[str] = SEGMENTATION_TASKS) -> Path:
    """Scatter of the points in percent, each labelled; a least-squares line from 3 points on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs, ys = 100 * np.asarray(x, np.float64), 100 * np.asarray(y, np.float64)
    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    ax.scatter(xs, ys, s=40, color="tab:blue", zorder=3)
    for label, a, b in zip(labels, xs, ys):
        ax.annotate(label, (a, b), textcoords="offset points", xytext=(5, 5), fontsize=8)
    r = pearson(xs, ys)
    if np.isfinite(r):
        slope, icpt = np.polyfit(xs, ys, 1)
        grid = np.linspace(xs.min(), xs.max(), 20)
        ax.plot(grid, slope * grid + icpt, ls="--", lw=1, color="grey", label=f"least squares (r = {r:.2f})")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel(f"best image value, mean over {len(tasks)} segmentation tasks (%)")
    ax.set_ylabel("MLM accuracy, CV-Bench + BLINK perception (%)")
    ax.set_title("Image-value segmentation vs MLM perception", fontsize=10)
    ax.grid(alpha=0.3)
    pad_x = max(1.0, 0.1 * float(np.ptp(xs)))
    pad_y = max(1.0, 0.1 * float(np.ptp(ys)))
    ax.set_xlim(xs.min() - pad_x, xs.max() + 3 * pad_x)
    ax.set_ylim(ys.min() - pad_y, ys.max() + 2 * pad_y)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
