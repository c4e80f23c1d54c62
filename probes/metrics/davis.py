"""DAVIS-2017 semi-supervised J (region IoU) and F (boundary F-measure).

Faithful port of davisvideochallenge/davis2017-evaluation: ``davis2017/metrics.py``
(``db_eval_iou``, ``db_eval_boundary``, ``f_measure``, ``_seg2bmap``), the per-sequence loop of
``davis2017/evaluation.py`` (``DAVISEvaluation.evaluate`` / ``_evaluate_semisupervised``), the
mean of ``davis2017/utils.py`` ``db_statistics`` and the J&F-Mean of ``evaluation_method.py``.
cv2.dilate and skimage.morphology.disk are replaced by scipy.ndimage.binary_dilation and an
exact copy of ``disk`` (same pixels: the disk is symmetric, and both treat outside as 0) in
``boundary_f_dilation``, the literal port. What the probes run computes the same numbers faster:
the ground truth's contour once per frame and object (``BoundaryRef``, ``VideoReference``), and
"inside the other contour's disk dilation" answered by a nearest-neighbour query with integer
squared distances (``Contour``), which is the same test for the disk's integer radius. The same
counts on a torch device, for every frame and object of a batch at once: ``davis_torch.py``.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

VOID_LABEL = 255  # davis2017/evaluation.py: _VOID_LABEL


def jaccard(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None) -> float:
    """Region similarity J = |gt & pred| / |gt | pred| outside void; 1.0 if the union is empty.

    Port of ``metrics.py`` ``db_eval_iou`` (2-D case).
    """
    gt, pred = np.asarray(gt, bool), np.asarray(pred, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    if void is None:
        inters, union = np.count_nonzero(gt & pred), np.count_nonzero(gt | pred)
    else:
        keep = ~np.asarray(void, bool)
        inters, union = np.count_nonzero(gt & pred & keep), np.count_nonzero((gt | pred) & keep)
    return 1.0 if np.isclose(union, 0) else float(inters / union)


def boundary_f(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None, bound_th: float = 0.008) -> float:
    """Boundary F-measure between the contours of ``pred`` and ``gt``.

    Port of ``metrics.py`` ``db_eval_boundary`` -> ``f_measure(pred, gt)``: a boundary pixel
    matches if the other contour lies within ``ceil(bound_th * image diagonal)`` pixels (disk
    dilation; ``bound_th >= 1`` is a radius in pixels). Computed through ``BoundaryRef`` (the
    ground truth's side, reusable) and ``Contour`` (nearest contour pixel within the disk);
    equal to the literal port ``boundary_f_dilation``.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    if void is not None:
        keep = ~np.asarray(void, bool)
        gt, pred = gt & keep, pred & keep
    return BoundaryRef(gt, bound_th).f_measure(pred)


def boundary_f_dilation(gt: np.ndarray, pred: np.ndarray, void: np.ndarray | None = None,
                        bound_th: float = 0.008) -> float:
    """``boundary_f`` as the official code computes it: both contours dilated by the whole disk
    (``cv2.dilate`` there, ``scipy.ndimage.binary_dilation`` here). The reference the fast path
    is tested against; about 0.1 s per call on a 480 x 854 frame."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if gt.shape != pred.shape:
        raise ValueError(f"annotation {gt.shape} and segmentation {pred.shape} shapes differ")
    keep = np.ones_like(gt) if void is None else ~np.asarray(void, bool)
    bound_pix = bound_radius(bound_th, pred.shape)

    fg_boundary = seg2bmap(pred & keep)
    gt_boundary = seg2bmap(gt & keep)
    selem = disk(bound_pix)
    fg_dil = ndimage.binary_dilation(fg_boundary, structure=selem)
    gt_dil = ndimage.binary_dilation(gt_boundary, structure=selem)
    n_fg, n_gt = int(fg_boundary.sum()), int(gt_boundary.sum())
    return f_from_counts(n_fg, n_gt, int(np.sum(fg_boundary & gt_dil)), int(np.sum(gt_boundary & fg_dil)))


def bound_radius(bound_th: float, shape: tuple[int, ...]) -> float:
    """The matching distance in pixels: ``bound_th`` itself when >= 1, else ``ceil(bound_th x diagonal)``."""
    return bound_th if bound_th >= 1 else float(np.ceil(bound_th * np.linalg.norm(shape)))


def f_from_counts(n_fg: int, n_gt: int, fg_matched: int, gt_matched: int) -> float:
    """``f_measure``'s precision / recall cases and the F-measure, from boundary pixel counts."""
    if n_fg == 0 and n_gt > 0:
        precision, recall = 1.0, 0.0
    elif n_fg > 0 and n_gt == 0:
        precision, recall = 0.0, 1.0
    elif n_fg == 0 and n_gt == 0:
        precision, recall = 1.0, 1.0
    else:
        precision = fg_matched / float(n_fg)
        recall = gt_matched / float(n_gt)
    if precision + recall == 0:
        return 0.0
    return float(2 * precision * recall / (precision + recall))


class Contour:
    """A contour's pixels and a k-d tree over them, for "is any of these pixels within the
    disk of radius r around that one" in O(log n) per query pixel.

    The official measure dilates one contour by ``disk(r)`` and counts the other contour's
    pixels inside the dilation. For an integer r (the evaluation's ``ceil(0.008 x diagonal)``)
    ``disk`` holds the offsets with dx^2 + dy^2 <= r^2, so a pixel is in the dilation exactly
    when its nearest contour pixel is within that integer squared distance: the tree finds the
    nearest one and the squared distance is recomputed in integers, so the answer is exact.
    Other radii (``bound_th >= 1`` with a fraction: a disk not centred on a pixel) use
    ``binary_dilation`` with the same disk, as the literal port does."""

    def __init__(self, mask_boundary: np.ndarray):
        self.shape = mask_boundary.shape
        self.ys, self.xs = (a.astype(np.int64) for a in np.nonzero(mask_boundary))
        self._tree = None

    @property
    def n(self) -> int:
        return int(self.ys.size)

    def count_within(self, ys: np.ndarray, xs: np.ndarray, radius: float) -> int:
        """How many of the pixels (ys, xs) have a pixel of this contour within ``disk(radius)``."""
        if self.n == 0 or len(ys) == 0:
            return 0
        if not float(radius).is_integer():
            dil = np.zeros(self.shape, bool)
            dil[self.ys, self.xs] = True
            return int(np.count_nonzero(ndimage.binary_dilation(dil, structure=disk(radius))[ys, xs]))
        if self._tree is None:
            self._tree = cKDTree(np.c_[self.ys, self.xs])
        _, nearest = self._tree.query(np.c_[ys, xs], k=1, distance_upper_bound=radius + 1)
        found = nearest < self.n  # the tree answers n where nothing is within the bound
        near = nearest[found]
        d2 = (np.asarray(ys)[found] - self.ys[near]) ** 2 + (np.asarray(xs)[found] - self.xs[near]) ** 2
        return int(np.count_nonzero(d2 <= int(radius) ** 2))


class BoundaryRef:
    """The ground truth's side of the boundary F-measure, computed once and reused for every
    prediction of that frame and object: its contour (``Contour``, with its k-d tree once
    asked). ``f_measure(pred)`` equals ``boundary_f(gt, pred)`` and ``boundary_f_dilation``."""

    def __init__(self, gt: np.ndarray, bound_th: float = 0.008):
        gt = np.asarray(gt, bool)
        self.shape = gt.shape
        self.radius = bound_radius(bound_th, gt.shape)
        self.contour = Contour(seg2bmap(gt))

    def f_measure(self, pred: np.ndarray) -> float:
        pred = np.asarray(pred, bool)
        if pred.shape != self.shape:
            raise ValueError(f"annotation {self.shape} and segmentation {pred.shape} shapes differ")
        fg = Contour(seg2bmap(pred))
        n_fg, n_gt = fg.n, self.contour.n
        if n_fg == 0 or n_gt == 0:
            return f_from_counts(n_fg, n_gt, 0, 0)
        fg_matched = self.contour.count_within(fg.ys, fg.xs, self.radius)  # precision: fg_boundary & gt_dil
        gt_matched = fg.count_within(self.contour.ys, self.contour.xs, self.radius)  # recall: gt_boundary & fg_dil
        return f_from_counts(n_fg, n_gt, fg_matched, gt_matched)


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


def scored_frames(n_frames: int) -> range:
    """Frames the semi-supervised evaluation scores: 1..T-2 (``all_gt_masks[:, 1:-1]``), or
    1..T-1 for videos of fewer than 3 frames (where the official code would score none)."""
    return range(1, n_frames - 1) if n_frames >= 3 else range(1, n_frames)


def object_mask(gt: np.ndarray, obj: int) -> np.ndarray:
    """The ground truth of one object; void (255) counts as background (label 0)."""
    gt = np.asarray(gt)
    return (np.where(gt == VOID_LABEL, 0, gt) if obj == 0 else gt) == obj


class VideoReference:
    """The ground truth's side of one video's evaluation, prepared once (a probe's ``prepare``)
    and reused for every prediction: per scored frame and object, the contour and its dilation
    (``BoundaryRef``). ``evaluate(preds)`` equals ``evaluate_video(gt_masks, preds, objects)``."""

    def __init__(self, gt_masks: Sequence[np.ndarray], object_ids: Iterable[int], bound_th: float = 0.008):
        self.gt = [np.asarray(m) for m in gt_masks]
        self.objects = [int(o) for o in object_ids]
        self.frames = scored_frames(len(self.gt))
        self.bounds = {(i, obj): BoundaryRef(object_mask(self.gt[i], obj), bound_th)
                       for obj in self.objects for i in self.frames}

    def evaluate(self, pred_masks: Sequence[np.ndarray]) -> dict[int, dict[str, float]]:
        if len(self.gt) != len(pred_masks):
            raise ValueError(f"{len(self.gt)} annotations but {len(pred_masks)} predictions")
        return _per_object(self.gt, pred_masks, self.objects, self.frames,
                           lambda i, obj, gt, pred: self.bounds[i, obj].f_measure(pred))


def evaluate_video(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                   object_ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """Per-object mean J and F over a video: ``{obj: {"J_mean": .., "F_mean": ..}}``.

    As ``evaluation.py`` does for the semi-supervised task, the first and last frames are not
    scored (``all_gt_masks[:, 1:-1]``): frames 1..T-2. Videos of fewer than 3 frames (where the
    official code would score nothing) score frames 1..T-1. Void pixels (255) count as
    background, as ``davis.py`` ``_get_all_elements`` sets them to 0 before the void mask is
    taken, so the official void mask is always empty. The per-object mean is ``db_statistics``'s
    M (nanmean over frames). Several predictions of one video: ``VideoReference``.
    """
    return VideoReference(gt_masks, object_ids).evaluate(pred_masks)


def evaluate_video_dilation(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray],
                            object_ids: Iterable[int]) -> dict[int, dict[str, float]]:
    """``evaluate_video`` through the literal port ``boundary_f_dilation`` (the reference)."""
    if len(gt_masks) != len(pred_masks):
        raise ValueError(f"{len(gt_masks)} annotations but {len(pred_masks)} predictions")
    return _per_object(gt_masks, pred_masks, [int(o) for o in object_ids], scored_frames(len(gt_masks)),
                       lambda i, obj, gt, pred: boundary_f_dilation(gt, pred))


def _per_object(gt_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray], objects: list[int],
                frames: range, f_measure) -> dict[int, dict[str, float]]:
    out: dict[int, dict[str, float]] = {}
    for obj in objects:
        js, fs = [], []
        for i in frames:
            gt = object_mask(gt_masks[i], obj)
            pred = np.asarray(pred_masks[i]) == obj
            js.append(jaccard(gt, pred))
            fs.append(f_measure(i, obj, gt, pred))
        out[obj] = {"J_mean": nanmean(js), "F_mean": nanmean(fs)}
    return out


def summarize(per_object: dict[object, dict[str, float]]) -> dict[str, float]:
    """Average over all objects (of all videos): J_mean, F_mean and JF_mean = (J + F) / 2.

    ``evaluation_method.py``: ``final_mean = (np.mean(J["M"]) + np.mean(F["M"])) / 2``. Objects
    with no scored frame (NaN, a one-frame video) are left out of the means.
    """
    j = nanmean([r["J_mean"] for r in per_object.values()])
    f = nanmean([r["F_mean"] for r in per_object.values()])
    return {"J_mean": j, "F_mean": f, "JF_mean": (j + f) / 2}


def nanmean(values: Sequence[float]) -> float:
    """Mean over the defined values; NaN without a warning when none is defined."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or np.all(np.isnan(arr)):
        return float("nan")
    return float(np.nanmean(arr))
