"""SPair-71k as multiple-choice VQA, framed as BLINK's Semantic_Correspondence task.

Why build it: the paper compares the MLM's answer with the image values' answer on the same
correspondence question (Table 5), and BLINK does not publish its keypoint coordinates. Each
question takes one SPair pair (read by the ``spair`` dataset adapter, so the same layout,
splits and categories) and one of its keypoints: the source image gets a red circle labelled
"REF" at that keypoint; the target image gets four red circles labelled A-D: the keypoint's
true correspondence and three other keypoints of the target, in random order. The prompt is
BLINK's Semantic_Correspondence prompt behind lmms-eval's BLINK pre_prompt; answers are parsed
and scored as BLINK's are.

Sampling (seeded, ``n_questions`` at most one per pair): pairs in a random order; for each, its
keypoints in a random order until one has three distractors that lie more than
``min_separation`` x the target box's longer side from the true point and from each other
(0.1 = the PCK@0.1 radius, so a point prediction within PCK names one candidate at most).

``meta`` holds what a value-token probe needs, all in pixels of the original images:
source_image / target_image (the spair adapter's image ids), source_keypoint [x, y],
candidates [[x, y] for A, B, C, D], gold (the letter), keypoint (index in the pair), and the
pair id, category and target box.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.blink import mc_prompt
from kvpipe.pipeline.vqa.common import (accuracy, apply_limit, extract_letter, float_option, int_option, open_rgb,
                                        predictions_of, row)

LABELS = ("A", "B", "C", "D")
QUESTION = "Which point is corresponding to the reference point?"
# BLINK Semantic_Correspondence: the prompt column's wording, choices "Point A" .. "Point D"
SEMANTIC_PROMPT = (
    "Humans can find corresponding points for different objects in the same category. For instance, if there "
    "are images of two different cats, then the left ear tip of one cat corresponds to the left ear tip of the "
    "other cat, and the right front paw of one cat corresponds to the right front paw of the other cat.\n"
    "Given the following two images, a reference point is annotated on the first image, labeled with REF. You "
    'are given multiple red-circled points on the second image, choices of "A, B, C, D" are drawn beside each '
    "circle. Select between the choices on the second image and find the corresponding point for the reference "
    f"point. {QUESTION}")
CHOICES = tuple(f"Point {c}" for c in LABELS)
MARKER_COLOR = (255, 0, 0)


def blink_semantic_prompt() -> str:
    """The row prompt as BLINK writes it (question, then the options), behind lmms-eval's pre_prompt."""
    options = "\n".join(f"({c}) {text}" for c, text in zip(LABELS, CHOICES))
    return mc_prompt(f"{SEMANTIC_PROMPT}\nSelect from the following choices.\n{options}", len(CHOICES))


def marker_radius(size: tuple[int, int]) -> int:
    return max(4, round(0.02 * max(size)))


def draw_markers(image: Image.Image, points: Sequence[Sequence[float]], labels: Sequence[str]) -> Image.Image:
    """A copy of ``image`` with a red ring (and centre dot) at each point and its label beside it.

    Ring radius 2% of the longer side (at least 4 px); the label, red with a white outline so it
    reads on any background, sits right of the ring, or left of it near the right border.
    """
    out = image.convert("RGB")
    draw = ImageDraw.Draw(out)
    r = marker_radius(out.size)
    size = max(10, round(2.2 * r))
    try:
        font: Any = ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType
        font = ImageFont.load_default()
    for (x, y), label in zip(points, labels):
        draw.ellipse((x - r, y - r, x + r, y + r), outline=MARKER_COLOR, width=max(2, r // 3))
        dot = max(1, r // 4)
        draw.ellipse((x - dot, y - dot, x + dot, y + dot), fill=MARKER_COLOR)
        left, top, right, bottom = draw.textbbox((0, 0), label, font=font, stroke_width=max(1, size // 10))
        w, h = right - left, bottom - top
        tx = x + r + 2 if x + r + 2 + w <= out.width else x - r - 2 - w
        ty = min(max(y - h / 2, 0), max(out.height - h, 0))
        draw.text((tx - left, ty - top), label, fill=MARKER_COLOR, font=font, stroke_width=max(1, size // 10),
                  stroke_fill=(255, 255, 255))
    return out


@dataclass(frozen=True)
class MarkedImage:
    """Loader of an image file with markers drawn on it (picklable)."""

    path: str
    points: tuple[tuple[float, float], ...]
    labels: tuple[str, ...]

    def __call__(self) -> Image.Image:
        return draw_markers(open_rgb(self.path), self.points, self.labels)


def _dist(a: Sequence[float], b: Sequence[float]) -> float:
    return math.hypot(a[0] - b[0], a[1] - b[1])


def choose_distractors(points: Sequence[Sequence[float]], gold: int, min_dist: float, rng: random.Random,
                       k: int = 3) -> list[int] | None:
    """``k`` indices of ``points`` other than ``gold``, each farther than ``min_dist`` from the
    gold point and from the others chosen (candidates in random order, greedy); None if fewer."""
    others = [j for j in range(len(points)) if j != gold]
    rng.shuffle(others)
    chosen: list[int] = []
    for j in others:
        if all(_dist(points[j], points[c]) > min_dist for c in (gold, *chosen)):
            chosen.append(j)
            if len(chosen) == k:
                return chosen
    return None


@BENCHMARKS.register
class SPairVQA(Benchmark):
    """SPair-71k correspondence questions drawn as BLINK Semantic_Correspondence questions."""

    description = "SPair-71k keypoint correspondence as BLINK-style 4-choice VQA (REF + A-D markers)"
    root_hint = "the folder holding SPair-71k/ (with JPEGImages/, PairAnnotation/ and Layout/)"

    def __init__(self, root: str | None, split: str | None = None, limit: int | None = None, *,
                 n_questions: int | str = 200, seed: int | str = 0, min_separation: float | str = 0.1,
                 categories: str | Sequence[str] | None = None):
        super().__init__(root, split, limit)
        self.n_questions = int_option(self.name, "n_questions", n_questions, 1)
        self.seed = int_option(self.name, "seed", seed, 0)
        self.min_separation = float_option(self.name, "min_separation", min_separation, 0.0)
        self.categories = categories

    def _dataset(self) -> Any:
        from kvpipe.pipeline.datasets.spair import SPairDataset

        if self.root is None:
            raise UsageError(f"--data-root is required for benchmark {self.name!r}; point it at {self.root_hint}")
        return SPairDataset(self.root, self.split, categories=self.categories)

    def items(self) -> list[VQAItem]:
        ds = self._dataset()
        pairs = ds.pairs()
        files = {rec.image_id: rec.source for rec in ds.records()}
        rng = random.Random(self.seed)
        order = list(range(len(pairs)))
        rng.shuffle(order)
        prompt = blink_semantic_prompt()
        items: list[VQAItem] = []
        for p in order:
            if len(items) == self.n_questions:
                break
            pair = pairs[p]
            x0, y0, x1, y1 = pair.target_bbox
            min_dist = self.min_separation * max(x1 - x0, y1 - y0)
            kps = list(range(len(pair.target_kps)))
            rng.shuffle(kps)
            for k in kps:
                distractors = choose_distractors(pair.target_kps, k, min_dist, rng)
                if distractors is None:
                    continue
                shown = [k, *distractors]
                rng.shuffle(shown)
                candidates = [tuple(pair.target_kps[j]) for j in shown]
                source_kp = tuple(pair.source_kps[k])
                gold = LABELS[shown.index(k)]
                qid = f"{pair.name}/kp{k}"
                items.append(VQAItem(
                    qid=qid, benchmark=self.name, subset=pair.category, question=QUESTION, prompt=prompt,
                    images=(MarkedImage(files[pair.source], (source_kp,), ("REF",)),
                            MarkedImage(files[pair.target], tuple(candidates), LABELS)),
                    image_ids=(f"{qid}/source", f"{qid}/target"), choices=CHOICES, answer=gold,
                    meta={"pair": pair.name, "category": pair.category, "source_image": pair.source,
                          "target_image": pair.target, "source_keypoint": list(source_kp), "keypoint": k,
                          "candidates": [list(c) for c in candidates], "candidate_keypoints": shown,
                          "gold": gold, "target_bbox": list(pair.target_bbox),
                          "source_file": files[pair.source], "target_file": files[pair.target]}))
                break
        if not items:
            raise DataError(f"no SPair pair of split {ds.split} has 4 keypoints {self.min_separation} x box apart; "
                            f"lower --option min_separation or choose more categories")
        return apply_limit(self.name, items, self.limit)

    def parse(self, item: VQAItem, text: str) -> str:
        return extract_letter(text, "".join(LABELS)) or "other"

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        """accuracy and n per category and for all questions ("all")."""
        texts = predictions_of(self.name, items, predictions)
        flags: dict[str, list[bool]] = {}
        for it, text in zip(items, texts):
            flags.setdefault(it.subset, []).append(self.parse(it, text) == it.answer)
        rows = []
        for cat in sorted(flags):
            rows += [row(cat, "accuracy", accuracy(flags[cat])), row(cat, "n", len(flags[cat]))]
        everything = [f for fs in flags.values() for f in fs]
        return rows + [row("all", "accuracy", accuracy(everything)), row("all", "n", len(everything))]
