"""DAVIS-2017 semi-supervised J (region IoU) and F (boundary F-measure).

Faithful port of davisvideochallenge/davis2017-evaluation: ``davis2017/metrics.py``
(``db_eval_iou``, ``db_eval_boundary``, ``f_measure``, ``_seg2bmap``), the per-sequence loop of
``davis2017/evaluation.py`` (``DAVISEvaluation.evaluate`` / ``_evaluate_semisupervised``), the
mean of ``davis2017/utils.py`` ``db_statistics`` and the J&F-Mean of ``evaluation_method.py``.
cv2.dilate and skimage.morphology.disk are replaced by scipy.ndimage.binary_dilation and an
exact copy of ``disk`` (same pixels: the disk is symmetric, and both treat outside as 0).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

VOID_LABEL = 255  # davis2017/evaluation.py: _VOID_LABEL


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J = |gt & pred| / |gt | pred| outside void; 1.0 if the union is empty.

    Port of ``metrics.py`` ``db_eval_iou`` (2-D case).
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    inters = np.sum(gt & pred & keep)
    union = np.sum((gt | pred) & keep)
    return 1.0 if np.isclose(union, 0) else float(inters / union)


def boundary_f(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008) -> float:
    """Boundary F-measure between the contours of ``pred`` and ``gt``.

    Port of ``metrics.py`` ``db_eval_boundary`` -> ``f_measure(pred, gt)``: a boundary pixel
    matches if the other contour lies within ``ceil(bound_th * image diagonal)`` pixels (disk
    dilation; ``bound_th >= 1`` is a radius in pixels).
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    bound_pix = bound_th if bound_th >= 1 else np.ceil(bound_th * np.linalg.norm(pred.shape))

    fg_boundary = seg2bmap(pred & keep)
    gt_boundary = seg2bmap(gt & keep)
    selem = disk(bound_pix)
    fg_dil = ndimage.binary_dilation(fg_boundary, structure=selem)
    gt_dil = ndimage.binary_dilation(gt_boundary, structure=selem)

    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = np.sum(fg_boundary & gt_dil) / float(n_fg)
        recall = np.sum(gt_boundary & fg_dil) / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


def seg2bmap(seg: np.ndarray) -> np.ndarray:
    """1-pixel-wide boundary map, offset half a pixel towards the origin.

    Port of ``metrics.py`` ``_seg2bmap`` (D. Martin, 2003) for the same-size case (the official
    evaluation never asks for another size).
    """
    seg = np.asarray(seg, bool)
    e = np.zeros_like(seg)
    s = np.zeros_like(seg)
    se = np.zeros_like(seg)
    e[:, :-1] = seg[:, 1:]
    s[:-1, :] = seg[1:, :]
    se[:-1, :-1] = seg[1:, 1:]
    b = (seg ^ e) | (seg ^ s) | (seg ^ se)
    b[-1, :] = seg[-1, :] ^ e[-1, :]
    b[:, -1] = seg[:, -1] ^ s[:, -1]
    b[-1, -1] = 0
    return b


def disk(radius: float) -> np.ndarray:
    """``skimage.morphology.disk(radius)`` (default ``strict_radius=True``): x^2 + y^2 <= r^2."""
    grid = np.arange(-radius, radius + 1)
    x, y = np.meshgrid(grid, grid)
    return (x**2 + y**2) <= radius**2


def evaluate_video(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                   object_ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """Per-object mean J and F over a video: ``{obj: {"J_mean": .., "F_mean": ..}}``.

    As ``evaluation.py`` does for the semi-supervised task, the first and last frames are not
    scored (``all_gt_masks[:, 1:-1]``): frames 1..T-2. Videos of fewer than 3 frames (where the
    official code would score nothing) score frames 1..T-1. Void pixels (255) count as
    background, as ``davis.py`` ``_get_all_elements`` sets them to 0 before the void mask is
    taken, so the official void mask is always empty. The per-object mean is ``db_statistics``'s
    M (nanmean over frames).
    """
    if len(gt_masks) != len(pred_masks):
        raise ValueError(f"{len(gt_masks)} annotations but {len(pred_masks)} predictions")
    t = len(gt_masks)
    frames = range(1, t - 1) if t >= 3 else range(1, t)
    out: dict[int, dict[str, float]] = {}
    for obj in object_ids:
        js, fs = [], []
        for i in frames:
            gt = np.where(np.asarray(gt_masks[i]) == VOID_LABEL, 0, gt_masks[i]) == obj
            pred = np.asarray(pred_masks[i]) == obj
            js.append(jaccard(gt, pred))
            fs.append(boundary_f(gt, pred))
        out[int(obj)] = {"J_mean": _nanmean(js), "F_mean": _nanmean(fs)}
    return out


def summarize(per_object: dict[object, dict[str, float]]) -> dict[str, float]:
    """Average over all objects (of all videos): J_mean, F_mean and JF_mean = (J + F) / 2.

    ``evaluation_method.py``: ``final_mean = (np.mean(J["M"]) + np.mean(F["M"])) / 2``. Objects
    with no scored frame (NaN, a one-frame video) are left out of the means.
    """
    j = _nanmean([r["J_mean"] for r in per_object.values()])
    f = _nanmean([r["F_mean"] for r in per_object.values()])
    return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2}


def _nanmean(values: Sequence[float]) -> float:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return float("nan")
    return float(np.nanmean(arr))
