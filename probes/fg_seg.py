"""fg-seg: few-shot foreground segmentation with a linear classifier on token features (Pascal-5i).

Protocol (paper Section 3.1: "We train a linear classifier on top of each image value to perform
5-shot binary segmentation", Pascal-5i split 0; episodes and metrics as HSNet / PFENet):

* episodes come from the store's dataset.json (``structure()["episodes"]``: query, support
  ids, class); the first ``shots`` supports of each episode are used;
* training samples = the support images' base-grid tokens; target = share of the token's
  valid pixels that belong to the episode's class (labels through the annotation's "labels"
  map; 255 = ignore), sample weight = share of the token's pixels that are valid. This is
  per-pixel logistic loss on block-upsampled token scores, summed per token;
* classifier = L2-regularised logistic regression (C = 1, features centred and scaled per
  episode), solved exactly per episode, many episodes per batch (``probes/logistic.py``);
* the query's token probabilities are upsampled bilinearly to the mask resolution and
  thresholded at 0.5; foreground / background intersection and union per episode, 255 ignored;
* ``mIoU`` = mean over the fold's classes of (sum of intersections / sum of unions of that
  class's episodes); ``FB_IoU`` = mean of background and foreground IoU over all episodes
  (HSNet ``common/logger.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.logistic import fit_logistic
from kvpipe.probes.metrics.segmentation import FewShotIoU, binary_areas
from kvpipe.probes.predictions import MaskImages, MaskItem
from kvpipe.probes.tokens import IGNORE, base_grid_hw, label_ids, token_fractions, upsample_bilinear

BATCH_BYTES = 256 * 2**20  # padded support features per batch of episodes (float32)


@dataclass
class Episode:
    query: str
    support: tuple[str, ...]
    class_id: int


@PROBES.register
class ForegroundSegmentation(Probe):
    description = "few-shot foreground segmentation: logistic regression on support tokens, mIoU (Pascal-5i)"
    primary_metric = "mIoU"
    prediction_format = "masks"
    defaults = {"shots": 5, "C": 1.0, "threshold": 0.5, "max_iter": 50}
    version = 1

    def prepare(self) -> None:
        root = self.store.root
        episodes = self.store.structure().get("episodes") or []
        if not episodes:
            raise StoreError(f"store {root} has no episodes; fg-seg needs a dataset with few-shot episodes "
                             f"such as pascal5i or synthetic")
        shots = self.params["shots"]
        most = min(len(ep.get("support", [])) for ep in episodes)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise UsageError(f"--param shots={shots!r} must be an integer from 1 to {most}")
        if shots > most:
            raise UsageError(f"--param shots={shots} is more than the {most} support images per episode in "
                             f"store {root}; use shots <= {most}")
        for key, low, high in (("C", 0.0, float("inf")), ("threshold", 0.0, 1.0)):
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < float(v) < high:
                raise UsageError(f"--param {key}={v!r} must be a number in ({low:g}, {high:g})")
        if isinstance(self.params["max_iter"], bool) or not isinstance(self.params["max_iter"], int) \
                or self.params["max_iter"] < 1:
            raise UsageError(f"--param max_iter={self.params['max_iter']!r} must be an integer >= 1")
        rows = {r.image_id: r for r in self.store.images()}
        self.episodes: list[Episode] = []
        for ep in episodes:
            ids = (ep["query"], *ep["support"][:shots])
            if all(i in rows and rows[i].mask_offset >= 0 for i in ids):
                self.episodes.append(Episode(ep["query"], tuple(ep["support"][:shots]), int(ep["class"])))
        if not self.episodes:
            raise StoreError(f"store {root}: none of its {len(episodes)} episodes has all its images extracted "
                             f"with a mask; re-extract the failed images")
        needed = sorted({i for ep in self.episodes for i in (ep.query, *ep.support)}, key=lambda i: rows[i].index)
        self.rows = [rows[i] for i in needed]
        self.grids = {i: base_grid_hw(rows[i]) for i in needed}
        annotations = {i: self.store.annotation(rows[i]) for i in needed}
        # computed once: support targets (image, class) -> (fraction, weight) per token, and the
        # queries' ground truth (image, class) -> (foreground, valid) pixels
        self.support_labels = {}
        self.query_truth = {}
        for ep in self.episodes:
            for s in ep.support:
                if (s, ep.class_id) not in self.support_labels:
                    fg, valid = class_pixels(annotations[s], ep.class_id)
                    self.support_labels[(s, ep.class_id)] = token_fractions(fg, valid, self.grids[s])
            if (ep.query, ep.class_id) not in self.query_truth:
                self.query_truth[(ep.query, ep.class_id)] = class_pixels(annotations[ep.query], ep.class_id)

    def score(self, target: Target) -> dict[str, float]:
        acc = FewShotIoU()
        self._run(target, acc)
        return {"mIoU": acc.miou(), "FB_IoU": acc.fb_iou()}

    def predictions(self, target: Target) -> MaskImages:
        """Each episode's predicted query mask: the episode's class id on the foreground."""
        keep: dict[int, np.ndarray] = {}
        self._run(target, FewShotIoU(), keep)
        items = []
        for n, ep in enumerate(self.episodes):
            pred = keep[id(ep)]
            items.append(MaskItem(f"episode{n:04d}", ep.query, np.where(pred, ep.class_id, 0).astype(np.uint8),
                                  {"class": ep.class_id, "support": list(ep.support)}))
        return MaskImages(items)

    def _run(self, target: Target, acc: FewShotIoU, keep: dict[int, np.ndarray] | None = None) -> None:
        """Fit and score every episode into ``acc``; ``keep`` gets each episode's predicted mask."""
        feats = self.store.read(target.kind, target.layer, target.head, images=self.rows)
        tokens = {r.image_id: feats.grid(i).reshape(-1, feats.data.shape[1]) for i, r in enumerate(feats.rows)}
        dim = feats.data.shape[1]
        # batches of episodes with similar support sizes (less padding), each under BATCH_BYTES
        sizes = np.array([sum(len(tokens[s]) for s in ep.support) for ep in self.episodes])
        batch: list[Episode] = []
        for j in np.argsort(sizes, kind="stable"):  # ascending: the newest episode is the largest
            if batch and (len(batch) + 1) * int(sizes[j]) * (dim + 1) * 4 > BATCH_BYTES:
                self._batch(batch, tokens, dim, acc, keep)
                batch = []
            batch.append(self.episodes[j])
        if batch:
            self._batch(batch, tokens, dim, acc, keep)

    def _batch(self, episodes: list[Episode], tokens: dict[str, np.ndarray], dim: int, acc: FewShotIoU,
               keep: dict[int, np.ndarray] | None = None) -> None:
        n_max = max(sum(len(tokens[s]) for s in ep.support) for ep in episodes)
        x = np.zeros((len(episodes), n_max, dim), np.float32)
        y = np.zeros((len(episodes), n_max), np.float32)
        w = np.zeros((len(episodes), n_max), np.float32)
        for e, ep in enumerate(episodes):
            x_e = np.concatenate([tokens[s] for s in ep.support])
            fr = np.concatenate([self.support_labels[(s, ep.class_id)][0] for s in ep.support])
            wt = np.concatenate([self.support_labels[(s, ep.class_id)][1] for s in ep.support])
            x[e, : len(x_e)], y[e, : len(x_e)], w[e, : len(x_e)] = x_e, fr, wt
        models = fit_logistic(x, y, w, C=float(self.params["C"]), max_iter=int(self.params["max_iter"]))
        for e, ep in enumerate(episodes):
            logits = tokens[ep.query].astype(np.float64) @ models.coef[e].astype(np.float64) + models.bias[e]
            prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
            fg, valid = self.query_truth[(ep.query, ep.class_id)]
            up = upsample_bilinear(prob.reshape(self.grids[ep.query]), fg.shape)
            pred = up > float(self.params["threshold"])
            inter, union = binary_areas(pred, fg, valid)
            acc.add(ep.class_id, inter, union)
            if keep is not None:
                keep[id(ep)] = pred


def class_pixels(annotation, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of ``class_id``, valid pixels) of an annotation; 255 is not valid."""
    mask = annotation.mask
    return np.isin(mask, label_ids(annotation.meta, class_id)), mask != IGNORE
