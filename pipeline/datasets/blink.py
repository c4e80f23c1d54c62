"""BLINK's reference-and-options sub-tasks (Art_Style, Visual_Similarity) as images to extract.

Why: the paper's paired tasks (Table 5) answer each BLINK question twice, once by the MLM
(``kvpipe answer --benchmark blink``) and once from the image values alone (probes
``art-style`` / ``visual-similarity``). This adapter lists every image of those questions for
``kvpipe extract``; the files are read by the question reader ``kvpipe.pipeline.vqa.blink``, so
both sides see the same rows, ids and pixels.

In both sub-tasks the first image is the reference and the others are the options, in order:
Art_Style asks "use the first image as the reference image, and determine which one of the
second or the third image shares the same style", Visual_Similarity "take the first image as
reference ... which one of the latter two images is most similar to the first one", with
choices "(A) the second image", "(B) the third image".

records(): image ids "<qid>/image_<n>" (the question reader's ``image_ids``), questions in
reader order; no masks; meta {"qid", "subtask", "role": "reference"|"candidate", "position"}.
structure()["questions"]: [{"qid", "subtask", "reference": image id, "candidates": [image ids],
"answer": index into candidates}] -- with ``limit`` (images), only questions whose images all
remain.

Options: ``--split`` is BLINK's data split: ``answered`` (default: every split whose rows carry
answers -- val in the public copy, val + test in a copy with test answers, the paper's 234
Art_Style and 271 Visual_Similarity questions), ``val``, ``test`` or ``val+test``; ``--option
subtask=Art_Style`` (or Visual_Similarity, or "paired" for both, the default).
"""

from __future__ import annotations

from typing import Any

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord
from kvpipe.pipeline.vqa.base import VQAItem
from kvpipe.pipeline.vqa.blink import ANSWERED, BLINK, PAIRED
from kvpipe.pipeline.vqa.common import LETTERS, select

TASK_OF = {"Art_Style": "art-style", "Visual_Similarity": "visual-similarity"}


def question_entry(item: VQAItem) -> dict[str, Any]:
    """One reference-and-options question: image 1 is the reference, images 2.. the options."""
    n_options = len(item.image_ids) - 1
    if n_options < 2 or len(item.choices) != n_options:
        raise DataError(f"BLINK question {item.qid} ({item.subset}) has {len(item.image_ids)} images and "
                        f"{len(item.choices)} choices; a reference-and-options question needs one image more "
                        f"than choices")
    answer = LETTERS.index(item.answer)
    if answer >= n_options:
        raise DataError(f"BLINK question {item.qid}: answer {item.answer} but only {n_options} options")
    return {"qid": item.qid, "subtask": item.subset, "reference": item.image_ids[0],
            "candidates": list(item.image_ids[1:]), "answer": answer}


def _source(loader: Any, image_id: str) -> str:
    path, column, row = (getattr(loader, a, None) for a in ("path", "column", "row"))
    return f"{path}#row={row}&column={column}" if path is not None else f"blink:{image_id}"


@DATASETS.register
class BLINKImages(DatasetAdapter):
    """Every image of the chosen BLINK reference-and-options sub-tasks."""

    tasks = ("art-style", "visual-similarity", "input-agnostic")
    needs_root = True
    sequences = True  # group = question id, frame = image position: --multi-image
    root_hint = BLINK.root_hint

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 subtask: str = "paired"):
        super().__init__(root, split or ANSWERED, limit)
        try:
            self.subtasks = select(self.name, subtask, PAIRED, {"paired": PAIRED}, what="sub-task")
        except UsageError:
            raise UsageError(f"dataset 'blink' option subtask={subtask!r}: choose Art_Style, Visual_Similarity or "
                             f"paired (both); other BLINK sub-tasks have no reference image") from None
        self.tasks = tuple(TASK_OF[s] for s in self.subtasks) + ("input-agnostic",)
        self._items: list[VQAItem] | None = None

    def items(self) -> list[VQAItem]:
        """The questions, read once by the BLINK question reader."""
        if self._items is None:
            reader = BLINK(self.root, subtask=",".join(self.subtasks), data_split=str(self.split))
            self._items = reader.items()
            if not self._items:
                raise DataError(f"{self.root} holds no {' or '.join(self.subtasks)} questions in split {self.split}")
        return self._items

    def _selected(self) -> list[tuple[VQAItem, int]]:
        out = [(it, j) for it in self.items() for j in range(len(it.image_ids))]
        return out if self.limit is None else out[: max(self.limit, 0)]

    def records(self) -> list[ImageRecord]:
        out = []
        for it, j in self._selected():
            image_id = it.image_ids[j]
            meta = {"qid": it.qid, "subtask": it.subset, "role": "reference" if j == 0 else "candidate",
                    "position": j}
            out.append(ImageRecord(image_id=image_id, source=_source(it.images[j], image_id),
                                   load_image=it.images[j], load_annotation=lambda m=meta: Annotation(None, m),
                                   group=it.qid, frame=j))
        return out

    def structure(self) -> dict[str, Any]:
        kept = {it.image_ids[j] for it, j in self._selected()}
        questions = [question_entry(it) for it in self.items()]
        return {"questions": [q for q in questions if {q["reference"], *q["candidates"]} <= kept]}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "subtasks": list(self.subtasks)}
