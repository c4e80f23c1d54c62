"""POPE (Li et al., 2023): yes/no object-existence questions on COCO val2014, three splits.

Layouts read (picked by what --data-root holds):

- lmms-eval's copy ``lmms-lab/POPE`` as a hub snapshot: ``data/test-0000N-of-00003.parquet``
  (the default config, 9000 rows; ``category`` names the split) and/or
  ``Full/<split>-00000-of-00001.parquet``; columns id, question_id, question, answer,
  image_source, image {bytes, path}, category. Also a ``datasets.save_to_disk`` copy of either
  config, or --data-root pointing at ``data/`` or ``Full/`` itself; or the hub id
  ``lmms-lab/POPE`` itself when the hub is reachable (read through ``datasets``).
- the original release: ``coco_pope_<split>.json`` (JSON lines {question_id, image, text,
  label}) in --data-root, ``coco/`` or ``output/coco/``, with the COCO val2014 images in
  ``val2014/`` beside them or in --data-root (``image_root=`` overrides).

Prompt and scoring follow lmms-eval ``tasks/pope`` (see docs/PROTOCOLS.md).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.common import (FileImage, HFTable, HubId, apply_limit, check_unique, hf_splits, load_hub,
                                        predictions_of, require_root, row, select)

SPLITS = ("random", "popular", "adversarial")
# lmms-eval tasks/pope/pope.yaml, lmms_eval_specific_kwargs.default
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."
PARSERS = ("lmms-eval", "pope")
COLUMNS = ("id", "question_id", "question", "answer", "image_source", "category", "image")
REQUIRED = ("question_id", "question", "answer", "image")


def pope_prompt(question: str) -> str:
    """lmms-eval ``pope_doc_to_text``: pre_prompt + question.strip() + post_prompt."""
    return f"{PRE_PROMPT}{question.strip()}{POST_PROMPT}"


def parse_lmms_eval(text: str) -> str:
    """lmms-eval ``pope_process_results``: the whole answer, lower-cased and stripped, must be
    "yes" or "no" ("Yes" counts, "Yes, there is" and "No." do not); anything else is "other"."""
    pred = text.lower().strip()
    return pred if pred in ("yes", "no") else "other"


def parse_pope(text: str) -> str:
    """The original POPE ``evaluate.py``: keep the first sentence, drop commas, "no" when the
    words include "No", "no" or "not", else "yes"."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(golds: list[str], preds: list[str]) -> dict[str, float]:
    """lmms-eval's POPE aggregations over one set of answers.

    accuracy: share of predictions equal to the gold answer; precision TP/(TP+FP) and recall
    TP/(TP+FN) with "yes" as positive (0 when the denominator is 0; a prediction that is neither
    yes nor no is none of TP/FP/FN); f1 from them; yes_ratio is lmms-eval's: the share of
    *gold* answers that are "yes" (0.5 on POPE by construction); pred_yes_ratio is the original
    POPE's "yes ratio", the share of predictions that are "yes".
    """
    n = len(golds)
    tp = sum(g == "yes" and p == "yes" for g, p in zip(golds, preds))
    fp = sum(g == "no" and p == "yes" for g, p in zip(golds, preds))
    fn = sum(g == "yes" and p == "no" for g, p in zip(golds, preds))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    gold_yes, gold_no = golds.count("yes"), golds.count("no")
    return {
        "accuracy": sum(g == p for g, p in zip(golds, preds)) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": gold_yes / (gold_yes + gold_no) if gold_yes + gold_no else 0.0,
        "pred_yes_ratio": preds.count("yes") / n if n else 0.0,
        "n": float(n),
    }


def _answer(value: Any, where: str) -> str:
    answer = str(value or "").lower().strip()
    if answer not in ("yes", "no"):
        raise DataError(f"{where}: answer {value!r} is neither yes nor no; is this POPE?")
    return answer


def _stem(name: Any) -> str:
    name = str(name or "")
    return name.rsplit(".", 1)[0] if name.lower().endswith((".jpg", ".jpeg", ".png")) else name


@BENCHMARKS.register
class POPE(Benchmark):
    """POPE random / popular / adversarial, from lmms-lab/POPE or the original JSON files."""

    description = "POPE object hallucination yes/no questions (random, popular, adversarial)"
    subsets = SPLITS
    root_hint = ("a copy of lmms-lab/POPE (data/*.parquet, Full/*.parquet or a save_to_disk folder) or the "
                 "folder holding coco_pope_<split>.json with the COCO val2014 images")

    def __init__(self, root: str | None, split: str | None = None, limit: int | None = None, *,
                 parser: str = "lmms-eval", image_root: str | None = None):
        super().__init__(root, split, limit)
        self.splits = select(self.name, split, SPLITS, what="split")
        if parser not in PARSERS:
            raise UsageError(f"benchmark 'pope' option parser={parser!r} is unknown; choose {' or '.join(PARSERS)}")
        self.parser = parser
        self.image_root = image_root

    # --- reading -----------------------------------------------------------------------------------

    def items(self) -> list[VQAItem]:
        root = require_root(self.name, self.root, self.root_hint)
        if isinstance(root, HubId):
            by_split = self._read_tables(load_hub(root))
        else:
            original = self._original_dir(root)
            by_split = self._read_original(root, original) if original else self._read_hf(root)
        items = [it for s in self.splits for it in by_split.get(s, [])]
        check_unique(self.name, (it.qid for it in items), str(root))
        return apply_limit(self.name, items, self.limit)

    @staticmethod
    def _original_dir(root: Path) -> Path | None:
        for folder in (root, root / "coco", root / "output" / "coco"):
            if any((folder / f"coco_pope_{s}.json").is_file() for s in SPLITS):
                return folder
        return None

    def _read_hf(self, root: Path) -> dict[str, list[VQAItem]]:
        for folder in (root / "data", root / "Full", root):
            splits = hf_splits(folder)
            if splits:
                break
        else:
            raise DataError(f"{root} holds no POPE copy; --data-root must be {self.root_hint}")
        return self._read_tables(splits)

    def _read_tables(self, splits: dict[str, HFTable]) -> dict[str, list[VQAItem]]:
        out: dict[str, list[VQAItem]] = {s: [] for s in SPLITS}
        for split_name, table in splits.items():
            for i, r in enumerate(table.rows(COLUMNS, REQUIRED, "lmms-lab/POPE")):
                split = r.get("category") if r.get("category") in SPLITS else split_name
                if split not in SPLITS:
                    raise DataError(f"{table.name} row {i}: category {r.get('category')!r} is not one of "
                                    f"{', '.join(SPLITS)}; is this lmms-lab/POPE?")
                if split in self.splits:
                    out[split].append(self._hf_item(table, i, r, split))
        return out

    def _hf_item(self, table: HFTable, i: int, r: dict[str, Any], split: str) -> VQAItem:
        where = f"{table.name} row {i}"
        image_id = _stem(r.get("image_source")) or f"{split}:{i}"
        return VQAItem(
            qid=f"{split}/{r['question_id']}", benchmark=self.name, subset=split, question=str(r["question"]),
            prompt=pope_prompt(str(r["question"])), images=(table.image("image", i),), image_ids=(image_id,),
            choices=(), answer=_answer(r["answer"], where),
            meta={"question_id": str(r["question_id"]), "id": r.get("id"), "image_source": r.get("image_source")})

    def _read_original(self, root: Path, folder: Path) -> dict[str, list[VQAItem]]:
        images = self._image_dir(root, folder)
        out: dict[str, list[VQAItem]] = {}
        for split in self.splits:
            path = folder / f"coco_pope_{split}.json"
            if not path.is_file():
                raise DataError(f"{path} does not exist; --split {split} needs the POPE file coco_pope_{split}.json "
                                f"beside the others in {folder}")
            items = []
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    q = json.loads(line)
                    qid, name, text, label = q["question_id"], q["image"], q["text"], q["label"]
                except (ValueError, KeyError, TypeError):
                    raise DataError(f"{where} is not a POPE question {{question_id, image, text, label}}") from None
                file = images / str(name)
                if not file.is_file():
                    raise DataError(f"{where}: image {file} does not exist; put the COCO val2014 images in "
                                    f"{images} or pass --option image_root=<folder of COCO_val2014_*.jpg>")
                items.append(VQAItem(
                    qid=f"{split}/{qid}", benchmark=self.name, subset=split, question=str(text),
                    prompt=pope_prompt(str(text)), images=(FileImage(str(file)),), image_ids=(_stem(name),),
                    choices=(), answer=_answer(label, where),
                    meta={"question_id": str(qid), "image_source": _stem(name)}))
            out[split] = items
        return out

    def _image_dir(self, root: Path, folder: Path) -> Path:
        if self.image_root is not None:
            path = Path(str(self.image_root)).expanduser()
            if not path.is_dir():
                raise DataError(f"--option image_root={path} is not a directory; pass the COCO val2014 image folder")
            return path
        for cand in (folder / "val2014", root / "val2014", root / "images"):
            if cand.is_dir():
                return cand
        return folder

    # --- answers -----------------------------------------------------------------------------------

    def parse(self, item: VQAItem, text: str) -> str:
        return parse_pope(text) if self.parser == "pope" else parse_lmms_eval(text)

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """accuracy, precision, recall, f1, yes_ratio, pred_yes_ratio and n per split and for
        all selected questions pooled (subset "all", as lmms-eval's ``pope`` task scores its
        9000 questions)."""
        texts = predictions_of(self.name, items, predictions)
        preds = [self.parse(it, t) for it, t in zip(items, texts)]
        rows = []
        groups = [s for s in SPLITS if any(it.subset == s for it in items)]
        for subset in [*groups, "all"]:
            pairs = [(it.answer, p) for it, p in zip(items, preds) if subset == "all" or it.subset == subset]
            golds, ps = [g for g, _ in pairs], [p for _, p in pairs]
            rows += [row(subset, k, v) for k, v in pope_metrics(golds, ps).items()]
        return rows
