"""Variable-length vision attention as a few batched SDPA calls (Qwen2-VL / Qwen2.5-VL towers).

Why: without flash-attn, transformers runs the Qwen vision towers' block-diagonal attention
as one SDPA call per window per image (a Python loop of ``len(cu_seqlens) - 1`` calls in each
of 32 blocks). Windows and images of equal size are contiguous runs in the packed sequence, so
each run is a plain reshape to ``[n, heads, length, dim]`` and one SDPA call: the same
arithmetic per segment, a handful of kernel launches instead of thousands.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

Runs = list[tuple[int, int, int]]  # (start, segment length, number of segments)


class _RunCache:
    """Remembers the runs of the cu_seqlens tensors of the current forward (one host sync each)."""

    def __init__(self) -> None:
        self.entries: dict[int, tuple[torch.Tensor, Runs]] = {}

    def runs(self, cu_seqlens: torch.Tensor) -> Runs:
        hit = self.entries.get(id(cu_seqlens))
        if hit is not None and hit[0] is cu_seqlens:
            return hit[1]
        runs = segment_runs(cu_seqlens.tolist())
        if len(self.entries) >= 4:
            self.entries.clear()
        self.entries[id(cu_seqlens)] = (cu_seqlens, runs)  # holding the tensor keeps its id unique
        return runs


def segment_runs(cu: list[int]) -> Runs:
    """Group consecutive equal-length segments: [0, 4, 8, 10] -> [(0, 4, 2), (8, 2, 1)]."""
    runs: Runs = []
    for a, b in zip(cu[:-1], cu[1:]):
        length = b - a
        if length == 0:
            continue
        if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][1] * runs[-1][2] == a:
            start, _, n = runs[-1]
            runs[-1] = (start, length, n + 1)
        else:
            runs.append((a, length, 1))
    return runs


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, runs: Runs, scale: float) -> torch.Tensor:
    """Block-diagonal attention. q, k, v: [seq, heads, dim] -> [seq, heads * dim]."""
    seq, heads, dim = q.shape
    outs = []
    for start, length, n in runs:
        span = slice(start, start + length * n)

        def seg(x: torch.Tensor) -> torch.Tensor:
            return x[span].reshape(n, length, heads, dim).transpose(1, 2)  # [n, heads, length, dim]

        o = F.scaled_dot_product_attention(seg(q), seg(k), seg(v), scale=scale)
        outs.append(o.transpose(1, 2).reshape(n * length, heads * dim))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


def _forward(self: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
             position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **_: Any) -> torch.Tensor:
    seq = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = self._kvpipe_rotary(q, k, cos, sin)
    out = varlen_attention(q, k, v, self._kvpipe_runs.runs(cu_seqlens), self.scaling)
    return self.proj(out)


def patch_vision_attention(model: torch.nn.Module) -> int:
    """Replace the forward of every Qwen vision attention module; returns how many were patched."""
    cache = _RunCache()
    patched = 0
    for module in model.modules():
        name = type(module).__name__
        if name not in ("VisionAttention", "Qwen2_5_VLVisionAttention"):
            continue
        rotary = getattr(sys.modules[type(module).__module__], "apply_rotary_pos_emb_vision", None)
        if rotary is None:
            continue
        module._kvpipe_rotary = rotary
        module._kvpipe_runs = cache
        module.forward = _forward.__get__(module)
        patched += 1
    return patched
