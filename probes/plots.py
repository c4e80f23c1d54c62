"""Figures in the paper's style (matplotlib, Agg). Each function writes one PNG and returns its path.

* ``plot_layer_head``: Figure 2 (and 5-13) -- per-layer max over heads on top, with the
  post-projection baseline as a red dashed line; per-head heatmap (heads x layers) below.
* ``plot_variance_histogram``: Figure 14 -- distribution of per-head L2 variance, threshold dashed.
* ``plot_variance_heatmap``: Figure 15 -- L2 variance per (layer, head), cells below the
  threshold hatched (input-agnostic keys).
NaN cells (heads not swept or not scored) are drawn light grey and left out of the maxima.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.collections import PatchCollection  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

_NAN_COLOR = "#dddddd"


def plot_layer_head(scores: np.ndarray, title: str, metric: str, path: str | Path,
                    baseline: float | None = None, *, layers: Sequence[int] | None = None,
                    heads: Sequence[int] | None = None) -> Path:
    """Figure 2: top, max over heads per layer (x = layer) + baseline; bottom, heads x layers heatmap.

    ``scores``: (n_layers, n_heads); ``layers``/``heads`` label the rows/columns (default 0..n-1).
    """
    scores = np.asarray(scores, dtype=np.float64)
    n_layers, n_heads = scores.shape
    layers = list(layers) if layers is not None else list(range(n_layers))
    heads = list(heads) if heads is not None else list(range(n_heads))
    x = np.arange(n_layers)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.3 * n_layers + 3), 7),
                                      gridspec_kw={"height_ratios": [1, 1.6]}, sharex=True)
    top.plot(x, _nanmax_rows(scores), marker="o", ms=3, color="tab:blue", label="max over heads")
    if baseline is not None and np.isfinite(baseline):
        top.axhline(baseline, color="red", ls="--", lw=1.2, label="post-projection")
    top.set_ylabel(metric)
    top.set_title(title, fontsize=10)
    top.legend(fontsize=8, loc="best")
    top.grid(alpha=0.3)
    im = _heatmap(bottom, scores.T)
    bottom.set_yticks(_ticks(n_heads), [str(heads[i]) for i in _ticks(n_heads)])
    bottom.set_xticks(_ticks(n_layers), [str(layers[i]) for i in _ticks(n_layers)])
    bottom.set_xlabel("layer")
    bottom.set_ylabel("head")
    fig.colorbar(im, ax=[top, bottom], location="right", shrink=0.6, label=metric)
    return _save(fig, path)


def plot_variance_histogram(values: np.ndarray, threshold: float | None, path: str | Path, title: str) -> Path:
    """Figure 14: histogram of per-(layer, head) L2 variance, dashed vertical line at the threshold."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    fig, ax = plt.subplots(figsize=(6, 4))
    if v.size:
        ax.hist(v, bins=int(np.clip(np.sqrt(v.size) * 2, 10, 60)), color="tab:blue", alpha=0.8)
    if threshold is not None and np.isfinite(threshold):
        ax.axvline(threshold, color="black", ls="--", lw=1.2, label=f"threshold = {threshold:.4g}")
        ax.legend(fontsize=8)
    ax.set_xlabel("L2 variance of image keys across images")
    ax.set_ylabel("number of (layer, head)")
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def plot_variance_heatmap(matrix: np.ndarray, threshold: float | None, path: str | Path, title: str, *,
                          layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> Path:
    """Figure 15: L2 variance per head (y) and layer (x); cells below ``threshold`` hatched."""
    m = np.asarray(matrix, dtype=np.float64)
    n_layers, n_heads = m.shape
    layers = list(layers) if layers is not None else list(range(n_layers))
    heads = list(heads) if heads is not None else list(range(n_heads))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * n_layers + 3), max(3.0, 0.25 * n_heads + 2)))
    im = _heatmap(ax, m.T, cmap="magma")
    if threshold is not None and np.isfinite(threshold):
        with np.errstate(invalid="ignore"):
            li, hi = np.nonzero(m < threshold)
        boxes = [Rectangle((l - 0.5, h - 0.5), 1, 1) for l, h in zip(li, hi)]
        ax.add_collection(PatchCollection(boxes, facecolor="none", edgecolor="cyan", hatch="///", lw=0.0))
        ax.plot([], [], ls="none", marker="s", mfc="none", mec="cyan",
                label=f"input-agnostic (< {threshold:.4g})")
        ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 1.15))
    ax.set_xticks(_ticks(n_layers), [str(layers[i]) for i in _ticks(n_layers)])
    ax.set_yticks(_ticks(n_heads), [str(heads[i]) for i in _ticks(n_heads)])
    ax.set_xlabel("layer")
    ax.set_ylabel("head")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label="L2 variance")
    return _save(fig, path)


def _heatmap(ax, data: np.ndarray, cmap: str = "viridis"):
    """imshow with NaN cells in light grey (a colormap with a 'bad' colour)."""
    cm = plt.get_cmap(cmap).with_extremes(bad=_NAN_COLOR)
    return ax.imshow(np.ma.masked_invalid(data), aspect="auto", origin="lower", cmap=cm,
                     interpolation="nearest")


def _nanmax_rows(a: np.ndarray) -> np.ndarray:
    """Max over heads per layer, NaN where a layer has no finite score (no warning)."""
    finite = np.isfinite(a)
    out = np.where(finite, a, -np.inf).max(axis=1, initial=-np.inf)
    return np.where(finite.any(axis=1), out, np.nan)


def _ticks(n: int, most: int = 32) -> list[int]:
    return list(range(0, n, max(1, int(np.ceil(n / most)))))


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path
