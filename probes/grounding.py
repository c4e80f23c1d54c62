"""Text-grounded segmentation shared by semantic-seg and refexp-seg.

Paper Section 3.1: the text (class name / referring expression) goes through the MLM on its
own; its final token's value (key, for the keys kind) at the same (layer, head) is the query,
and "image values with highest dot product with this text token" are the segmented region.

How "highest" becomes a mask (the paper gives no rule; this one is fixed, documented and a
parameter): per image and query, the dot products over the image's base-grid tokens are
min-max normalised to [0, 1]; the normalised maps are upsampled bilinearly to the mask and a
pixel belongs to a query when its normalised score is above ``threshold`` (0.5: the upper half
of the image's score range) and, among several queries of one image (semantic-seg's classes),
to the one scoring highest. Min-max normalisation per image is the usual way to turn
unnormalised localisation maps into masks with one threshold (CAM-style evaluation); it makes
the rule independent of the feature scale, which differs by orders of magnitude across layers.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import Probe, Target
from kvpipe.probes.device import uses_torch
from kvpipe.probes.tokens import upsample_bilinear


def require_text(store, task: str, example: str) -> list[str]:
    """The store's text queries, or a one-line StoreError naming what the task needs."""
    queries = store.text_queries()
    if not queries:
        raise StoreError(f"store {store.root} has no text queries; {task} needs a dataset whose text queries "
                         f"are extracted, such as {example}")
    return queries


def check_threshold(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise UsageError(f"--param threshold={value!r} must be a number in [0, 1)")
    return float(value)


def normalised_scores(tokens: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(N, D) image tokens x (Q, D) query features -> (N, Q) dot products, min-max normalised per
    query over the image's tokens (a constant map becomes 0: nothing stands out)."""
    s = tokens.astype(np.float64) @ queries.astype(np.float64).T
    lo, hi = s.min(axis=0), s.max(axis=0)
    span = hi - lo
    return np.divide(s - lo, span, out=np.zeros_like(s), where=span > 0)


def upsampled_scores(tokens: np.ndarray, queries: np.ndarray, grid_hw: tuple[int, int],
                     out_hw: tuple[int, int]) -> np.ndarray:
    """Normalised scores of every query, upsampled bilinearly to ``out_hw``: (H, W, Q)."""
    norm = normalised_scores(tokens, queries).reshape(int(grid_hw[0]), int(grid_hw[1]), -1)
    return upsample_bilinear(norm, out_hw)


class TextGroundedProbe(Probe):
    """Base of semantic-seg and refexp-seg: a threshold on normalised scores, query indices
    checked against the store's text queries, and each image's scores of its queries.

    A kind is scored when the text queries have features of it too (``store.text_kinds()``):
    an MLM's keys and values; post_proj, the image tokens as they enter the LM against each
    query's final-token input-embedding row (Table 1's post-proj baseline); for SigLIP,
    post_proj is the per-patch embedding in its image-text space against its text tower's
    embedding. A store made before text queries had post_proj skips that kind with a note."""

    kinds = ("keys", "values")  # an encoder's block outputs (hidden) have no text counterpart
    baseline = True
    needs_text = True
    primary_metric = "mIoU"
    defaults = {"threshold": 0.5}
    example: ClassVar[str] = ""  # datasets with the text queries this probe needs, for errors

    def check_query_indices(self, indices: Iterable[int], what: str) -> None:
        """Every index must name one of the store's text queries (else the store is damaged)."""
        n_queries = len(require_text(self.store, self.name, self.example))
        bad = [q for q in indices if not 0 <= q < n_queries]
        if bad:
            raise StoreError(f"store {self.store.root}: {what} index {bad[0]} is outside its {n_queries} "
                             f"text queries; the store is damaged (re-extract it)")

    def targets(self) -> list[Target]:
        """The swept targets whose kind the text queries have (``skipped`` says which are left out)."""
        text = self.store.text_kinds()
        return [t for t in super().targets() if t.kind in text]

    def skipped(self) -> list[str]:
        text = self.store.text_kinds()
        missing = [k for k in (*self.kinds, "post_proj") if k in self.store.meta.kinds and k not in text
                   and self.selection.has_kind(k)]
        return [f"{k}: the store's text queries have no {k} features (a store made before text queries stored "
                f"them); re-extract the store to score it" for k in missing]

    def read(self, target: Target) -> tuple[np.ndarray, Any]:
        """The text queries' and ``self.rows``' features of ``target``."""
        if target.kind == "post_proj":
            return self.store.text("post_proj"), self.store.read("post_proj", images=self.rows)
        return (self.store.text(target.kind, target.layer, target.head),
                self.store.read(target.kind, target.layer, target.head, images=self.rows))

    def image_scores(self, target: Target, data: tuple[np.ndarray, Any] | None = None) -> Callable[..., np.ndarray]:
        """Scores of ``target`` (``read(target)``'s result, read here when not given) as a function:
        scores(row, query indices, out_hw) -> (H, W, Q) normalised, upsampled scores of those text
        queries on that image. On a torch device the products and the upsampling run there (float64,
        as the reference: the threshold and argmax see the same numbers)."""
        text, feats = data if data is not None else self.read(target)
        index = {r.image_id: i for i, r in enumerate(feats.rows)}
        on_device = uses_torch(self.device)

        def scores(row, queries: list[int], out_hw: tuple[int, int]) -> np.ndarray:
            grid = feats.grid(index[row.image_id])
            tokens = grid.reshape(-1, grid.shape[-1])
            if on_device:
                return upsampled_scores_torch(tokens, text[queries], grid.shape[:2], out_hw, self.device)
            return upsampled_scores(tokens, text[queries], grid.shape[:2], out_hw)

        return scores


def upsampled_scores_torch(tokens: np.ndarray, queries: np.ndarray, grid_hw: tuple[int, int],
                           out_hw: tuple[int, int], device: str) -> np.ndarray:
    """``upsampled_scores`` in torch on ``device`` (float64): (H, W, Q) on the host."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(tokens)).to(device, torch.float64)
    q = torch.from_numpy(np.ascontiguousarray(queries)).to(device, torch.float64)
    s = t @ q.T
    lo, hi = s.amin(dim=0), s.amax(dim=0)
    span = hi - lo
    norm = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1), 0)
    maps = norm.T.reshape(1, -1, int(grid_hw[0]), int(grid_hw[1]))
    big = torch.nn.functional.interpolate(maps, size=(int(out_hw[0]), int(out_hw[1])), mode="bilinear",
                                          align_corners=False)
    return big[0].permute(1, 2, 0).cpu().numpy()
