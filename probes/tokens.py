"""Token grid <-> pixel mask mapping shared by the segmentation probes.

Why one place: every segmentation probe needs the same three conversions and they must agree
with each other, or an oracle feature would not score 1.0:

* ground truth -> token grid: the share of a token's pixels that carry a class (area
  fractions; a pixel belongs to the token whose cell holds the pixel's centre);
* token scores -> pixels: bilinear upsampling with PyTorch's ``align_corners=False`` rule
  (``propagation.bilinear_matrix``), straight to the annotation's resolution;
* mask labels -> class ids: through the annotation's ``"labels"`` map, 255 = ignore.

The token grid is the image's ``base`` segment (the whole image at the encoder's base
resolution), the grid ``Features.grid(i)`` returns; it spans the whole image, so pixel and
token coordinates are proportional.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.propagation import bilinear_matrix

IGNORE = 255  # mask label of pixels that no metric counts (VOC borders, ImageNet-S "other")


def base_grid_hw(row: Any) -> tuple[int, int]:
    """(rows, cols) of an image row's base token grid, from the manifest alone (no feature read)."""
    for seg in row.segment_list():
        if seg["name"] == "base":
            return int(seg["rows"]), int(seg["cols"])
    raise StoreError(f"image {row.image_id} has no 'base' token segment; the store is damaged "
                     f"(run kvpipe verify)")


# ------------------------------------------------------------------------------- labels
def label_ids(meta: dict[str, Any], class_id: int) -> list[int]:
    """Mask labels whose class is ``class_id`` (without a "labels" map, label = class id)."""
    labels = meta.get("labels")
    if not labels:
        return [int(class_id)]
    return sorted(int(k) for k, v in labels.items() if int(v) == int(class_id))


def class_map(mask: np.ndarray, meta: dict[str, Any]) -> np.ndarray:
    """Mask labels -> class ids (int64), -1 for ignore; label 0 is background (class 0)
    unless the "labels" map says otherwise; labels missing from the map are background too."""
    labels = meta.get("labels")
    if not labels:
        lut = np.arange(256, dtype=np.int64)
    else:
        lut = np.zeros(256, dtype=np.int64)
        for k, v in labels.items():
            lut[int(k)] = int(v)
    lut[IGNORE] = -1
    return lut[np.asarray(mask, dtype=np.uint8)]


def classes_present(meta: dict[str, Any], mask: np.ndarray | None = None) -> list[int]:
    """Foreground class ids of an image: the values of its "labels" map (or the mask's labels)."""
    labels = meta.get("labels")
    if labels:
        return sorted({int(v) for v in labels.values()} - {0})
    if mask is None:
        return []
    return sorted(int(v) for v in np.unique(mask) if 0 < v < IGNORE)


# ------------------------------------------------------------------------ pixels -> tokens
@lru_cache(maxsize=256)
def _axis_index(n_pixels: int, n_tokens: int) -> np.ndarray:
    """Token index along one axis of each pixel: the token whose cell holds the pixel centre."""
    idx = np.floor((np.arange(n_pixels) + 0.5) * n_tokens / n_pixels).astype(np.int64)
    return np.minimum(idx, n_tokens - 1)


def pixel_token_index(mask_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """(H, W) int64: flat index (row * cols + col) of the token each pixel falls in."""
    ys = _axis_index(int(mask_hw[0]), int(grid_hw[0]))
    xs = _axis_index(int(mask_hw[1]), int(grid_hw[1]))
    return ys[:, None] * int(grid_hw[1]) + xs[None, :]


def token_fractions(fg: np.ndarray, valid: np.ndarray, grid_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per token (flat, rows * cols): share of its valid pixels that are ``fg``, and share of its
    pixels that are valid. A token with no valid pixel has fraction 0 and weight 0."""
    tok = pixel_token_index(fg.shape, grid_hw)
    n = int(grid_hw[0]) * int(grid_hw[1])
    total = np.bincount(tok.ravel(), minlength=n).astype(np.float64)
    n_valid = np.bincount(tok[valid], minlength=n).astype(np.float64)
    n_fg = np.bincount(tok[valid & fg], minlength=n).astype(np.float64)
    frac = np.divide(n_fg, n_valid, out=np.zeros(n), where=n_valid > 0)
    weight = np.divide(n_valid, total, out=np.zeros(n), where=total > 0)
    return frac, weight


def border_tokens(grid_hw: tuple[int, int]) -> np.ndarray:
    """(rows * cols,) bool: tokens on the outer ring of the grid."""
    h, w = int(grid_hw[0]), int(grid_hw[1])
    ring = np.zeros((h, w), bool)
    ring[0, :] = ring[-1, :] = ring[:, 0] = ring[:, -1] = True
    return ring.ravel()


# ------------------------------------------------------------------------ tokens -> pixels
@lru_cache(maxsize=256)
def bilinear_weights(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) row weights of align_corners=False bilinear resizing; cached per size pair."""
    return bilinear_matrix(n_in, n_out, n_in / n_out)


def upsample_bilinear(maps: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Token maps (h, w) or (h, w, C) -> (H, W[, C]) float64, as ``F.interpolate(size=out_hw,
    mode="bilinear", align_corners=False)`` computes it."""
    maps = np.asarray(maps, dtype=np.float64)
    squeeze = maps.ndim == 2
    if squeeze:
        maps = maps[..., None]
    h, w, c = maps.shape
    wy = bilinear_weights(h, int(out_hw[0]))  # (H, h)
    wx = bilinear_weights(w, int(out_hw[1]))  # (W, w)
    big_h = wy.shape[0]
    rows = (wy @ maps.reshape(h, w * c)).reshape(big_h, w, c)  # (H, w, C)
    cols = wx @ rows.transpose(1, 0, 2).reshape(w, big_h * c)  # (W, H * C): one BLAS call
    out = cols.reshape(-1, big_h, c).transpose(1, 0, 2)  # (H, W, C)
    return out[..., 0] if squeeze else out
