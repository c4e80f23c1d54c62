"""SPair-71k correspondence questions (the ``spair-vqa`` benchmark) as clean images to extract.

Why: the paper's paired semantic-correspondence task (Table 5) asks each question twice: the
MLM sees the marked images (``kvpipe answer --benchmark spair-vqa``), the ``spair-vqa`` probe
answers from the image values of the *unmarked* source and target images. The questions come
from the benchmark's own generator (``kvpipe.pipeline.vqa.spair_vqa``) with the same options
(split, n_questions, seed, min_separation, categories), so question ids, candidates and gold
answers are identical on both sides.

records(): the unique source and target images of the questions, ids as the ``spair`` adapter
names them ("<category>/<image name>"), sorted; no masks, meta {"category"}. With ``limit``
(images), the first ``limit`` ids, and only the questions whose two images both remain.
structure()["questions"]: [{"qid", "category", "source", "target" (image ids),
"source_keypoint": [x, y], "candidates": [[x, y] for A, B, C, D], "answer": index of the gold
candidate, "target_bbox"}], points in pixels of the original images.
"""

from __future__ import annotations

from typing import Any, Sequence

from kvpipe.errors import DataError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord
from kvpipe.pipeline.datasets.folder import open_image
from kvpipe.pipeline.vqa.base import VQAItem
from kvpipe.pipeline.vqa.spair_vqa import LABELS, SPairVQA


def question_entry(item: VQAItem) -> dict[str, Any]:
    m = item.meta
    return {"qid": item.qid, "category": m["category"], "source": m["source_image"], "target": m["target_image"],
            "source_keypoint": list(m["source_keypoint"]), "candidates": [list(c) for c in m["candidates"]],
            "answer": LABELS.index(item.answer), "target_bbox": list(m["target_bbox"])}


@DATASETS.register
class SPairVQAImages(DatasetAdapter):
    """The unmarked images of the SPair-as-VQA questions, with the questions as structure."""

    tasks = ("spair-vqa", "input-agnostic")
    needs_root = True
    root_hint = SPairVQA.root_hint

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 n_questions: int | str = 200, seed: int | str = 0, min_separation: float | str = 0.1,
                 categories: str | Sequence[str] | None = None):
        super().__init__(root, split or "test", limit)
        self.bench = SPairVQA(root, split=self.split, n_questions=n_questions, seed=seed,
                              min_separation=min_separation, categories=categories)
        self._items: list[VQAItem] | None = None

    def items(self) -> list[VQAItem]:
        if self._items is None:
            self._items = self.bench.items()
        return self._items

    def _files(self) -> dict[str, tuple[str, str]]:
        """image id -> (file, category) of every question image."""
        files: dict[str, tuple[str, str]] = {}
        for it in self.items():
            m = it.meta
            files.setdefault(m["source_image"], (m["source_file"], m["category"]))
            files.setdefault(m["target_image"], (m["target_file"], m["category"]))
        return files

    def _image_ids(self) -> list[str]:
        ids = sorted(self._files())
        return ids if self.limit is None else ids[: max(self.limit, 0)]

    def records(self) -> list[ImageRecord]:
        files = self._files()
        out = []
        for image_id in self._image_ids():
            path, cat = files[image_id]
            out.append(ImageRecord(image_id=image_id, source=path, load_image=lambda p=path: open_image(p),
                                   load_annotation=lambda c=cat: Annotation(None, {"category": c})))
        if not out:
            raise DataError(f"--limit {self.limit} leaves no image of the spair-vqa questions")
        return out

    def structure(self) -> dict[str, Any]:
        kept = set(self._image_ids())
        return {"questions": [question_entry(it) for it in self.items()
                              if it.meta["source_image"] in kept and it.meta["target_image"] in kept]}

    def describe(self) -> dict[str, Any]:
        b = self.bench
        return {**super().describe(), "n_questions": b.n_questions, "seed": b.seed,
                "min_separation": b.min_separation, "categories": b.categories}
