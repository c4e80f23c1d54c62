"""Label propagation for semi-supervised video object segmentation (DAVIS).

A port of facebookresearch/dino ``eval_video_segmentation.py`` (functions
``eval_video_tracking_davis``, ``label_propagation``, ``restrict_neighborhood``, ``norm_mask``,
``read_seg``/``to_one_hot``) to numpy, with the frame features supplied by the caller instead
of a ViT. The paper evaluates DAVIS "with the same method as semantic correspondence", i.e.
nearest neighbours between token features; DINO's protocol is that method for video.

Why each step is as it is (all from DINO):

* memory = first frame (with its ground-truth labels) + the ``n_last_frames`` most recent
  frames (with their *propagated soft* labels, not argmaxed);
* affinity ``exp(cos / T)`` between each target token and every memory token, zeroed outside a
  ``(2s+1) x (2s+1)`` spatial window around the target token's position (same window in every
  memory frame);
* top-k taken jointly over all memory frames' tokens (ties with the k-th value kept), the
  surviving affinities normalised to sum to one per target token, labels averaged with them.

DINO hard-codes the temperature to 0.1 (``torch.exp(torch.bmm(...) / 0.1)``); it is a
parameter here with that default.
"""

from __future__ import annotations

from collections import deque
from typing import Sequence

import numpy as np
from scipy import sparse

DINO_TEMPERATURE = 0.1  # eval_video_segmentation.py: label_propagation, "/ 0.1"
_QUERY_BLOCK_BYTES = 256 * 2**20  # affinity rows are computed in blocks of about this size


# ----------------------------------------------------------------------------------- propagation
def propagate_video(frame_features: Sequence[np.ndarray], first_labels: np.ndarray, *,
                    n_last_frames: int = 7, size_mask_neighborhood: int | tuple[int, int] | None = 12,
                    topk: int = 5, temperature: float = DINO_TEMPERATURE) -> list[np.ndarray]:
    """Propagate frame 0's labels through a video; soft label maps (h, w, C) for frames 1..T-1.

    Port of DINO ``eval_video_tracking_davis`` + ``label_propagation``. ``frame_features``: T
    arrays (h, w, D) on one token grid; ``first_labels``: (h, w, C) one-hot (C includes the
    background). ``size_mask_neighborhood``: the window's radius in tokens, one number for both
    axes as DINO's flag, or (rows, cols); an integer <= 0 (or None) disables the window, as in DINO.
    ``n_last_frames = 0`` keeps only the first frame in memory (DINO's ``queue.Queue(0)`` would
    be unbounded instead).
    """
    if len(frame_features) < 1:
        raise ValueError("propagate_video needs at least one frame")
    h, w, n_classes = first_labels.shape
    for t, f in enumerate(frame_features):
        if f.ndim != 3 or f.shape[:2] != (h, w):
            raise ValueError(f"frame {t} features have shape {f.shape}; expected ({h}, {w}, D) like the labels")
    if topk < 1 or n_last_frames < 0:
        raise ValueError(f"topk must be >= 1 and n_last_frames >= 0 (got {topk}, {n_last_frames})")
    feats = [_l2_normalise(f.reshape(h * w, -1)) for f in frame_features]
    first_seg = np.asarray(first_labels, dtype=np.float64).reshape(h * w, n_classes)
    window = None
    if isinstance(size_mask_neighborhood, (tuple, list)):
        window = neighborhood_mask(h, w, tuple(size_mask_neighborhood))
    elif size_mask_neighborhood is not None and size_mask_neighborhood > 0:
        window = neighborhood_mask(h, w, size_mask_neighborhood)
    memory: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=n_last_frames)
    out = []
    for t in range(1, len(feats)):
        src_feats = [feats[0]] + [f for f, _ in memory]
        src_segs = [first_seg] + [s for _, s in memory]
        seg = propagate_frame(feats[t], src_feats, src_segs, window, topk=topk, temperature=temperature)
        if n_last_frames > 0:
            memory.append((feats[t], seg))
        out.append(seg.reshape(h, w, n_classes).astype(np.float32))
    return out


def propagate_frame(target: np.ndarray, sources: Sequence[np.ndarray], source_segs: Sequence[np.ndarray],
                    window: np.ndarray | None, *, topk: int, temperature: float) -> np.ndarray:
    """One step of DINO ``label_propagation``: labels (N, C) for ``target`` (N, D) tokens.

    ``sources``: L2-normalised (N, D) memory frames, ``source_segs`` their (N, C) labels,
    ``window``: (N, N) bool, True where a memory token is inside the target token's window.
    DINO forms ``A = exp(cos / T) * window``, keeps ``A >= (k-th largest A)`` per target token and
    normalises. Since exp is increasing and window-masked entries are 0, this selects the same
    entries as ``cos >= k-th largest windowed cos`` (ties kept, as DINO's ``aff < tk_val_min``);
    only those are exponentiated, as ``exp((cos - max cos) / T)``, a per-token rescaling that the
    normalisation cancels and that cannot overflow.
    """
    n = target.shape[0]
    n_frames = len(sources)
    src_t = np.concatenate(sources).astype(np.float64, copy=False).T  # (D, M*N), memory-frame major
    segs = np.concatenate(source_segs)  # (M*N, C), same order
    n_mem = n_frames * n
    k = min(topk, n_mem)
    block = max(1, _QUERY_BLOCK_BYTES // (8 * n_mem))
    out = np.empty((n, segs.shape[1]), dtype=np.float64)
    for start in range(0, n, block):  # blocks of target tokens, only to bound memory
        cos = target[start:start + block].astype(np.float64, copy=False) @ src_t  # (B, M*N)
        if window is not None:  # the same spatial window in every memory frame
            outside = np.broadcast_to(~window[start:start + block, None, :], (cos.shape[0], n_frames, n))
            np.copyto(cos.reshape(-1, n_frames, n), -np.inf, where=outside)
        rows, cols, vals = _top_k_with_ties(cos, k)
        weights = np.exp((vals - _row_max(rows, vals, cos.shape[0])[rows]) / temperature)
        aff = sparse.csr_matrix((weights, (rows, cols)), shape=cos.shape)
        out[start:start + block] = (aff @ segs) / np.asarray(aff.sum(axis=1))
    return out


def _top_k_with_ties(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries ``scores[r, c] >= k-th largest finite score of row r`` (all finite ones if fewer).

    DINO's ``topk`` + ``aff < tk_val_min`` rule. Done without partitioning whole rows: the k-th
    largest of G chunk maxima is a lower bound (k distinct entries reach it), so only entries
    above it are candidates, and the exact k-th value is found among those few.
    """
    n_rows, n_cols = scores.shape
    n_chunks = min(n_cols, max(16 * k, 64))
    chunk_max = np.maximum.reduceat(scores, np.linspace(0, n_cols, n_chunks, endpoint=False).astype(np.int64), axis=1)
    bound = np.partition(chunk_max, n_chunks - k, axis=1)[:, n_chunks - k] if n_chunks >= k else \
        np.full(n_rows, -np.inf)
    rows, cols = np.nonzero((scores >= bound[:, None]) & np.isfinite(scores))
    vals = scores[rows, cols]
    counts = np.bincount(rows, minlength=n_rows)
    width = max(int(counts.max(initial=0)), k)
    packed = np.full((n_rows, width), -np.inf)
    packed[rows, np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)] = vals
    kth = np.partition(packed, width - k, axis=1)[:, width - k]
    keep = vals >= kth[rows]
    return rows[keep], cols[keep], vals[keep]


def _row_max(rows: np.ndarray, vals: np.ndarray, n_rows: int) -> np.ndarray:
    out = np.full(n_rows, -np.inf)
    np.maximum.at(out, rows, vals)
    return out


def neighborhood_mask(h: int, w: int, size: int | tuple[int, int]) -> np.ndarray:
    """(h*w, h*w) bool: |di| <= size and |dj| <= size (or (size_rows, size_cols)). DINO
    ``restrict_neighborhood``, vectorised."""
    size_r, size_c = (size, size) if isinstance(size, (int, np.integer)) else size
    rows = np.abs(np.arange(h)[:, None] - np.arange(h)[None, :]) <= size_r
    cols = np.abs(np.arange(w)[:, None] - np.arange(w)[None, :]) <= size_c
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)


def _l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``F.normalize(x, dim=-1, p=2)``: x / max(||x||, eps)."""
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------ first-frame mask
def labels_to_grid(mask: np.ndarray, grid_hw: tuple[int, int], n_classes: int) -> np.ndarray:
    """Integer mask (H, W) -> one-hot (h, w, C) on the token grid, the way DINO ``read_seg`` does.

    DINO reads the first annotation with ``PIL.Image.resize((w, h), 0)`` (nearest neighbour) and
    one-hots it (``to_one_hot``): *nearest* downsampling, not area/bilinear. The sampling
    positions reproduce Pillow's nearest resize. Labels outside ``[0, n_classes)`` (DAVIS void,
    255) become background, as the DAVIS-2017 evaluation does (``davis.py``: 255 -> 0).
    """
    small = resize_nearest(np.asarray(mask), grid_hw).astype(np.int64)
    small[(small < 0) | (small >= n_classes)] = 0
    return np.eye(n_classes, dtype=np.float32)[small]


def resize_nearest(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow ``Image.resize(size, NEAREST)`` for a 2-D array (Geometry.c ``ImagingScaleAffine``).

    Pillow samples source pixel ``int(x0 + 0.5*s + i*s)`` accumulated in double, ``s = in/out``.
    """
    ys = _pil_nearest_index(mask.shape[0], out_hw[0])
    xs = _pil_nearest_index(mask.shape[1], out_hw[1])
    return mask[ys[:, None], xs[None, :]]


def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    pos = np.cumsum(np.r_[scale * 0.5, np.full(n_out - 1, scale)])  # sequential sum like the C loop
    return np.minimum(pos.astype(np.int64), n_in - 1)


# ---------------------------------------------------------------------------------- upsampling
def upsample_to_mask(soft: np.ndarray, out_hw: tuple[int, int], patch_size: int | None = None) -> np.ndarray:
    """Soft labels (h, w, C) -> integer mask (H, W): bilinear upsampling, ``norm_mask``, argmax.

    DINO ``eval_video_tracking_davis``: ``F.interpolate(scale_factor=patch_size, mode='bilinear',
    align_corners=False)``, ``norm_mask`` (per-class min-max), argmax, then a nearest resize to
    the annotation size. With ``patch_size`` that sequence is reproduced exactly; without it the
    bilinear resize goes straight to ``out_hw`` (same sampling rule, scale = in/out), which is the
    same thing when ``out_hw`` is an integer multiple of the grid and also works for other ratios.
    """
    h, w, _ = soft.shape
    if patch_size is not None:
        up = (h * patch_size, w * patch_size)
        scale = (1.0 / patch_size, 1.0 / patch_size)
    else:
        up, scale = tuple(out_hw), (h / out_hw[0], w / out_hw[1])
    wy = bilinear_matrix(h, up[0], scale[0])
    wx = bilinear_matrix(w, up[1], scale[1])
    # two matrix products (BLAS), rows then columns: (Y, x, C) then (X, x) @ (Y, x, C) -> (Y, X, C)
    big = np.matmul(wx, np.tensordot(wy, soft.astype(np.float64), axes=(1, 0)))
    labels = np.argmax(norm_mask(big), axis=-1)
    if tuple(labels.shape) != tuple(out_hw):
        labels = resize_nearest(labels, out_hw)
    return labels.astype(np.int64)


def bilinear_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's 1-D linear interpolation with ``align_corners=False``.

    ``src = max(scale * (dst + 0.5) - 0.5, 0)``; neighbours ``floor(src)`` and the next one
    (clamped at the edge) -- aten ``area_pixel_compute_source_index`` / ``upsample_bilinear2d``.
    """
    src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def norm_mask(soft: np.ndarray) -> np.ndarray:
    """DINO ``norm_mask`` on (H, W, C): each class with max > 0 is shifted to min 0 and scaled to max 1.

    Kept because it changes the argmax (classes are rescaled independently). As in DINO, a class
    that is constant and positive becomes NaN (0/0); ``np.argmax`` then picks it, like torch.max.
    """
    out = soft.copy()
    mx = soft.max(axis=(0, 1))
    mn = soft.min(axis=(0, 1))
    sel = mx > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out[..., sel] = (soft[..., sel] - mn[sel]) / (mx[sel] - mn[sel])
    return out
