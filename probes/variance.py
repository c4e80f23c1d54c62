"""L2 variance of image keys across images, and the threshold that splits it (paper, A.6.1).

The paper measures, per (layer, head), how much the image keys change across 1000 COCO images;
the per-head variances form a bimodal distribution (modes near 200 and 600) and the threshold is
"the lowest point between these two modes" (450 there). Keys below it are input-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy import stats

_IMAGE_BLOCK = 64  # images per block when accumulating squared deviations
MIN_PEAK_RATIO = 0.05  # the smaller mode must reach 5% of the larger one ...
MAX_VALLEY_RATIO = 0.9  # ... and the valley must dip below 90% of the smaller mode


@dataclass(frozen=True)
class Threshold:
    """A split of the variance distribution; ``method`` is "valley" (bimodal) or "otsu" (fallback)."""

    value: float
    method: str


def l2_variance(keys: np.ndarray) -> float:
    """Mean over token positions p of E_i ||k_ip - mean_i k_ip||^2, for keys (n_images, n_tokens, D).

    Used when every image has the same token layout (same resolution/grid), so position p means
    the same place in every image: this is the paper's per-key variance across images, averaged
    over the image's key tokens. Population variance (divides by n_images), float64 accumulation.
    """
    keys = np.asarray(keys)
    if keys.ndim != 3 or keys.shape[0] < 2:
        raise ValueError(f"keys must be (n_images >= 2, n_tokens, D); got {keys.shape}")
    mean = keys.mean(axis=0, dtype=np.float64)  # (n_tokens, D)
    total = 0.0
    for start in range(0, keys.shape[0], _IMAGE_BLOCK):
        dev = keys[start:start + _IMAGE_BLOCK].astype(np.float64) - mean
        total += float(np.einsum("ipd,ipd->", dev, dev))
    return total / (keys.shape[0] * keys.shape[1])


def l2_variance_pooled(per_image: Sequence[np.ndarray]) -> float:
    """E ||k - mean k||^2 over all key tokens of all images, for (n_i, D) arrays of differing n_i.

    Used when images have different token counts (dynamic resolution), where token positions do
    not line up across images. It also counts variation between positions within an image, so
    it is larger than ``l2_variance`` on the same data: compare heads only within one estimator.
    """
    if len(per_image) < 2:
        raise ValueError("l2_variance_pooled needs at least 2 images")
    n = sum(int(x.shape[0]) for x in per_image)
    mean = sum(np.asarray(x).sum(axis=0, dtype=np.float64) for x in per_image) / n
    total = 0.0
    for x in per_image:
        dev = np.asarray(x, dtype=np.float64) - mean
        total += float(np.einsum("nd,nd->", dev, dev))
    return total / n


def l2_variance_torch(keys: np.ndarray, device: str, budget: int = 2**30) -> float:
    """``l2_variance`` in torch on ``device``, float64 like the reference, images in blocks of
    about ``budget`` bytes."""
    keys = np.asarray(keys)
    if keys.ndim != 3 or keys.shape[0] < 2:
        raise ValueError(f"keys must be (n_images >= 2, n_tokens, D); got {keys.shape}")
    return _squared_deviations(keys, device, budget) / (keys.shape[0] * keys.shape[1])


def l2_variance_pooled_torch(per_image: Sequence[np.ndarray], device: str, budget: int = 2**30) -> float:
    """``l2_variance_pooled`` in torch on ``device``, float64."""
    if len(per_image) < 2:
        raise ValueError("l2_variance_pooled needs at least 2 images")
    tokens = np.concatenate([np.asarray(a) for a in per_image])
    return _squared_deviations(tokens, device, budget) / tokens.shape[0]


def _squared_deviations(x: np.ndarray, device: str, budget: int) -> float:
    """sum ||x_i - mean_i x_i||^2 over the first axis (and every other but the last), float64."""
    import torch

    per = max(1, budget // max(1, 8 * 2 * x[0].size))
    blocks = [torch.from_numpy(np.ascontiguousarray(x[i:i + per])) for i in range(0, x.shape[0], per)]
    mean = sum(b.to(device, torch.float64).sum(dim=0) for b in blocks) / x.shape[0]
    return float(sum(((b.to(device, torch.float64) - mean) ** 2).sum() for b in blocks))


def bimodal_threshold(values: np.ndarray, bins: int | None = None) -> Threshold:
    """The valley between the two highest modes of a Gaussian KDE of ``values``, else Otsu.

    Density: ``scipy.stats.gaussian_kde`` (Scott's bandwidth) on ``bins`` grid points (default
    512) spanning the data plus 3 bandwidths. Bimodal means two local maxima, the smaller at least
    ``MIN_PEAK_RATIO`` of the larger, with a dip below ``MAX_VALLEY_RATIO`` of the smaller between
    them; the threshold is the density's argmin between them (method "valley"). Otherwise the
    threshold is Otsu's on a ``bins``-bin histogram (default 256) (method "otsu"). NaNs are ignored.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        raise ValueError("bimodal_threshold needs at least one finite value")
    valley = _kde_valley(v, bins or 512)
    if valley is not None:
        return Threshold(valley, "valley")
    return Threshold(otsu_threshold(v, bins or 256), "otsu")


def _kde_valley(v: np.ndarray, n_grid: int) -> float | None:
    if v.size < 3 or np.ptp(v) == 0:
        return None
    try:
        kde = stats.gaussian_kde(v)
    except np.linalg.LinAlgError:
        return None
    bw = float(np.sqrt(kde.covariance[0, 0]))
    grid = np.linspace(v.min() - 3 * bw, v.max() + 3 * bw, n_grid)
    dens = kde(grid)
    peaks = np.flatnonzero((dens[1:-1] > dens[:-2]) & (dens[1:-1] >= dens[2:])) + 1
    if peaks.size < 2:
        return None
    a, b = np.sort(peaks[np.argsort(dens[peaks])[-2:]])
    low = np.argmin(dens[a:b + 1]) + a
    minor = min(dens[a], dens[b])
    if minor < MIN_PEAK_RATIO * max(dens[a], dens[b]) or dens[low] > MAX_VALLEY_RATIO * minor:
        return None
    return float(grid[low])


def otsu_threshold(v: np.ndarray, nbins: int = 256) -> float:
    """Otsu's threshold, as skimage.filters ``threshold_otsu`` (histogram form).

    skimage returns the centre of the last bin of the lower class; this returns that bin's upper
    edge instead, so ``value < threshold`` selects exactly the lower class.
    """
    v = np.asarray(v, dtype=np.float64).ravel()
    if np.ptp(v) == 0:
        return float(v[0])
    counts, edges = np.histogram(v, bins=nbins)
    centers = (edges[:-1] + edges[1:]) / 2
    w1 = np.cumsum(counts)
    w2 = np.cumsum(counts[::-1])[::-1]
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.cumsum(counts * centers) / w1
        m2 = (np.cumsum((counts * centers)[::-1]) / w2[::-1])[::-1]
    between = w1[:-1] * w2[1:] * (m1[:-1] - m2[1:]) ** 2
    idx = int(np.nanargmax(between))
    return float(edges[idx + 1])
