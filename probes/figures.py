"""Qualitative figures (the paper's Figures 16-18): predicted masks over images, keypoint
matches between image pairs, and the first three PCA components of a target's image tokens
as colour.

Why Pillow and numpy, not matplotlib: these are pictures of pixels, drawn per image by the
hundred for a report or a page; they need no axes, and drawing them this way is quick.
Every function takes the image (or None: a grey canvas of the mask's size) and returns an
RGB ``PIL.Image``.
"""

from __future__ import annotations

import io
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from kvpipe.probes.predictions import PALETTE

GREY = (128, 128, 128)
CORRECT, WRONG, TRUTH = (40, 200, 60), (230, 40, 40), (255, 255, 255)


def canvas(image: Image.Image | None, hw: tuple[int, int]) -> Image.Image:
    """The image as RGB at ``hw`` (height, width), or a grey canvas of that size."""
    h, w = int(hw[0]), int(hw[1])
    if image is None:
        return Image.new("RGB", (w, h), GREY)
    image = image.convert("RGB")
    return image if image.size == (w, h) else image.resize((w, h), Image.BILINEAR)


def label_colours(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels -> (H, W, 3) uint8 colours of the DAVIS palette."""
    pal = np.asarray(PALETTE, np.uint8).reshape(256, 3)
    return pal[np.asarray(labels, np.uint8)]


def mask_overlay(image: Image.Image | None, labels: np.ndarray, alpha: float = 0.55) -> Image.Image:
    """Labels > 0 blended over the image in their palette colours; background left as is."""
    base = np.asarray(canvas(image, labels.shape), np.float64)
    colour = label_colours(labels).astype(np.float64)
    fg = (np.asarray(labels) > 0)[..., None]
    out = np.where(fg, (1 - alpha) * base + alpha * colour, base)
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8), "RGB")


def side_by_side(left: Image.Image, right: Image.Image, gap: int = 8) -> tuple[Image.Image, int]:
    """Two images in a row, tops aligned, on white; and the right one's x offset."""
    h = max(left.height, right.height)
    out = Image.new("RGB", (left.width + gap + right.width, h), (255, 255, 255))
    out.paste(left, (0, 0))
    out.paste(right, (left.width + gap, 0))
    return out, left.width + gap


def matches_figure(source: Image.Image | None, target: Image.Image | None, source_hw: tuple[int, int],
                   target_hw: tuple[int, int], matches: Sequence[dict[str, Any]], radius: int = 3) -> Image.Image:
    """Source and target side by side; a line from each source keypoint to its predicted target
    pixel, green when correct and red when not; the ground-truth target keypoint as a white dot."""
    fig, dx = side_by_side(canvas(source, source_hw), canvas(target, target_hw))
    draw = ImageDraw.Draw(fig)
    for m in matches:
        colour = CORRECT if m["correct"] else WRONG
        sx, sy, px, py = m["source_x"], m["source_y"], m["pred_x"] + dx, m["pred_y"]
        draw.line([(sx, sy), (px, py)], fill=colour, width=2)
        for x, y, c in ((sx, sy, colour), (px, py, colour), (m["gt_x"] + dx, m["gt_y"], TRUTH)):
            draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=c, outline=(0, 0, 0))
    return fig


def pca_colours(grid: np.ndarray) -> np.ndarray:
    """(rows, cols, D) token features -> (rows, cols, 3) uint8: the first three principal
    components of the image's tokens (centred, by SVD), each scaled min-max to 0..255 over the
    image, as red, green and blue (a missing or constant component is 0); each component's sign
    makes its largest loading positive, as scikit-learn's ``svd_flip``."""
    rows, cols, dim = grid.shape
    x = grid.reshape(-1, dim).astype(np.float64)
    x = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    proj = x @ vt[:3].T
    out = np.zeros((len(x), 3))
    for c in range(proj.shape[1]):
        col = proj[:, c]
        if vt[c][np.argmax(np.abs(vt[c]))] < 0:  # SVD's sign is arbitrary: largest loading positive (svd_flip)
            col = -col
        span = col.max() - col.min()
        if span > 1e-12 * max(1.0, np.abs(col).max()):
            out[:, c] = (col - col.min()) / span * 255
    return np.rint(out).astype(np.uint8).reshape(rows, cols, 3)


def pca_figure(grid: np.ndarray, image: Image.Image | None, hw: tuple[int, int]) -> Image.Image:
    """The image and its tokens' PCA colours (one block per token, at the image's size) side by side."""
    colours = Image.fromarray(pca_colours(grid), "RGB").resize((int(hw[1]), int(hw[0])), Image.NEAREST)
    return side_by_side(canvas(image, hw), colours)[0]


def strip(images: Sequence[Image.Image], height: int = 120, gap: int = 4) -> Image.Image:
    """Images in one row, each scaled to ``height`` (video frames)."""
    scaled = [im.resize((max(1, round(im.width * height / im.height)), height), Image.BILINEAR) for im in images]
    out = Image.new("RGB", (sum(s.width for s in scaled) + gap * max(0, len(scaled) - 1), height), (255, 255, 255))
    x = 0
    for s in scaled:
        out.paste(s, (x, 0))
        x += s.width + gap
    return out


def png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()
