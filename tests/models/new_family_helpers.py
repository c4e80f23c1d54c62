"""Helpers shared by the new-family tests (a module of its own: test modules are not imported)."""

from __future__ import annotations

import numpy as np
from PIL import Image


def noise_image(w: int, h: int, seed: int) -> Image.Image:
    """A w x h RGB image of uniform noise: every pixel informative, reproducible by seed."""
    pixels = np.random.default_rng(seed).random((h, w, 3)) * 255
    return Image.fromarray(pixels.astype("uint8"))
