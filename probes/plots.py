"""Figures in the paper's style (matplotlib, Agg). Each function writes one PNG and returns its path.

* ``plot_layer_head``: Figure 2 (and 5-13) -- per-layer max over heads on top, with the
  post-projection baseline as a red dashed line; per-head heatmap (heads x layers) below.
* ``plot_panels``: Figure 2's side-by-side panels (averaged tasks), ``plot_table_bars``: a
  table's cells as kvpipe-vs-paper bars (``kvpipe paper``).
* ``plot_variance_histogram``: Figure 14 -- distribution of per-head L2 variance, threshold dashed.
* ``plot_variance_heatmap``: Figure 15 -- L2 variance per (layer, head), cells below the
  threshold hatched (input-agnostic keys).
* ``plot_key_pca``: Figure 4 -- image keys of two images on their first two principal
  components, coloured by image, input-agnostic heads highlighted; one small panel per head.
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


def plot_panels(panels: Sequence[tuple[np.ndarray, str, float | None]], metric: str, path: str | Path,
                title: str = "") -> Path:
    """Figure 2's layout: side by side, one column per panel (scores (layers, heads), title,
    post-proj baseline): per-layer max over heads on top, heads x layers heatmap below."""
    n = len(panels)
    if not n:
        fig, ax = plt.subplots(figsize=(5, 2))
        ax.axis("off")
        ax.text(0.5, 0.5, title or "no panels", ha="center", va="center")
        return _save(fig, path)
    fig, axes = plt.subplots(2, n, figsize=(max(5.0, 4.5 * n), 6.5), squeeze=False,
                             gridspec_kw={"height_ratios": [1, 1.6]})
    for k, (scores, name, baseline) in enumerate(panels):
        scores = np.asarray(scores, dtype=np.float64)
        top, bottom = axes[0, k], axes[1, k]
        top.plot(np.arange(scores.shape[0]), _nanmax_rows(scores), marker="o", ms=3, color="tab:blue",
                 label="max over heads")
        if baseline is not None and np.isfinite(baseline):
            top.axhline(baseline, color="red", ls="--", lw=1.2, label="post-projection")
        top.set_title(name, fontsize=10)
        top.set_ylabel(metric)
        top.grid(alpha=0.3)
        top.legend(fontsize=7, loc="best")
        im = _heatmap(bottom, scores.T)
        bottom.set_xlabel("layer")
        bottom.set_ylabel("head")
        fig.colorbar(im, ax=bottom, location="bottom", shrink=0.8, label=metric)
    if title:
        fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def plot_table_bars(labels: Sequence[str], ours: Sequence[float | None], paper: Sequence[float | None],
                    path: str | Path, title: str) -> Path:
    """One pair of bars per table cell: kvpipe's number and the paper's (a missing one drawn as no bar)."""
    n = len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * n + 2), 4.5))
    x = np.arange(n)
    as_array = lambda vs: np.array([np.nan if v is None else float(v) for v in vs], dtype=np.float64)  # noqa: E731
    ax.bar(x - 0.2, as_array(ours), 0.4, label="kvpipe", color="tab:blue")
    ax.bar(x + 0.2, as_array(paper), 0.4, label="paper", color="tab:grey")
    ax.set_xticks(x, list(labels), rotation=70, ha="right", fontsize=7)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
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


_IMAGE_COLOURS = ("tab:blue", "tab:orange")
_HEAD_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def plot_key_pca(joint: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
                 per_head: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]], agnostic: Sequence[int],
                 image_labels: Sequence[str], path: str | Path, title: str) -> Path:
    """Figure 4: left, every key token of every head of two images on the joint first two PCs.

    ``joint``: (coords (n, 2), explained ratio (2,), image index (n,) in {0, 1}, head (n,));
    ``per_head``: head -> (coords, ratio, image index) of that head's own PCA (small panels,
    at most 8). Input-agnostic heads (``agnostic``) are drawn opaque with black edges and named
    in red; the others faint. Colours are the two images.
    """
    coords, ratio, image, head = joint
    heads = list(per_head)
    n_small = min(len(heads), 8)
    cols = 2 if n_small > 1 else 1
    rows_small = -(-n_small // cols) if n_small else 1
    fig = plt.figure(figsize=(7 + 3 * cols, max(5.0, 2.6 * rows_small)))
    grid = fig.add_gridspec(rows_small, 1 + cols, width_ratios=[2.4] + [1] * cols)
    ax = fig.add_subplot(grid[:, 0])
    agn = set(agnostic)
    for k, h in enumerate(heads):
        sel_h = head == h
        marker = _HEAD_MARKERS[k % len(_HEAD_MARKERS)]
        for i in (0, 1):
            sel = sel_h & (image == i)
            if h in agn:
                ax.scatter(coords[sel, 0], coords[sel, 1], s=16, marker=marker, c=_IMAGE_COLOURS[i],
                           edgecolors="black", linewidths=0.4, alpha=0.9, zorder=3)
            else:
                ax.scatter(coords[sel, 0], coords[sel, 1], s=6, marker=marker, c=_IMAGE_COLOURS[i],
                           alpha=0.25, linewidths=0, zorder=2)
    handles = [ax.scatter([], [], c=_IMAGE_COLOURS[i], s=20, label=str(image_labels[i])) for i in (0, 1)]
    handles += [ax.scatter([], [], marker=_HEAD_MARKERS[k % len(_HEAD_MARKERS)], c="grey", s=20,
                           edgecolors="black" if h in agn else "none",
                           label=f"head {h}" + (" (input-agnostic)" if h in agn else ""))
                for k, h in enumerate(heads)]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_xlabel(f"PC 1 ({100 * ratio[0]:.1f}% of variance)")
    ax.set_ylabel(f"PC 2 ({100 * ratio[1]:.1f}% of variance)" if len(ratio) > 1 else "PC 2")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    for k, h in enumerate(heads[:n_small]):
        sub = fig.add_subplot(grid[k // cols, 1 + k % cols])
        c, r, img = per_head[h]
        for i in (0, 1):
            sel = img == i
            sub.scatter(c[sel, 0], c[sel, 1], s=4, c=_IMAGE_COLOURS[i], alpha=0.6, linewidths=0)
        sub.set_title(f"head {h}" + (" (input-agnostic)" if h in agn else ""), fontsize=8,
                      color="red" if h in agn else "black")
        sub.tick_params(labelsize=6)
        if h in agn:
            for side in sub.spines.values():
                side.set_edgecolor("red")
                side.set_linewidth(1.5)
    fig.tight_layout()
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
