"""Paired tasks: multiple-choice questions answered from the image values, per question.

Why per question: the paper's Table 5 crosses, question by question, whether the MLM answered
correctly (``kvpipe answer``) with whether its image values do (these probes). So a paired
probe scores accuracy like any probe, and also keeps which option it chose for every
question and every (kind, layer, head): ``predictions.parquet`` in its results directory
(qid, kind, layer, head, predicted, answer, correct), and ``question_correct(target)`` for one
target on demand (what ``kvpipe paired`` uses).

The questions live in the store's dataset.json ("questions", written by the ``blink`` and
``spair-vqa`` dataset adapters). Questions whose images are not all in the store (a failed
image, ``--limit``) are skipped and counted.

This module also joins the two sides (``pair_answers``): the MLM's answers file
(``answers.parquet`` of ``kvpipe answer``: qid, correct) with the values' answers of one
target; the 2x2 table itself is ``kvpipe.pipeline.vqa.scoring.paired_table``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.provenance import model_mismatch, read_run_json
from kvpipe.store import FeatureStore
from kvpipe.store.manifest import ImageRow

PREDICTIONS = "predictions.parquet"
PREDICTION_SCHEMA = pa.schema([("qid", pa.string()), ("kind", pa.string()), ("layer", pa.int64()),
                               ("head", pa.int64()), ("predicted", pa.int64()), ("answer", pa.int64()),
                               ("correct", pa.bool_())])


class PairedProbe(Probe):
    """A probe that answers multiple-choice questions; subclasses implement ``_load`` and ``predict``."""

    primary_metric = "accuracy"
    benchmark: ClassVar[str] = ""  # the benchmark whose answers.parquet pairs with this probe
    extract_hint: ClassVar[str] = ""  # how to make a store with these questions

    def prepare(self) -> None:
        questions = self.store.structure().get("questions") or []
        chosen = [q for q in questions if self.wanted(q)]
        if not chosen:
            raise StoreError(f"store {self.store.root} has no {self.name} questions (dataset.json \"questions\"); "
                             f"{self.extract_hint}")
        by_id = {r.image_id: r for r in self.store.images()}
        usable = []
        for q in chosen:
            if all(i in by_id for i in self.image_ids(q)):
                usable.append(q)
        self.skipped = len(chosen) - len(usable)
        if not usable:
            raise StoreError(f"none of the {len(chosen)} {self.name} questions of {self.store.root} has all its "
                             f"images in the store; re-extract without --limit")
        self.questions = usable
        self.qids = [str(q["qid"]) for q in usable]
        self.gold = np.array([int(q["answer"]) for q in usable], dtype=np.int64)
        self.images: list[ImageRow] = sorted({by_id[i].index: by_id[i] for q in usable
                                              for i in self.image_ids(q)}.values(), key=lambda r: r.index)
        self.position = {r.image_id: n for n, r in enumerate(self.images)}
        self._predictions: dict[Target, np.ndarray] = {}
        self._load()

    # ---- what subclasses provide ------------------------------------------------------------
    def wanted(self, question: dict[str, Any]) -> bool:
        """Whether a dataset.json question belongs to this task."""
        return True

    def image_ids(self, question: dict[str, Any]) -> list[str]:
        raise NotImplementedError

    def _load(self) -> None:
        """Precompute token indices (called once, after the questions are chosen)."""

    def predict(self, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """The chosen option of every question, from features of ``self.images`` as read."""
        raise NotImplementedError

    def summary(self) -> dict[str, float]:
        """Extra dataset-level numbers for the results table."""
        return {}

    # ---- shared -------------------------------------------------------------------------------
    def predictions(self, target: Target) -> np.ndarray:
        if target not in self._predictions:
            feats = self.store.read(target.kind, target.layer, target.head, images=self.images)
            if len(feats) != len(self.images):
                raise StoreError(f"store {self.store.root} returned {len(feats)} of {len(self.images)} images; "
                                 f"run kvpipe verify")
            self._predictions[target] = np.asarray(self.predict(feats.data, feats.offsets), dtype=np.int64)
        return self._predictions[target]

    def question_correct(self, target: Target) -> dict[str, bool]:
        """qid -> whether the values of ``target`` pick the gold option."""
        ok = self.predictions(target) == self.gold
        return {q: bool(c) for q, c in zip(self.qids, ok)}

    def score(self, target: Target) -> dict[str, float]:
        return {"accuracy": float(np.mean(self.predictions(target) == self.gold))}

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        """Write every scored target's per-question choices (recomputed after a cached run);
        add n_questions, n_questions_skipped and the probe's own numbers."""
        targets = list(dict.fromkeys(Target(r["kind"], r["layer"], r["head"]) for r in rows))
        table = prediction_table([(t, self.qids, self.predictions(t), self.gold) for t in targets])
        pq.write_table(table, Path(out_dir) / PREDICTIONS)
        counts = {"n_questions": len(self.qids), "n_questions_skipped": self.skipped, **self.summary()}
        return [{"layer": -1, "head": -1, "kind": "dataset", "metric": k, "value": float(v)}
                for k, v in counts.items()], []


def prediction_table(entries: list[tuple[Target, list[str], np.ndarray, np.ndarray]]) -> pa.Table:
    cols: dict[str, list] = {n: [] for n in PREDICTION_SCHEMA.names}
    for t, qids, pred, gold in entries:
        n = len(qids)
        cols["qid"] += qids
        cols["kind"] += [t.kind] * n
        cols["layer"] += [t.layer] * n
        cols["head"] += [t.head] * n
        cols["predicted"] += [int(p) for p in pred]
        cols["answer"] += [int(g) for g in gold]
        cols["correct"] += [bool(p == g) for p, g in zip(pred, gold)]
    return pa.table(cols, schema=PREDICTION_SCHEMA)


def mean_pool(data: np.ndarray, index: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Mean of ``data[index]`` over consecutive groups beginning at ``starts`` (one per image)."""
    picked = data[index].astype(np.float64)
    counts = np.diff(np.append(starts, len(index)))
    return np.add.reduceat(picked, starts, axis=0) / counts[:, None]


def cosine_choice(reference: np.ndarray, options: np.ndarray, n_options: np.ndarray) -> np.ndarray:
    """Index of the option most cosine-similar to each reference (first on ties).

    ``reference``: (Q, D); ``options``: (Q, K, D), rows past ``n_options[q]`` ignored."""
    ref = reference / np.maximum(np.linalg.norm(reference, axis=-1, keepdims=True), 1e-12)
    opt = options / np.maximum(np.linalg.norm(options, axis=-1, keepdims=True), 1e-12)
    sims = np.einsum("qd,qkd->qk", ref, opt)
    sims[np.arange(options.shape[1])[None, :] >= np.asarray(n_options)[:, None]] = -np.inf
    return np.argmax(sims, axis=1)


# ------------------------------------------------------------------------------ joining answers
@dataclass
class PairedAnswers:
    """The two sides of one paired task, question by question (the probe's question order)."""

    task: str
    target: Target
    qids: list[str]
    mlm_correct: list[bool]
    value_correct: list[bool]
    value_accuracy_all: float  # over every question of the store, answered by the MLM or not
    only_in_store: int  # questions without an MLM answer
    only_in_answers: int  # MLM answers to questions the store does not have


def paired_probe(store: FeatureStore | str | Path, task: str, params: dict[str, Any] | None = None) -> PairedProbe:
    """The prepared probe of a paired task; other task names are a UsageError."""
    cls = PROBES.get(task)
    if not issubclass(cls, PairedProbe):
        paired = ", ".join(n for n, c in PROBES.items() if isinstance(c, type) and issubclass(c, PairedProbe))
        raise UsageError(f"--task {task} is not a paired task; paired tasks: {paired}")
    fs = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
    return cls(fs, params or {})


def resolve_target(store: FeatureStore, kind: str, layer: int | None, head: int | None) -> Target:
    """--kind/--layer/--head as a Target the store holds (post_proj: no layer or head)."""
    meta = store.meta
    if kind not in meta.kinds:
        raise UsageError(f"--kind {kind}: the store holds {', '.join(meta.kinds)}")
    if kind == "post_proj":
        if layer is not None or head is not None:
            raise UsageError("--kind post_proj has no layer or head; drop --layer/--head")
        return Target("post_proj")
    if layer is None or head is None:
        raise UsageError("give both --layer and --head, or neither for the best (layer, head)")
    if layer not in meta.layers:
        raise UsageError(f"--layer {layer} is not stored; stored layers: {', '.join(map(str, meta.layers))}")
    if head not in meta.heads:
        raise UsageError(f"--head {head} is not stored; stored KV heads: {', '.join(map(str, meta.heads))}")
    return Target(kind, layer, head)


def read_answer_table(path: str | Path, label: str, writes: str) -> pa.Table:
    """A ``kvpipe answer`` output (parquet, or CSV by its suffix) as a table. ``label`` names the
    file in errors ("--answers", "score file"), ``writes`` the file kvpipe answer writes for it."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{label} {path} does not exist; run kvpipe answer first (it writes OUT/{writes})")
    try:
        return pacsv.read_csv(path) if path.suffix.lower() == ".csv" else pq.read_table(path)
    except (OSError, pa.ArrowException) as err:
        raise UsageError(f"{label} {path} is unreadable ({err}); pass the {writes} of kvpipe answer") from None


def correct_flags(values: list[Any]) -> list[bool]:
    """An answers file's ``correct`` column as booleans (a CSV gives the strings true / false)."""
    return [v.strip().lower() == "true" if isinstance(v, str) else bool(v) for v in values]


def read_mlm_answers(path: str | Path, benchmark: str = "") -> dict[str, bool]:
    """qid -> correct from ``kvpipe answer``'s answers.parquet (or a CSV with those columns)."""
    table = read_answer_table(path, "--answers", "answers.parquet")
    missing = [c for c in ("qid", "correct") if c not in table.column_names]
    if missing:
        raise UsageError(f"--answers {path} has no column {missing[0]!r}; pass the answers.parquet of kvpipe answer")
    if benchmark and "benchmark" in table.column_names:
        other = sorted({str(b) for b in table.column("benchmark").to_pylist()} - {benchmark})
        if other:
            raise UsageError(f"--answers {path} holds answers to benchmark {other[0]!r}; this task pairs with "
                             f"{benchmark!r} (kvpipe answer --benchmark {benchmark})")
    out: dict[str, bool] = {}
    for qid, ok in zip(table.column("qid").to_pylist(), correct_flags(table.column("correct").to_pylist())):
        if str(qid) in out:
            raise UsageError(f"--answers {path}: question {qid!r} occurs twice; pass one run's answers")
        out[str(qid)] = ok
    return out


def check_answers_belong(store: FeatureStore, answers: str | Path, benchmark: str) -> dict[str, Any] | None:
    """Refuse (one line) answers whose run.json says another model made them, or another
    benchmark, or another copy of the data than the store's; return that run.json (None when
    the answers carry none: files from elsewhere are taken as they are)."""
    run = read_run_json(answers)
    if run is None:
        return None
    meta = store.meta
    other = model_mismatch(meta.model, run)
    if other:
        raise UsageError(f"--answers {answers} were made by another model than the store {store.root} ({other}); "
                         f"pair answers and values of one model")
    if benchmark and run.get("benchmark") not in (None, benchmark):
        raise UsageError(f"--answers {answers} answer benchmark {run.get('benchmark')!r}; this task pairs with "
                         f"{benchmark!r} (kvpipe answer --benchmark {benchmark})")
    dataset = meta.dataset.get("name")
    if benchmark and dataset not in (None, benchmark):
        raise UsageError(f"store {store.root} holds images of dataset {dataset!r}, the answers are to {benchmark!r}; "
                         f"extract --dataset {benchmark} with the answers' --data-root")
    roots = [meta.dataset.get("root"), run.get("data_root")]
    if all(r and Path(str(r)).is_absolute() and Path(str(r)).exists() for r in roots) \
            and Path(str(roots[0])).resolve() != Path(str(roots[1])).resolve():
        raise UsageError(f"store {store.root} was extracted from {roots[0]}, --answers {answers} answered "
                         f"{roots[1]}; pair one copy of the data")
    return run


def pair_answers(probe: PairedProbe, target: Target, mlm: dict[str, bool]) -> PairedAnswers:
    """Cross the MLM's correctness with ``target``'s on the questions both have."""
    value = probe.question_correct(target)
    qids = [q for q in probe.qids if q in mlm]
    if not qids:
        some = next(iter(mlm), "none")
        raise UsageError(f"no question of the store's {probe.name} questions has an MLM answer (store ids like "
                         f"{probe.qids[0]!r}, answer ids like {some!r}); answer the same benchmark and options")
    return PairedAnswers(task=probe.name, target=target, qids=qids, mlm_correct=[mlm[q] for q in qids],
                         value_correct=[value[q] for q in qids],
                         value_accuracy_all=float(np.mean(list(value.values()))),
                         only_in_store=len(probe.qids) - len(qids),
                         only_in_answers=len(set(mlm) - set(probe.qids)))


def write_paired(out_dir: str | Path, answers: PairedAnswers, rows: list[dict[str, Any]],
                 base: dict[str, Any]) -> list[Path]:
    """paired.parquet/.csv (``base`` columns + target + subset, metric, value) and
    paired_questions.parquet/.csv (qid, mlm_correct, value_correct)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = answers.target
    full = [{**base, "task": answers.task, "kind": t.kind, "layer": t.layer, "head": t.head, **r} for r in rows]
    table = pa.Table.from_pylist(full)
    per_q = pa.table({"qid": answers.qids, "mlm_correct": answers.mlm_correct,
                      "value_correct": answers.value_correct})
    paths = []
    for name, tab in (("paired", table), ("paired_questions", per_q)):
        pq.write_table(tab, out / f"{name}.parquet")
        pacsv.write_csv(tab, out / f"{name}.csv")
        paths += [out / f"{name}.parquet", out / f"{name}.csv"]
    return paths
