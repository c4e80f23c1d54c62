"""Image tokens and store bytes of a model, from its processor's rules alone (no torch, no weights).

Why: at paper scale the store, not the GPU, is the wall, so ``kvpipe plan`` (and ``kvpipe
extract`` before it starts) must say the size before anything runs. Each family's token count
follows its real processor: Qwen2-VL / Qwen2.5-VL's ``smart_resize`` (28-px LM tokens, min and
max pixels), LLaVA-NeXT's any-res tiles (best pinpoint resolution, the crops grid unpadded back
to the image's aspect ratio, one newline per row) and LLaVA-OneVision's ``anyres_max_9`` shrink
of that grid; fixed-resolution models give side x side. The functions copy transformers'
arithmetic (``select_best_resolution``, ``unpad_image``, ``smart_resize``); a test checks them
against what the tiny presets' real extraction stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from kvpipe.errors import UsageError
from kvpipe.pipeline.models.catalog import MODELS


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's resize: both sides multiples of ``factor``, pixels within [min, max]."""
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def select_best_resolution(height: int, width: int, pinpoints: list) -> tuple[int, int]:
    """LLaVA's choice of tile layout: most effective pixels, then least waste."""
    best, best_eff, best_waste = None, 0, float("inf")
    for h, w in pinpoints:
        scale = min(w / width, h / height)
        eff = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (h, w), eff, waste
    return best


def unpadded_grid(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    """``unpad_image``: the crops grid cut back to the image's aspect ratio."""
    if width / height > cols / rows:
        new_h = int(round(height * (cols / width), 7))
        pad = (rows - new_h) // 2
        return rows - 2 * pad, cols
    new_w = int(round(width * (rows / height), 7))
    pad = (cols - new_w) // 2
    return rows, cols - 2 * pad


@dataclass(frozen=True)
class TokenRule:
    """A family's image-token count for an image of (width, height) pixels."""

    kind: str  # "qwen" | "anyres" | "fixed"
    params: dict[str, Any] = field(default_factory=dict)

    def tokens(self, width: int, height: int, views: str = "all") -> int:
        p = self.params
        if self.kind == "qwen":
            factor = p["patch"] * p["merge"]
            h, w = smart_resize(height, width, factor, p["min_pixels"], p["max_pixels"])
            return (h // factor) * (w // factor)
        side = p["tile"] // p["patch"]
        if self.kind == "fixed" or views == "base":
            return side * side
        th, tw = select_best_resolution(height, width, p["pinpoints"])
        rows, cols = unpadded_grid(height, width, th // p["tile"] * side, tw // p["tile"] * side)
        max_views = p.get("max_views")
        if max_views:  # LLaVA-OneVision: the grid is shrunk when it holds more than ~max_views base views
            ratio = math.sqrt(rows * cols / (max_views * side ** 2))
            if ratio > 1.1:
                rows, cols = int(rows // ratio), int(cols // ratio)
        return side * side + rows * (cols + 1)

    @property
    def multi_view(self) -> bool:
        return self.kind == "anyres"


@dataclass(frozen=True)
class ModelSize:
    """What a model stores per image token: layers x KV heads x head_dim (keys and values) and
    the post-projector width (layers and KV heads from the catalog entry)."""

    rule: TokenRule
    layers: int
    kv_heads: int
    head_dim: int
    hidden: int
    label: str = ""


_QWEN_7B = {"patch": 14, "merge": 2, "min_pixels": 3136, "max_pixels": 12845056}  # preprocessor_config.json
_QWEN_TINY = {"patch": 14, "merge": 2, "min_pixels": 4 * 28 ** 2, "max_pixels": 256 * 28 ** 2}
_OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
_NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]

def _size(name: str, rule: TokenRule, head_dim: int, hidden: int, label: str) -> tuple[str, ModelSize]:
    """A catalog model's size data: its layers and KV heads as the catalog states them."""
    entry = MODELS.get(name)
    return name, ModelSize(rule, entry.layers, entry.kv_heads, head_dim, hidden, label)


# --model name -> its size data (the catalog's names; tests/models/test_plan_sizes.py checks the
# tiny presets against a real extraction and the full-size ones against their config presets)
SIZES: dict[str, ModelSize] = dict([
    _size("qwen25vl", TokenRule("qwen", _QWEN_7B), 128, 3584, "Qwen2.5-VL-7B"),
    _size("qwen2vl", TokenRule("qwen", _QWEN_7B), 128, 3584, "Qwen2-VL-7B"),
    _size("tiny-qwen25vl", TokenRule("qwen", _QWEN_TINY), 16, 64, "tiny Qwen2.5-VL"),
    _size("llava-ov", TokenRule("anyres", {"tile": 384, "patch": 14, "pinpoints": _OV_PINPOINTS, "max_views": 9}),
          128, 3584, "LLaVA-OV-7B"),
    _size("llava-ov-0.5b", TokenRule("anyres", {"tile": 384, "patch": 14, "pinpoints": _OV_PINPOINTS,
                                                "max_views": 9}), 64, 896, "LLaVA-OV-0.5B"),
    _size("tiny-llava-ov", TokenRule("anyres", {"tile": 56, "patch": 14, "max_views": 9,
                                                "pinpoints": [[56, 56], [56, 112], [112, 56], [112, 112]]}),
          16, 64, "tiny LLaVA-OV"),
    _size("llava-next-llama3", TokenRule("anyres", {"tile": 336, "patch": 14, "pinpoints": _NEXT_PINPOINTS}),
          128, 4096, "LLaVA-NeXT-Llama3-8B"),
    _size("tiny-llava-next-llama3", TokenRule("anyres", {"tile": 56, "patch": 14, "pinpoints":
                                                         [[h // 6, w // 6] for h, w in _NEXT_PINPOINTS]}),
          16, 64, "tiny LLaVA-NeXT"),
    _size("llava15", TokenRule("fixed", {"tile": 336, "patch": 14}), 128, 4096, "LLaVA-1.5-7B"),
])

# Lossless bytes stored per raw byte by the default codec (Blosc zstd 1, byte shuffle), measured
# on 7B models' bf16 K/V (docs/BENCHMARKS.md, end-to-end table): LLaVA-OV-7B 85.2 -> 59.3 MB,
# Qwen2.5-VL-7B 14.7 -> 11.1 MB; int8 43.9 -> 41.4 MB. int4 codes of rotated vectors are close
# to uniform noise, so they are counted uncompressed (an upper bound). pca's one byte per code
# compresses to 0.38 byte on random-weight Qwen2.5-VL-7B's K/V at the default step, its basis per
# part of 16 images included (docs/BENCHMARKS.md, "pca"); LLaVA-OV-7B's and trained models'
# features have more structure, so this is an upper estimate.
CODEC_RATIO = {"bfloat16": 0.72, "float16": 0.72, "float32": 0.85, "int8": 0.94, "int4": 1.0, "pca": 0.38}
KV_KINDS = 2  # keys and values


def bytes_per_token(size: ModelSize, encoding: str, post_proj: bool = True) -> float:
    """Stored bytes of one image token (compressed by ``CODEC_RATIO``)."""
    import numpy as np

    from kvpipe.store.encoding import DISK_DTYPE, stored_dim

    item = np.dtype(DISK_DTYPE[encoding]).itemsize
    kv = KV_KINDS * size.layers * size.kv_heads * stored_dim(size.head_dim, encoding) * item
    pp = stored_dim(size.hidden, encoding) * item if post_proj else 0
    return (kv + pp) * CODEC_RATIO[encoding]


def model_size(name: str) -> ModelSize:
    if name not in SIZES:
        raise UsageError(f"--model {name}: kvpipe plan knows the token rules of {', '.join(SIZES)}; "
                         f"for another model extract a few images (--limit) and read kvpipe info")
    return SIZES[name]
