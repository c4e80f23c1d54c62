"""spair-vqa: SPair-71k correspondence questions answered from image values (paired task, Table 5).

The paper (Section 3.3) frames SPair-71k correspondence as BLINK-style 4-choice VQA and
evaluates "image value tokens on semantic correspondence as an image pair, as in Section
3.1" (nearest token by cosine). Per question of the store's dataset.json "questions" (the
``spair-vqa`` dataset adapter: the unmarked source and target images, the source keypoint and
the four candidate points A-D of the target, in original-image pixels):

1. the source keypoint selects the token of the source image's base grid that holds it, and
   each candidate point the token of the target's base grid that holds it (the pixel <-> token
   convention of ``semantic_corr``);
2. the answer is the candidate whose token is most cosine-similar to the source token (the
   first one on exact ties, e.g. two candidates in one token).

Metric: ``accuracy`` (chance 0.25). Summary rows: n_questions, n_questions_skipped and
``shared_token_questions``, the questions where two candidates fall in one token, which no
features can always answer at this grid resolution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.base import PROBES
from kvpipe.probes.paired import PairedProbe, cosine_choice
from kvpipe.probes.semantic_corr import base_segment, pixel_to_token


@PROBES.register
class SPairVQAProbe(PairedProbe):
    description = "SPair-71k 4-choice correspondence from image values: candidate token nearest the source token"
    benchmark = "spair-vqa"
    extract_hint = "extract with --dataset spair-vqa (the same options as kvpipe answer --benchmark spair-vqa)"
    defaults: dict[str, Any] = {}

    def image_ids(self, question: dict[str, Any]) -> list[str]:
        return [question["source"], question["target"]]

    def _token(self, image_id: str, points: Any) -> np.ndarray:
        """Flat token index (within the read features) of each (x, y) point on the image's base grid."""
        row = self.images[self.position[image_id]]
        seg = base_segment(row)
        rc = pixel_to_token(np.asarray(points, dtype=np.float64).reshape(-1, 2), (row.image_h, row.image_w),
                            (seg["rows"], seg["cols"]))
        width = seg["cols"] + int(seg["newline"])
        return self._start[row.index] + seg["offset"] + rc[:, 0] * width + rc[:, 1]

    def _load(self) -> None:
        self._start, at = {}, 0
        for r in self.images:  # the layout of store.read(images=self.images).data
            self._start[r.index] = at
            at += r.n_tokens
        k = max(len(q["candidates"]) for q in self.questions)
        src, cand = [], np.zeros((len(self.questions), k), dtype=np.int64)
        for n, q in enumerate(self.questions):
            try:
                src.append(self._token(q["source"], [q["source_keypoint"]])[0])
                cand[n, : len(q["candidates"])] = self._token(q["target"], q["candidates"])
            except (KeyError, TypeError, ValueError) as err:
                raise StoreError(f"question {q.get('qid')} of {self.store.root}/dataset.json is malformed ({err!r}); "
                                 f"expected source_keypoint [x, y] and candidates [[x, y], ...]") from None
        self.source_tokens = np.array(src, dtype=np.int64)
        self.candidate_tokens = cand
        self.n_options = np.array([len(q["candidates"]) for q in self.questions])
        self.shared = int(sum(len(set(cand[n, :m].tolist())) < m for n, m in enumerate(self.n_options)))

    def predict(self, data: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return cosine_choice(data[self.source_tokens].astype(np.float64),
                             data[self.candidate_tokens].astype(np.float64), self.n_options)

    def summary(self) -> dict[str, float]:
        return {"chance_accuracy": float(np.mean(1.0 / self.n_options)), "shared_token_questions": self.shared}
