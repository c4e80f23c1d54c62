"""Tiny on-disk copies of dataset layouts, so adapters are tested against real file names.

Why expose the mask function: tests compare what an adapter reads with what was written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image


def davis_palette() -> list[int]:
    """The palette of DAVIS annotation PNGs (the PASCAL VOC bit-interleaved colour map)."""
    palette = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        palette += [r, g, b]
    return palette


def tiny_davis_mask(seq_index: int, t: int, size: tuple[int, int]) -> np.ndarray:
    """Objects 1 and 2 of a sequence at frame t: two boxes sliding in opposite directions."""
    width, height = size
    mask = np.zeros((height, width), np.uint8)
    bw, bh = width // 5, height // 4
    x1 = min(2 + 3 * t + seq_index, width - bw)
    x2 = max(width - bw - 2 - 3 * t, 0)
    mask[height // 8: height // 8 + bh, x1: x1 + bw] = 1
    mask[height // 2: height // 2 + bh, x2: x2 + bw] = 2
    return mask


def _davis_frame(mask: np.ndarray, seed: int) -> Image.Image:
    """An RGB frame whose objects have the mask's palette colours over a noisy background."""
    rng = np.random.default_rng(seed)
    colours = np.array(davis_palette(), np.uint8).reshape(256, 3)
    img = rng.integers(60, 120, (*mask.shape, 3), dtype=np.uint8)
    img[mask > 0] = colours[mask[mask > 0]]
    return Image.fromarray(img, "RGB")


def make_tiny_davis(root: Path, sequences: Sequence[str] = ("bear", "car-turn"), n_frames: int = 4,
                    size: tuple[int, int] = (96, 64), train_sequences: Sequence[str] | None = None) -> Path:
    """Write a DAVIS-2017 layout (size = width, height); val.txt lists every sequence, train.txt
    ``train_sequences`` (default: the first one), so split selection is testable."""
    root = Path(root)
    palette = davis_palette()
    for s, seq in enumerate(sequences):
        jpeg_dir = root / "JPEGImages" / "480p" / seq
        ann_dir = root / "Annotations" / "480p" / seq
        jpeg_dir.mkdir(parents=True, exist_ok=True)
        ann_dir.mkdir(parents=True, exist_ok=True)
        for t in range(n_frames):
            mask = tiny_davis_mask(s, t, size)
            _davis_frame(mask, seed=100 * s + t).save(jpeg_dir / f"{t:05d}.jpg", quality=95)
            png = Image.fromarray(mask, "P")
            png.putpalette(palette)
            png.save(ann_dir / f"{t:05d}.png")
    sets = root / "ImageSets" / "2017"
    sets.mkdir(parents=True, exist_ok=True)
    train = list(sequences[:1]) if train_sequences is None else list(train_sequences)
    (sets / "val.txt").write_text("".join(f"{s}\n" for s in sequences))
    (sets / "train.txt").write_text("".join(f"{s}\n" for s in train))
    return root


def make_image_folder(root: Path, n: int = 3, corrupt: int = 1) -> Path:
    """n decodable images (PNG, JPG, upper-case JPG) in nested folders, ``corrupt`` garbage
    files named like JPEGs, and a text file that must be ignored."""
    root = Path(root)
    rng = np.random.default_rng(0)
    places = ["img{i}.png", "sub/img{i}.jpg", "sub/deeper/IMG{i}.JPG"]
    for i in range(n):
        path = root / places[i % len(places)].format(i=i)
        path.parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (24 + 8 * i, 32, 3), dtype=np.uint8)
        Image.fromarray(pixels, "RGB").save(path)
    for i in range(corrupt):
        path = root / "broken" / f"corrupt{i}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"this is not a JPEG " * 8)
    (root / "notes.txt").write_text("not an image\n")
    return root
