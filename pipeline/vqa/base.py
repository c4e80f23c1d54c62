"""The contract of question-answering benchmarks (POPE, MME, BLINK, CV-Bench, SPair-as-VQA).

Why a separate registry from the image datasets: a benchmark item is a question over one or
more images with a gold answer, scored from the model's generated text; the image datasets
feed extraction. Both read the benchmark's own files (a local path or a local `datasets`
copy) and never download.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from PIL import Image

from kvpipe.pipeline.vqa.common import predictions_of
from kvpipe.registry import Registry


@dataclass(frozen=True)
class VQAItem:
    """One question.

    qid: unique within the benchmark (the benchmark's own question id where it has one).
    subset: POPE split (random/popular/adversarial), MME category, BLINK sub-task, CV-Bench task.
    question: the question as the benchmark gives it.
    prompt: the text shown to the model after the image(s): question plus the answer
        instruction, built as lmms-eval builds it for this benchmark.
    images: loaders of the question's images, in order; image_ids name them.
    choices: the options of a multiple-choice question ("" letters are implied A, B, ...);
        empty for yes/no questions.
    answer: the gold answer: "yes"/"no", or the option letter ("A", "B", ...).
    """

    qid: str
    benchmark: str
    subset: str
    question: str
    prompt: str
    images: tuple[Callable[[], Image.Image], ...] = field(repr=False, compare=False)
    image_ids: tuple[str, ...]
    choices: tuple[str, ...]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict, compare=False)


class Benchmark:
    """Base class; subclasses register with ``@BENCHMARKS.register`` (named after their module)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    root_hint: ClassVar[str] = ""  # what --data-root must point at, for error messages
    subsets: ClassVar[tuple[str, ...]] = ()  # the subsets --split can name (empty: open-ended)

    def __init__(self, root: str | None, split: str | None = None, limit: int | None = None):
        self.root, self.split, self.limit = root, split, limit
        self.options: dict[str, Any] = {}  # the keyword options it was built with (create_benchmark)

    def settings(self) -> dict[str, Any]:
        """What selects and phrases its questions, as answers' run.json records it: data root (an
        absolute path, or a hub id), split, limit and the options."""
        root = self.root
        if root is not None and Path(str(root)).expanduser().exists():
            root = str(Path(str(root)).expanduser().resolve())
        return {"data_root": root, "split": self.split, "limit": self.limit,
                "options": {k: self.options[k] for k in sorted(self.options)}}

    def items(self) -> list[VQAItem]:
        raise NotImplementedError

    def parse(self, item: VQAItem, text: str) -> str:
        """The model's generated text -> a normalised answer ("yes"/"no"/"other" or a letter)."""
        raise NotImplementedError

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """Tidy rows {subset, metric, value} from generated texts keyed by qid."""
        raise NotImplementedError

    def correct(self, items: list[VQAItem], predictions: dict[str, str]) -> dict[str, bool]:
        """qid -> whether the parsed answer equals the gold one (the MLM side of a paired task)."""
        texts = predictions_of(self.name, items, predictions)
        return {it.qid: self.parse(it, text) == it.answer for it, text in zip(items, texts)}


# The catalog: one module per benchmark, named after the module, imported when first used.
BENCHMARKS: Registry[type[Benchmark]] = Registry(
    "benchmark", "--benchmark", package="kvpipe.pipeline.vqa", modules=("blink", "cvbench", "mme", "pope", "spair_vqa"))
