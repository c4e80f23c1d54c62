"""MME (Fu et al., 2023): two yes/no questions per image over 14 perception/cognition categories.

Layouts read (picked by what --data-root holds):

- lmms-eval's copy ``lmms-lab/MME`` as a hub snapshot (``data/test-0000N-of-0000M.parquet``;
  columns question_id (the image, e.g. "count/000000450303.jpg"), image {bytes, path},
  question, answer ("Yes"/"No"), category), the parquet files themselves, a
  ``datasets.save_to_disk`` copy, or the hub id ``lmms-lab/MME`` when the hub is reachable.
- the original release ``MME_Benchmark_release_version/`` (optionally ``.../MME_Benchmark/``):
  one folder per category holding either ``images/`` + ``questions_answers_YN/<image>.txt``
  or the images and their ``<image>.txt`` side by side; each .txt has two lines
  "question<TAB>Yes|No".

Every category present is read; ``--split count,color`` (or ``paper``: count, color, position,
existence, the paper's four) keeps some. Prompt, answer parsing and scores follow lmms-eval
``tasks/mme`` (see docs/PROTOCOLS.md).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.common import (FileImage, HFTable, HubId, check_unique, hf_splits, int_option, load_hub,
                                        predictions_of, require_root, row, select)

# lmms-eval tasks/mme/utils.py eval_type_dict
PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork",
              "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = PERCEPTION + COGNITION
PAPER = ("count", "color", "position", "existence")
# The paper's Table 3 "MME*": the mean of the four PAPER categories' scores (out of 200), e.g.
# LLaVA-OneVision 7B (170.0 + 178.3 + 145.0 + 200.0) / 4 = 173.3 (Table 8 -> Table 3).
PAPER_MEAN = "MME*"
ALIASES = {"paper": PAPER, "hallucination": PAPER, "perception": PERCEPTION, "cognition": COGNITION}
# lmms-eval tasks/mme: replace_prompt and mme.yaml lmms_eval_specific_kwargs.default
REPLACE_PROMPT = " Please answer yes or no."
PRE_PROMPT = ""
POST_PROMPT = "\nAnswer the question using a single word or phrase."
COLUMNS = ("question_id", "question", "answer", "category", "image")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".PNG", ".JPG", ".JPEG", ".bmp")


def mme_prompt(question: str) -> str:
    """lmms-eval ``mme_doc_to_text`` with the default kwargs: the question stripped, " Please
    answer yes or no." removed, the post_prompt appended (the pre_prompt is empty, so skipped)."""
    question = question.strip()
    if PRE_PROMPT:
        question = f"{PRE_PROMPT}{question.replace(REPLACE_PROMPT, '')}"
    if POST_PROMPT:
        question = f"{question.replace(REPLACE_PROMPT, '')}{POST_PROMPT}"
    return question


def parse_pred_ans(text: str) -> str:
    """lmms-eval ``parse_pred_ans`` ("brought from Otter Eval"): lower-case, strip, drop every
    "."; "yes"/"no" as is; one character "y"/"n"; otherwise "yes" or "no" if found in the first
    four characters ("yes" checked first), else "other"."""
    pred = text.lower().strip().replace(".", "")
    if pred in ("yes", "no"):
        return pred
    if len(pred) == 1:
        return {"y": "yes", "n": "no"}.get(pred, "other")
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def mme_category_scores(pairs: dict[str, list[bool]]) -> dict[str, float]:
    """lmms-eval ``mme_aggregate_results`` for one category: per image, acc = share of its two
    questions answered right x 100 and acc_plus = 100 when both are right; the category's acc
    and acc_plus are their means over images and its score is acc + acc_plus (out of 200)."""
    for image, flags in pairs.items():
        if len(flags) != 2:
            raise UsageError(f"MME scores each image's two questions together, but image {image!r} has "
                             f"{len(flags)} among the scored questions; score whole images")
    n = len(pairs)
    acc = sum(sum(f) / len(f) * 100.0 for f in pairs.values()) / n if n else 0.0
    acc_plus = sum(100.0 * all(f) for f in pairs.values()) / n if n else 0.0
    return {"acc": acc, "acc_plus": acc_plus, "score": acc + acc_plus}


def _answer(value: Any, where: str) -> str:
    answer = str(value or "").lower().strip().replace(".", "")
    if answer not in ("yes", "no"):
        raise DataError(f"{where}: answer {value!r} is neither Yes nor No; is this MME?")
    return answer


@BENCHMARKS.register
class MME(Benchmark):
    """MME from lmms-lab/MME or the original release; items come in image pairs."""

    description = "MME yes/no questions, two per image (acc, acc+ and score per category)"
    subsets = CATEGORIES
    root_hint = ("a copy of lmms-lab/MME (data/*.parquet or a save_to_disk folder) or the original "
                 "MME_Benchmark_release_version folder")

    def items(self) -> list[VQAItem]:
        root = require_root(self.name, self.root, self.root_hint)
        if isinstance(root, HubId):
            rows = self._read_tables(load_hub(root))
        else:
            original = self._original_base(root)
            rows = self._read_original(original) if original else self._read_hf(root)
        present = sorted({r["category"] for r in rows},
                         key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))
        usable = {a: [c for c in v if c in present] for a, v in ALIASES.items()}
        chosen = set(select(self.name, self.split, present, usable, what="category"))
        # the two questions of an image side by side, images in order of first appearance
        groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for r in rows:
            if r["category"] in chosen:
                groups.setdefault((r["category"], r["question_id"]), []).append(r)
        if not groups:
            raise DataError(f"{root} has no MME questions of {', '.join(sorted(chosen)) or 'the chosen categories'}")
        items: list[VQAItem] = []
        limit = None if self.limit is None else int_option(self.name, "limit", self.limit, 0)
        for (category, image), qs in groups.items():
            if limit is not None and len(items) >= limit:
                break
            for k, r in enumerate(qs):
                items.append(VQAItem(
                    qid=f"{image}#{k}", benchmark=self.name, subset=category, question=r["question"],
                    prompt=mme_prompt(r["question"]), images=(r["loader"],), image_ids=(image,), choices=(),
                    answer=r["answer"], meta={"question_id": image, "category": category}))
        check_unique(self.name, (it.qid for it in items), str(root))
        return items

    def _read_hf(self, root: Path) -> list[dict[str, Any]]:
        for folder in (root / "data", root):
            splits = hf_splits(folder)
            if splits:
                break
        else:
            raise DataError(f"{root} holds no MME copy; --data-root must be {self.root_hint}")
        return self._read_tables(splits)

    @staticmethod
    def _read_tables(splits: dict[str, HFTable]) -> list[dict[str, Any]]:
        out = []
        for table in splits.values():
            for i, r in enumerate(table.rows(COLUMNS, COLUMNS, "lmms-lab/MME")):
                where = f"{table.name} row {i}"
                out.append({"question_id": str(r["question_id"]), "question": str(r["question"]),
                            "answer": _answer(r["answer"], where), "category": str(r["category"]),
                            "loader": table.image("image", i)})
        return out

    @staticmethod
    def _original_base(root: Path) -> Path | None:
        release = root / "MME_Benchmark_release_version"
        for base in (root, root / "MME_Benchmark", release, release / "MME_Benchmark"):
            if base.is_dir() and any((base / c).is_dir() for c in CATEGORIES):
                return base
        return None

    def _read_original(self, base: Path) -> list[dict[str, Any]]:
        out = []
        # the categories, and any other folder in the release's split layout (a later MME category)
        folders = sorted(p for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")
                         and (p.name in CATEGORIES or (p / "questions_answers_YN").is_dir()))
        for folder in folders:
            if (folder / "images").is_dir() and (folder / "questions_answers_YN").is_dir():
                images, texts = folder / "images", folder / "questions_answers_YN"
            else:
                images, texts = folder, folder
            txt_files = sorted(texts.glob("*.txt"))
            if not txt_files:
                continue
            for txt in txt_files:
                image = next((images / f"{txt.stem}{ext}" for ext in IMAGE_EXTENSIONS
                              if (images / f"{txt.stem}{ext}").is_file()), None)
                if image is None:
                    raise DataError(f"{txt} has no image {txt.stem}.png/.jpg in {images}; is the MME download "
                                    f"complete?")
                lines = [ln for ln in txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
                for n, line in enumerate(lines, 1):
                    if "\t" not in line:
                        raise DataError(f"{txt} line {n} is not 'question<TAB>Yes|No'")
                    question, answer = line.rsplit("\t", 1)
                    out.append({"question_id": f"{folder.name}/{image.name}", "question": question,
                                "answer": _answer(answer, f"{txt} line {n}"), "category": folder.name,
                                "loader": FileImage(str(image))})
        if not out:
            raise DataError(f"{base} has category folders but no question files; is the MME download complete?")
        return out

    # --- answers -----------------------------------------------------------------------------------

    def parse(self, item: VQAItem, text: str) -> str:
        return parse_pred_ans(text)

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """acc, acc_plus, score (= acc + acc_plus, out of 200) and n per category; the summed
        score of the perception and cognition categories scored (lmms-eval's mme_perception_score
        and mme_cognition_score) and of all categories scored ("all"); when count, color,
        position and existence are all scored, subset "MME*" = the mean of their four scores
        (the paper's Table 3)."""
        texts = predictions_of(self.name, items, predictions)
        by_cat: dict[str, dict[str, list[bool]]] = {}
        counts: dict[str, int] = {}
        for it, text in zip(items, texts):
            by_cat.setdefault(it.subset, {}).setdefault(it.meta.get("question_id", it.image_ids[0]), []).append(
                parse_pred_ans(text) == it.answer)
            counts[it.subset] = counts.get(it.subset, 0) + 1
        order = sorted(by_cat, key=lambda c: (CATEGORIES.index(c) if c in CATEGORIES else len(CATEGORIES), c))
        rows, totals = [], {}
        for cat in order:
            scores = mme_category_scores(by_cat[cat])
            rows += [row(cat, k, v) for k, v in scores.items()] + [row(cat, "n", counts[cat])]
            totals[cat] = scores["score"]
        # lmms-eval: a category outside the perception list counts as cognition
        for group, members in (("perception", [c for c in totals if c in PERCEPTION]),
                               ("cognition", [c for c in totals if c not in PERCEPTION])):
            if members:
                rows.append(row(group, "score", sum(totals[c] for c in members)))
        rows += [row("all", "score", sum(totals.values())), row("all", "n", len(items))]
        if all(c in totals for c in PAPER):
            rows.append(row(PAPER_MEAN, "score", sum(totals[c] for c in PAPER) / len(PAPER)))
        return rows
