"""CV-Bench (Tong et al., 2024, Cambrian-1): 2D/3D vision-centric multiple-choice questions.

Layout read: a copy of ``nyu-visionx/CV-Bench``: ``test_2d.parquet`` + ``test_3d.parquet`` (the
current hub files; ``test.parquet`` of older snapshots when those are absent), the
parquet-converter layout ``default/test/0000.parquet``, a ``datasets.save_to_disk`` copy, or the
hub id ``nyu-visionx/CV-Bench`` when the hub is reachable.
Columns: idx, type ("2D"/"3D"), task (Count, Relation, Depth, Distance), image, question,
choices, answer ("(A)"), prompt, filename, source (ADE20K, COCO, Omni3D), source_dataset,
source_filename, target_class, target_size, bbox.

``--split`` picks tasks ("Count,Depth") or "2D" / "3D". Prompt, answer extraction and accuracy
follow lmms-eval ``tasks/cv_bench``; the combined score is CV-Bench's own (see
docs/PROTOCOLS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import DataError
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.common import (MC_PRE_PROMPT, HFTable, HubId, accuracy, apply_limit, check_unique,
                                        gold_letter, hf_splits, leading_letter, load_hub, option_letters,
                                        predictions_of, require_root, row, select)

TASKS = ("Count", "Relation", "Depth", "Distance")
ALIASES = {"2D": ("Count", "Relation"), "3D": ("Depth", "Distance")}
SOURCES_2D = ("ADE20K", "COCO")
SOURCES_3D = ("Omni3D",)
COLUMNS = ("idx", "type", "task", "question", "choices", "answer", "prompt", "filename", "source", "source_dataset",
           "source_filename", "target_class", "target_size", "bbox")
REQUIRED = ("idx", "type", "task", "choices", "answer", "prompt", "source", "image")
META = ("type", "source", "filename", "source_dataset", "source_filename", "target_class", "target_size", "bbox")


def cv_bench_prompt(prompt: str, n_choices: int) -> str:
    """lmms-eval ``cv_bench_doc_to_text``: pre_prompt with the option letters, a newline, the row's prompt."""
    return MC_PRE_PROMPT.format(option_letters(n_choices)) + "\n" + prompt


def cv_bench_combined(source_accuracy: dict[str, float]) -> float:
    """CV-Bench's overall score (its README, and lmms-eval ``cv_bench_default_aggregate_results``):
    ((ADE20K + COCO) / 2 + Omni3D) / 2 of the per-source accuracies."""
    return ((source_accuracy["ADE20K"] + source_accuracy["COCO"]) / 2 + source_accuracy["Omni3D"]) / 2


@BENCHMARKS.register
class CVBench(Benchmark):
    """CV-Bench test questions of the chosen tasks."""

    description = "CV-Bench 2D (Count, Relation) and 3D (Depth, Distance) multiple-choice questions"
    subsets = TASKS
    root_hint = "a copy of nyu-visionx/CV-Bench (test_2d.parquet and test_3d.parquet, or a save_to_disk folder)"

    def __init__(self, root: str | None, split: str | None = None, limit: int | None = None):
        super().__init__(root, split, limit)
        self.tasks = select(self.name, split, TASKS, ALIASES, what="task")

    def _tables(self, root: Path | HubId) -> list[HFTable]:
        for splits in ([load_hub(root)] if isinstance(root, HubId) else
                       (hf_splits(folder) for folder in (root, root / "default"))):
            names = [s for s in ("test_2d", "test_3d") if s in splits] or [s for s in ("test", "") if s in splits]
            if names:
                return [splits[s] for s in names]
        raise DataError(f"{root} holds no CV-Bench copy; --data-root must be {self.root_hint}")

    def items(self) -> list[VQAItem]:
        root = require_root(self.name, self.root, self.root_hint)
        rows = []
        for table in self._tables(root):
            rows += [(table, i, r) for i, r in enumerate(table.rows(COLUMNS, REQUIRED, "nyu-visionx/CV-Bench"))]
        ids = [str(r["idx"]) for _, _, r in rows]
        prefixed = len(set(ids)) < len(ids)  # idx restarting per file: keep ids unique with the type
        items = []
        for table, i, r in rows:
            task = str(r["task"])
            if task not in self.tasks:
                continue
            where = f"{table.name} row {i}"
            qid = f"{r['type']}_{r['idx']}" if prefixed else str(r["idx"])
            choices = tuple(str(c) for c in (r.get("choices") or ()))
            items.append(VQAItem(
                qid=qid, benchmark=self.name, subset=task, question=str(r.get("question") or ""),
                prompt=cv_bench_prompt(str(r["prompt"]), len(choices)), images=(table.image("image", i),),
                image_ids=(qid,), choices=choices, answer=gold_letter(r["answer"], where),
                meta={k: r.get(k) for k in META}))
        check_unique(self.name, (it.qid for it in items), str(root))
        return apply_limit(self.name, items, self.limit)

    def parse(self, item: VQAItem, text: str) -> str:
        return leading_letter(text) or "other"

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """accuracy and n per task and per source; "2D" = mean of the ADE20K and COCO accuracies,
        "3D" = the Omni3D accuracy (CV-Bench's README); "all": accuracy over every question
        (lmms-eval's ``cv_bench_acc``), n, and ``combined`` = (2D + 3D) / 2 when all three
        sources were scored."""
        texts = predictions_of(self.name, items, predictions)
        by_task: dict[str, list[bool]] = {}
        by_source: dict[str, list[bool]] = {}
        everything = []
        for it, text in zip(items, texts):
            ok = self.parse(it, text) == it.answer
            by_task.setdefault(it.subset, []).append(ok)
            by_source.setdefault(str(it.meta.get("source")), []).append(ok)
            everything.append(ok)
        rows = []
        for task in [t for t in TASKS if t in by_task] + sorted(t for t in by_task if t not in TASKS):
            rows += [row(task, "accuracy", accuracy(by_task[task])), row(task, "n", len(by_task[task]))]
        source_acc = {s: accuracy(f) for s, f in by_source.items()}
        for source in sorted(by_source):
            rows += [row(source, "accuracy", source_acc[source]), row(source, "n", len(by_source[source]))]
        for group, sources in (("2D", SOURCES_2D), ("3D", SOURCES_3D)):
            have = [source_acc[s] for s in sources if s in source_acc]
            if have:
                rows.append(row(group, "accuracy", sum(have) / len(have)))
        rows += [row("all", "accuracy", accuracy(everything)), row("all", "n", len(everything))]
        if all(s in source_acc for s in SOURCES_2D + SOURCES_3D):
            rows.append(row("all", "combined", cv_bench_combined(source_acc)))
        return rows
