"""art-style: BLINK Art_Style answered from image values (the paper's paired task, Table 5).

The paper (Section 3.3): "We perform average pooling of image value tokens in each image,
selecting the image option with highest cosine similarity with the image in the question."
Per question of the store's dataset.json "questions" (the ``blink`` dataset adapter: image 1
is the reference, images 2.. the options, ``answer`` the gold option's index):

1. mean-pool each image's tokens of one (kind, layer, head) -- every token of the image
   (``tokens=all``, default; for any-resolution models that includes the crops and their
   row-end tokens) or only its base-view grid (``tokens=base``);
2. choose the option whose pooled vector has the largest cosine similarity with the
   reference's (the first one on exact ties).

Which images: ``images=sequence`` (default) reads each question's images as the MLM holds them
when it answers the question: all of them in one prompt (``kvpipe extract --multi-image``), the
options' values shaped by the images before them; the manifest rows say where each image sat
(sequence, sequence_index). A store of images extracted one by one is refused in one line
naming that flag; ``images=single`` scores such a store explicitly.

Metric: ``accuracy`` (chance = 1 / options: 0.5 for BLINK's two options). Per-question choices
of every target go to predictions.parquet (see ``kvpipe.probes.paired``); ``kvpipe paired``
crosses them with the MLM's answers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.paired import PairedProbe, cosine_choice, mean_pool
from kvpipe.probes.tokens import base_grid_hw

TOKENS = ("all", "base")
IMAGES = ("sequence", "single")  # one prompt per question (--multi-image) | each image extracted alone


class ReferenceChoice(PairedProbe):
    """Pick the option image closest to the reference image (mean-pooled, cosine)."""

    subtask = ""  # BLINK sub-task of the questions this probe answers
    benchmark = "blink"
    defaults = {"tokens": "all", "images": "sequence"}
    crop_params = {"tokens": ("all",)}  # every token: crops, tiles and newlines too

    def wanted(self, question: dict[str, Any]) -> bool:
        return question.get("subtask") == self.subtask

    def image_ids(self, question: dict[str, Any]) -> list[str]:
        return [question["reference"], *question["candidates"]]

    def _load(self) -> None:
        for key, allowed in (("tokens", TOKENS), ("images", IMAGES)):
            if self.params[key] not in allowed:
                raise UsageError(f"{self.name} parameter {key}={self.params[key]!r} must be one of "
                                 f"{', '.join(allowed)}")
        if self.params["images"] == "sequence":
            self._check_sequences()
        index, starts, at, n = [], [], 0, 0
        for r in self.images:  # the layout of store.read(images=self.images).data
            if self.params["tokens"] == "all":
                idx = np.arange(r.n_tokens)
            else:
                seg = next(s for s in r.segment_list() if s["name"] == "base")
                rows, cols = base_grid_hw(r)
                width = cols + int(seg["newline"])
                grid = np.arange(rows)[:, None] * width + np.arange(cols)[None, :]
                idx = seg["offset"] + grid.ravel()
            starts.append(n)
            index.append(idx + at)
            at += r.n_tokens
            n += len(idx)
        self.pool_index = np.concatenate(index)
        self.pool_starts = np.array(starts, dtype=np.int64)
        k = max(len(q["candidates"]) for q in self.questions)
        self.n_options = np.array([len(q["candidates"]) for q in self.questions])
        self.reference = np.array([self.position[q["reference"]] for q in self.questions])
        opts = np.zeros((len(self.questions), k), dtype=np.int64)
        for n, q in enumerate(self.questions):
            opts[n, : len(q["candidates"])] = [self.position[c] for c in q["candidates"]]
        self.options = opts

    def _check_sequences(self) -> None:
        """Every question's images come from one prompt, reference first (``--multi-image`` rows)."""
        rows = {r.image_id: r for r in self.images}
        for q in self.questions:
            got = [rows[i] for i in self.image_ids(q)]
            if any(not r.sequence for r in got):
                raise StoreError(f"store {self.store.root} holds question {q['qid']}'s images extracted one by one; "
                                 f"{self.name} reads each question's images from one prompt, as the MLM answers "
                                 f"it: extract again with kvpipe extract --dataset blink --multi-image (or pass "
                                 f"--param images=single to score these)")
            if len({r.sequence for r in got}) != 1 or [r.sequence_index for r in got] != list(range(len(got))):
                raise StoreError(f"store {self.store.root}: the images of question {q['qid']} are not one prompt's "
                                 f"images in order (sequence, sequence_index of the manifest); run kvpipe verify")

    def predict(self, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        pooled = mean_pool(data, self.pool_index, self.pool_starts)
        return cosine_choice(pooled[self.reference], pooled[self.options], self.n_options)

    def summary(self) -> dict[str, float]:
        return {"chance_accuracy": float(np.mean(1.0 / self.n_options)),
                "images_in_one_prompt": float(self.params["images"] == "sequence")}


@PROBES.register
class ArtStyle(ReferenceChoice):
    description = "BLINK Art_Style from image values: mean-pooled tokens, option most cosine-similar to the reference"
    subtask = "Art_Style"
    extract_hint = "extract with --dataset blink --option subtask=Art_Style (or subtask=paired) --multi-image"
