"""BLINK (Fu et al., 2024): 14 perception sub-tasks as multiple-choice questions on 1-4 images.

Layout read: a copy of ``BLINK-Benchmark/BLINK`` with one folder per config (sub-task), as on
the hub: ``<root>/Art_Style/val-00000-of-00001.parquet`` (and ``test-...``), the
parquet-converter layout ``<root>/Art_Style/val/0000.parquet``, per-config
``datasets.save_to_disk`` folders, or the hub id ``BLINK-Benchmark/BLINK`` itself when the hub
is reachable (one ``datasets.load_dataset`` config per sub-task). Columns: idx, question,
sub_task, image_1..image_4 (None where the question has fewer images), choices, answer ("(A)"),
prompt, explanation. Only the val split has public answers (the hub's test rows say "hidden";
test is scored on EvalAI), so val is read by default; ``data_split=`` names another, ``val+test``
both (a copy whose test rows carry answers), or ``answered``: every split of the copy whose rows
carry answers (a split whose answers are all hidden is left out). ``answered`` is the default
when only the paired sub-tasks are read (Art_Style, Visual_Similarity): the paper's 234 and 271
questions are val + test, so a copy with test answers gives them and the public copy its val
questions, 117 and 135, the same as ``kvpipe extract --dataset blink`` reads.

Counts (BLINK-Benchmark/BLINK dataset card): the perception subset is Counting 120 + 120,
Object_Localization 122 + 125, Relative_Depth 124 + 124, Spatial_Relation 143 + 143 questions
(val + test): 509 val, 1,021 in all -- the paper's "1,021 test samples" are val + test (as its
234 Art_Style = 117 + 117 and 271 Visual_Similarity = 135 + 136 examples are).

Sub-tasks: ``--option subtask=Art_Style`` (the spelling ``kvpipe extract --dataset blink``
takes), or ``--split Art_Style``; either takes a comma list, "perception" (Counting,
Object_Localization, Relative_Depth, Spatial_Relation: the paper's perception subset),
"paired" (Art_Style, Visual_Similarity: the paper's paired tasks) or "all". Without either,
every sub-task folder present is read. ``--split val`` / ``--split test`` names BLINK's data
split instead (as ``kvpipe extract`` reads it; ``--option data_split=`` says the same), so
``--split val --option subtask=Art_Style`` means the same in both commands. Prompt, answer
extraction and accuracy follow lmms-eval ``tasks/blink`` (see docs/PROTOCOLS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.common import (LETTERS, MC_PRE_PROMPT, HFTable, HubId, accuracy, apply_limit, check_unique,
                                        extract_letter, gold_letter, hf_splits, load_hub, option_letters,
                                        predictions_of, require_root, row, select)

SUBTASKS = ("Art_Style", "Counting", "Forensic_Detection", "Functional_Correspondence", "IQ_Test", "Jigsaw",
            "Multi-view_Reasoning", "Object_Localization", "Relative_Depth", "Relative_Reflectance",
            "Semantic_Correspondence", "Spatial_Relation", "Visual_Correspondence", "Visual_Similarity")
PERCEPTION = ("Counting", "Object_Localization", "Relative_Depth", "Spatial_Relation")
PAIRED = ("Art_Style", "Visual_Similarity")
# Questions per split of the perception subset (BLINK-Benchmark/BLINK dataset card).
PERCEPTION_COUNTS = {"val": {"Counting": 120, "Object_Localization": 122, "Relative_Depth": 124,
                             "Spatial_Relation": 143},
                     "test": {"Counting": 120, "Object_Localization": 125, "Relative_Depth": 124,
                              "Spatial_Relation": 143}}
HIDDEN_ANSWERS = ("", "hidden")  # the answer of the hub's test rows
ALIASES = {"perception": PERCEPTION, "paired": PAIRED, "all": SUBTASKS}
IMAGE_COLUMNS = ("image_1", "image_2", "image_3", "image_4")
TEXT_COLUMNS = ("idx", "question", "sub_task", "choices", "answer", "prompt", "explanation")
REQUIRED = ("idx", "choices", "answer", "prompt", "image_1")
DATA_SPLITS = ("val", "test")
ANSWERED = "answered"  # every data split whose rows carry answers (the paired tasks' default)


def default_data_split(subtasks: tuple[str, ...]) -> str:
    """``answered`` when every chosen sub-task is a paired one (the paper counts their val and
    test questions), else ``val`` (test answers are hidden in the public copy)."""
    return ANSWERED if subtasks and set(subtasks) <= set(PAIRED) else "val"


def mc_prompt(prompt: str, n_choices: int) -> str:
    """lmms-eval ``blink_doc_to_text``: the pre_prompt with the option letters, then the row's prompt."""
    return MC_PRE_PROMPT.format(option_letters(n_choices)) + prompt


def valid_letters(n_choices: int) -> str:
    """lmms-eval ``blink_process_results``: the question's own letters, all letters when it has no choices."""
    return LETTERS[:n_choices] or LETTERS


@BENCHMARKS.register
class BLINK(Benchmark):
    """BLINK val questions of the chosen sub-tasks."""

    description = "BLINK multiple-choice perception questions, one sub-task per folder (val split)"
    subsets = SUBTASKS
    root_hint = "a copy of BLINK-Benchmark/BLINK with one folder per sub-task (e.g. Art_Style/val-*.parquet)"

    def __init__(self, root: str | None, split: str | None = None, limit: int | None = None, *,
                 subtask: str | None = None, data_split: str | None = None):
        super().__init__(root, split, limit)
        named = split if split not in DATA_SPLITS else None  # --split Art_Style: sub-tasks, as before
        if split in DATA_SPLITS:
            if data_split not in (None, split):
                raise UsageError(f"benchmark 'blink': --split {split} and --option data_split={data_split} "
                                 f"disagree; give one")
            data_split = split
        if named is not None and subtask is not None and select(self.name, named, SUBTASKS, ALIASES, "sub-task") \
                != select(self.name, subtask, SUBTASKS, ALIASES, "sub-task"):
            raise UsageError(f"benchmark 'blink': --split {named} and --option subtask={subtask} name different "
                             f"sub-tasks; give one")
        self.chosen = subtask if subtask is not None else named  # None: every sub-task present
        self.subtasks = select(self.name, self.chosen, SUBTASKS, ALIASES, what="sub-task")
        self.data_split = data_split or default_data_split(self.subtasks)

    def items(self) -> list[VQAItem]:
        root = require_root(self.name, self.root, self.root_hint)
        subtasks = self.subtasks
        if self.chosen is None and not isinstance(root, HubId):  # every sub-task folder the copy holds
            subtasks = tuple(s for s in SUBTASKS if (root / s).is_dir())
            if not subtasks:
                raise DataError(f"{root} has no BLINK sub-task folder (e.g. Art_Style/); --data-root must be "
                                f"{self.root_hint}")
        items: list[VQAItem] = []
        for sub in subtasks:
            if self.data_split == ANSWERED:
                items += self._answered(root, sub)
                continue
            for data_split in self.data_split.replace(",", "+").split("+"):
                items += self._read(self._table(root, sub, data_split), sub, data_split)
        check_unique(self.name, (it.qid for it in items), str(root))
        return apply_limit(self.name, items, self.limit)

    def _table(self, root: Path | HubId, sub: str, data_split: str) -> HFTable:
        """One data split's table of one sub-task: its folder of the local copy, or its hub config."""
        if isinstance(root, HubId):
            splits, where = load_hub(root, sub), f"{root} config {sub}"
        else:
            folder = root / sub
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist; --data-root must be {self.root_hint}")
            splits, where = hf_splits(folder), str(folder)
        table = splits.get(data_split)
        if table is None and set(splits) == {""}:
            table = splits[""]  # a save_to_disk Dataset that did not record its split
        if table is None:
            found = ", ".join(sorted(splits)) or "none"
            raise DataError(f"{where} has no {data_split} split (found: {found}); BLINK's answers are "
                            f"in val-*.parquet")
        return table

    def _answered(self, root: Path | HubId, sub: str) -> list[VQAItem]:
        """Every data split of one sub-task whose rows carry answers, val first; a split whose
        answers are all hidden (the hub's test) is left out, one with some hidden is an error."""
        if isinstance(root, HubId):
            splits, where = load_hub(root, sub), f"{root} config {sub}"
        else:
            folder = root / sub
            if not folder.is_dir():
                raise DataError(f"{folder} does not exist; --data-root must be {self.root_hint}")
            splits, where = hf_splits(folder), str(folder)
        items: list[VQAItem] = []
        for name in [s for s in DATA_SPLITS if s in splits] + sorted(s for s in splits if s not in DATA_SPLITS):
            table = splits[name]
            column = table.column("answer").to_pylist() if "answer" in table.column_names else []
            answers = [str(a or "").strip().lower() for a in column]
            if answers and all(a in HIDDEN_ANSWERS for a in answers):
                continue
            items += self._read(table, sub, name or "val")
        if not items:
            raise DataError(f"{where} has no split with answers (found: {', '.join(sorted(splits)) or 'none'}); "
                            f"BLINK's answers are in val-*.parquet")
        return items

    def _read(self, table: HFTable, sub: str, data_split: str) -> list[VQAItem]:
        rows = table.rows(TEXT_COLUMNS, REQUIRED, "BLINK-Benchmark/BLINK")
        present = {c: table.non_null(c) for c in IMAGE_COLUMNS}
        out = []
        for i, r in enumerate(rows):
            where = f"{table.name} row {i}"
            cols = [c for c in IMAGE_COLUMNS if present[c] and present[c][i]]
            if not cols:
                raise DataError(f"{where} has no image; is this BLINK?")
            choices = tuple(str(c) for c in (r.get("choices") or ()))
            idx = str(r["idx"])
            if str(r["answer"] or "").strip().lower() in HIDDEN_ANSWERS:
                raise DataError(f"{where}: the answer is {r['answer']!r}: BLINK's {data_split} answers are not "
                                f"public (scored on EvalAI); use data_split=val, or a copy with its answers")
            out.append(VQAItem(
                qid=idx, benchmark=self.name, subset=sub, question=str(r.get("question") or ""),
                prompt=mc_prompt(str(r["prompt"]), len(choices)),
                images=tuple(table.image(c, i) for c in cols), image_ids=tuple(f"{idx}/{c}" for c in cols),
                choices=choices, answer=gold_letter(r["answer"], where),
                meta={"sub_task": r.get("sub_task"), "explanation": r.get("explanation"),
                      "data_split": data_split}))
        return out

    def parse(self, item: VQAItem, text: str) -> str:
        return extract_letter(text, valid_letters(len(item.choices))) or "other"

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """accuracy and n per sub-task; "all": accuracy = unweighted mean of the sub-tasks'
        accuracies (lmms-eval's ``blink`` group: ``weight_by_size`` is off), accuracy_pooled
        over all questions, n."""
        texts = predictions_of(self.name, items, predictions)
        flags: dict[str, list[bool]] = {}
        for it, text in zip(items, texts):
            flags.setdefault(it.subset, []).append(self.parse(it, text) == it.answer)
        order = [s for s in SUBTASKS if s in flags] + sorted(s for s in flags if s not in SUBTASKS)
        rows = []
        for sub in order:
            rows += [row(sub, "accuracy", accuracy(flags[sub])), row(sub, "n", len(flags[sub]))]
        per_task = [accuracy(flags[s]) for s in order]
        everything = [f for s in order for f in flags[s]]
        rows += [row("all", "accuracy", sum(per_task) / len(per_task) if per_task else 0.0),
                 row("all", "accuracy_pooled", accuracy(everything)), row("all", "n", len(everything))]
        return rows
