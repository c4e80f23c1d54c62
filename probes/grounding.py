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

import numpy as np

from kvpipe.errors import StoreError, UsageError
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
