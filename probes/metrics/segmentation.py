"""Segmentation metrics: IoU / Jaccard, few-shot mIoU and FB-IoU, semantic-segmentation mIoU.

Conventions, each from the evaluation code the probes follow:

* pixels outside ``valid`` (label 255) count nowhere (PFENet / HSNet ``query_ignore_idx``,
  ImageNet-S and VOC ignore labels);
* few-shot segmentation (HSNet ``common/logger.py`` ``AverageMeter``): per episode, the
  intersection and union of background (0) and foreground (1) are added to the episode's class;
  ``mIoU`` = mean over the classes of (sum of foreground intersections / sum of foreground
  unions), ``FB-IoU`` = mean over {background, foreground} of (sum over classes of
  intersections / sum over classes of unions);
* semantic segmentation (ImageNet-S ``evaluation/evaluator.py``, mmseg): intersections and
  unions per class accumulated over the whole dataset, IoU per class, mean over the classes
  that occur (union > 0);
* co-segmentation (Rubinstein et al. 2013, used by Amir et al. 2022): per image, Jaccard of
  the foreground and precision = share of correctly labelled pixels (foreground and background).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def _valid(gt: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    return np.ones(gt.shape, bool) if valid is None else np.asarray(valid, bool)


def binary_areas(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Intersection and union of background and foreground: two (2,) arrays [bg, fg], in pixels.

    Over the N valid pixels, with P predicted and G true foreground pixels and I_fg in both:
    U_fg = P + G - I_fg, and the background's are I_bg = N - U_fg, U_bg = N - I_fg.
    """
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} shapes differ")
    if valid is not None:
        keep = np.asarray(valid, bool)
        pred, gt, n = pred & keep, gt & keep, np.count_nonzero(keep)
    else:
        n = gt.size
    inter_fg = np.count_nonzero(pred & gt)
    union_fg = np.count_nonzero(pred) + np.count_nonzero(gt) - inter_fg
    return (np.array([n - union_fg, inter_fg], np.float64), np.array([n - inter_fg, union_fg], np.float64))


def jaccard(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Foreground IoU |pred & gt| / |pred | gt| over valid pixels; 1.0 when both are empty."""
    inter, union = binary_areas(pred, gt, valid)
    return 1.0 if union[1] == 0 else float(inter[1] / union[1])


def precision(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Share of valid pixels labelled correctly (foreground and background); 1.0 if none is valid."""
    pred, gt = np.asarray(pred, bool), np.asarray(gt, bool)
    keep = _valid(gt, valid)
    n = np.count_nonzero(keep)
    return 1.0 if n == 0 else float(np.count_nonzero((pred == gt) & keep) / n)


class FewShotIoU:
    """HSNet's accumulator: per class, summed [bg, fg] intersections and unions over episodes."""

    def __init__(self) -> None:
        self.inter: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(2))
        self.union: dict[int, np.ndarray] = defaultdict(lambda: np.zeros(2))

    def add(self, class_id: int, inter: np.ndarray, union: np.ndarray) -> None:
        self.inter[int(class_id)] += inter
        self.union[int(class_id)] += union

    def miou(self) -> float:
        """Mean over classes of foreground IoU (a class with zero union scores 0, as HSNet's
        ``max(union, 1)`` makes it); NaN without classes."""
        if not self.inter:
            return float("nan")
        return float(np.mean([self.inter[c][1] / max(self.union[c][1], 1.0) for c in sorted(self.inter)]))

    def fb_iou(self) -> float:
        """Mean over background and foreground of (sum over classes of I) / (sum of U)."""
        if not self.inter:
            return float("nan")
        inter = np.sum([self.inter[c] for c in self.inter], axis=0)
        union = np.sum([self.union[c] for c in self.union], axis=0)
        return float(np.mean(inter / np.maximum(union, 1.0)))


class ClassIoU:
    """Per-class intersections and unions accumulated over a dataset (standard semantic mIoU)."""

    def __init__(self) -> None:
        self.inter: dict[int, float] = defaultdict(float)
        self.union: dict[int, float] = defaultdict(float)

    def add(self, pred: np.ndarray, gt: np.ndarray, classes: list[int] | np.ndarray) -> None:
        """``pred`` (class ids >= 0) and ``gt`` (class ids, -1 = ignore): maps of one image;
        ``classes``: the class ids scored (pixels of other ids count only in unions)."""
        pred, gt = np.asarray(pred, np.int64).ravel(), np.asarray(gt, np.int64).ravel()
        if pred.shape != gt.shape:
            raise ValueError(f"prediction {pred.shape} and ground truth {gt.shape} sizes differ")
        classes = sorted(set(int(c) for c in classes))
        k = len(classes)
        keep = gt >= 0
        lut = np.full(max(classes[-1], int(pred.max(initial=0)), int(gt.max(initial=0))) + 1, k, np.int64)
        lut[classes] = np.arange(k)  # class id -> local index; k = any other id
        self.add_confusion(confusion(lut[gt[keep]], lut[pred[keep]], k + 1), classes)

    def add_confusion(self, conf: np.ndarray, classes: list[int]) -> None:
        """Add ``conf[g, p]`` (pixel counts by local ground truth g and prediction p), whose
        indices 0..len(classes)-1 stand for ``classes`` and any further index for other ids."""
        k = len(classes)
        inter = np.diag(conf)[:k]
        union = conf.sum(0)[:k] + conf.sum(1)[:k] - inter
        for c, i, u in zip(classes, inter.tolist(), union.tolist()):
            self.inter[int(c)] += i
            self.union[int(c)] += u

    def ious(self) -> dict[int, float]:
        """IoU of each class that occurred (union > 0)."""
        return {c: self.inter[c] / self.union[c] for c in sorted(self.union) if self.union[c] > 0}

    def miou(self, exclude: tuple[int, ...] = ()) -> float:
        vals = [v for c, v in self.ious().items() if c not in exclude]
        return float(np.mean(vals)) if vals else float("nan")


def confusion(gt: np.ndarray, pred: np.ndarray, n: int) -> np.ndarray:
    """``conf[g, p]`` = number of pixels with local ground truth g and prediction p (0..n-1)."""
    return np.bincount(gt * n + pred, minlength=n * n).reshape(n, n)
