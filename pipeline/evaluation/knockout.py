"""Attention knock-out: text queries blocked from the image keys of chosen (layer, KV head) pairs.

Why: the paper's intervention (its Section 3.2 and Appendix A.6.2, after Geva et al. 2023,
"Dissecting Recall of Factual Associations in Auto-Regressive Language Models") asks what the
model answers when its text tokens can no longer read what some image keys point to. For each
chosen (layer, kv_head), every query head that shares that KV head (GQA: query head h with
``h // (n_q / n_kv) == kv_head``) gets its attention from text-token queries to image-token keys
removed (the score set to -inf before the softmax, so the remaining weights renormalise). Text
keys of those heads, image queries, and every other head and layer are untouched.

How: each patched attention module sees a view of its config whose ``_attn_implementation``
names a kvpipe attention function (transformers' ``AttentionInterface``). That function first
calls the model's own attention function on all heads, exactly as the stock code would, and then
recomputes only the chosen heads, only at real (non-padding) text-query rows, with the image keys
masked out. Layers without chosen heads keep the shared config and run the stock code, so an
empty head set is the unmodified model bit for bit. It works during generation with a dynamic
KV cache (transformers' default): generated tokens are text queries, and the image keys keep the
positions they had in the prompt.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.base import ModelAdapter

ATTN_NAME = "kvpipe_knockout"
HeadSet = frozenset[tuple[int, int]]  # (layer, kv_head)


def query_heads(kv_head: int, n_heads: int, n_kv_heads: int) -> list[int]:
    """The query heads that read ``kv_head`` (transformers' ``repeat_kv`` order)."""
    group = n_heads // n_kv_heads
    return list(range(kv_head * group, (kv_head + 1) * group))


class _ConfigView:
    """The attention module's config, except for the attention implementation it dispatches to."""

    _attn_implementation = ATTN_NAME

    def __init__(self, base: Any):
        object.__setattr__(self, "_base", base)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_base"), name)


@dataclass
class _LayerState:
    owner: "Knockout"
    layer: int
    heads: torch.Tensor  # query-head indices to knock out, on the module's device
    stock: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    base_config: Any


class Knockout:
    """Patch an adapter's attention so that text queries skip the image keys of ``heads``.

    Use as a context manager; set ``image_mask`` ([batch, prompt_len] bool, True at image tokens
    of the padded prompt) before each forward pass or ``generate`` call on a new batch.
    """

    def __init__(self, adapter: ModelAdapter, heads: Iterable[tuple[int, int]],
                 image_mask: torch.Tensor | None = None):
        self.adapter = adapter
        self.heads: HeadSet = frozenset((int(l), int(h)) for l, h in heads)
        self.image_mask = image_mask
        n_layers, n_kv = adapter.n_layers, adapter.n_kv_heads
        bad = sorted(p for p in self.heads if not (0 <= p[0] < n_layers and 0 <= p[1] < n_kv))
        if bad:
            raise UsageError(f"knock-out heads {bad[:5]} are outside the model ({n_layers} layers, "
                             f"{n_kv} KV heads); was the head set made from a store of another model?")
        self._patched: list[tuple[torch.nn.Module, Any]] = []

    def by_layer(self) -> dict[int, list[int]]:
        """Query heads knocked out per layer."""
        n_q = int(self.adapter.text_config.num_attention_heads)
        out: dict[int, list[int]] = {}
        for layer, kv in sorted(self.heads):
            out.setdefault(layer, []).extend(query_heads(kv, n_q, self.adapter.n_kv_heads))
        return out

    def __enter__(self) -> "Knockout":
        modules = self.adapter.attention_modules()
        try:
            for layer, q_heads in self.by_layer().items():
                module = modules[layer]
                if getattr(module, "_kvpipe_knockout", None) is not None:
                    raise ModelError("attention knock-out is already active on this model")
                base = module.config
                stock = ALL_ATTENTION_FUNCTIONS.get_interface(base._attn_implementation, _eager_of(module))
                device = next(module.parameters()).device
                module._kvpipe_knockout = _LayerState(self, layer, torch.tensor(q_heads, device=device),
                                                      stock, base)
                module.config = _ConfigView(base)
                self._patched.append((module, base))
        except BaseException:
            self._restore()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for module, base in self._patched:
            module.config = base
            module._kvpipe_knockout = None
        self._patched = []


@contextmanager
def knockout(adapter: ModelAdapter, heads: Iterable[tuple[int, int]],
             image_mask: torch.Tensor | None = None) -> Iterator[Knockout]:
    """``with knockout(adapter, {(layer, kv_head), ...}, input_ids == image_token_id): ...``"""
    with Knockout(adapter, heads, image_mask) as ko:
        yield ko


def _eager_of(module: torch.nn.Module) -> Callable[..., Any]:
    """The family's own eager attention (transformers' default when no other is registered)."""
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise ModelError(f"{type(module).__name__} has no eager_attention_forward; knock-out cannot patch it")
    return fn


def _knockout_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """Stock attention for all heads, then the chosen heads recomputed at text-query rows."""
    state: _LayerState | None = getattr(module, "_kvpipe_knockout", None)
    if state is None:  # only patched modules dispatch here, and only inside the context
        raise ModelError("knock-out attention called outside its context")
    out, weights = state.stock(module, query, key, value, attention_mask, **kwargs)
    image_mask = state.owner.image_mask
    if image_mask is None:
        raise ModelError("knock-out needs the batch's image_mask (input_ids == image token id) before the forward pass")
    b, n_q, q_len, _ = query.shape
    kv_len = key.shape[2]
    allowed, q_pos = _base_allowed(attention_mask, b, q_len, kv_len, query.device)
    prompt_len = image_mask.shape[1]
    if image_mask.shape[0] != b:
        raise ModelError(f"knock-out image_mask has {image_mask.shape[0]} rows but the batch has {b}")
    image_key = torch.zeros(b, kv_len, dtype=torch.bool, device=query.device)
    n = min(prompt_len, kv_len)
    image_key[:, :n] = image_mask[:, :n].to(query.device)
    text_query = ~image_key.gather(1, q_pos.expand(b, q_len))  # [b, q]; generated tokens are text
    blocked = text_query[:, None, :, None] & image_key[:, None, None, :]  # [b, 1, q, kv]
    keep = allowed & ~blocked
    heads = state.heads
    group = n_q // key.shape[1]
    q_sel = query.index_select(1, heads)
    k_sel = key.index_select(1, heads // group)
    v_sel = value.index_select(1, heads // group)
    scaling = kwargs.get("scaling")
    scaling = getattr(module, "scaling", None) if scaling is None else scaling
    if attention_mask is not None and attention_mask.dtype != torch.bool:  # additive float mask: keep its values
        bias = _expand_mask(attention_mask, b, q_len, kv_len).to(query.dtype)
        bias = bias.masked_fill(~keep, torch.finfo(query.dtype).min)
    else:
        bias = torch.zeros(keep.shape, dtype=query.dtype, device=query.device).masked_fill(~keep, float("-inf"))
    probs = None
    if weights is None:
        knocked = torch.nn.functional.scaled_dot_product_attention(q_sel, k_sel, v_sel, attn_mask=bias,
                                                                   scale=scaling)
    else:  # the caller asked for attention weights (eager): compute them for the chosen heads too
        scores = torch.matmul(q_sel, k_sel.transpose(2, 3)) * scaling + bias
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        knocked = torch.matmul(probs, v_sel)
    # Only real text-query rows change: padding rows (nothing to attend to) and image queries stay stock.
    use = (allowed.any(-1)[:, 0] & text_query)[:, :, None, None]  # [b, q, 1, 1]
    out = out.clone()
    out[:, :, heads] = torch.where(use, knocked.transpose(1, 2), out[:, :, heads])
    if probs is not None:
        weights = weights.clone()
        weights[:, heads] = torch.where(use.transpose(1, 2), probs, weights[:, heads])
    return out, weights


def _expand_mask(mask: torch.Tensor, b: int, q_len: int, kv_len: int) -> torch.Tensor:
    return mask[:, :, -q_len:, :kv_len].expand(b, 1, q_len, kv_len)


def _base_allowed(mask: torch.Tensor | None, b: int, q_len: int, kv_len: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Which keys each query may see in the stock model ([b, 1, q, kv] bool) and the queries'
    sequence positions ([1, q]), whatever form of mask the model's attention received."""
    keys = torch.arange(kv_len, device=device)
    if mask is None or mask.dim() == 2:
        if mask is None and q_len > 1 and kv_len > q_len:
            q_pos = torch.arange(q_len, device=device)  # sdpa's upper-left causal alignment
        else:
            q_pos = torch.arange(kv_len - q_len, kv_len, device=device)
        allowed = (keys[None, :] <= q_pos[:, None])[None, None].expand(b, 1, q_len, kv_len)
        if mask is not None:  # flash attention: a [b, kv] padding mask
            allowed = allowed & mask[:, None, None, :kv_len].bool()
        return allowed, q_pos[None]
    if mask.dim() != 4:
        raise ModelError(f"knock-out does not understand an attention mask of shape {tuple(mask.shape)}")
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[None]
    m = _expand_mask(mask, b, q_len, kv_len)
    if m.dtype == torch.bool:
        return m, q_pos
    return m > torch.finfo(m.dtype).min / 2, q_pos


AttentionInterface.register(ATTN_NAME, _knockout_attention)
