"""Fused elementwise kernels for the language model's decoder layers (Qwen2 / Llama families).

Why: a 7B prefill of 8 LLaVA-OV images is 12k tokens, and eager PyTorch runs each RMSNorm
as six kernels over float32 copies of the activations, the MLP's ``silu(gate) * up`` as two
kernels over [tokens, 18944] tensors and rotary embedding as seven, each streaming the whole
tensor through GPU memory: together about a fifth of the prefill. Compiled by torch.compile
(Inductor, Triton on CUDA), each becomes one kernel doing the same arithmetic: float32 where
the model computes in float32, and the result rounded to the model's dtype at the same points
as eager (``emulate_precision_casts``), so the stored K/V differ from the stock forward only
where a float32 sum is taken in another order.

Only on CUDA with Triton importable. If compiling fails (no Triton, no C compiler for its
launcher), the functions fall back to their eager form with one warning.
"""

from __future__ import annotations

import importlib.util
import inspect
import logging
import sys
from typing import Any, Callable

import torch
import torch.nn.functional as F

log = logging.getLogger("kvpipe")


def rms_norm(hidden: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Qwen2RMSNorm / LlamaRMSNorm: normalised in float32, rounded, then scaled in the model dtype."""
    dtype = hidden.dtype
    h = hidden.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The gated MLP's activation: ``silu(gate_proj(x)) * up_proj(x)``."""
    return F.silu(gate) * up


class Fused:
    """``fn`` compiled on first use; ``fn`` itself for good if compiling fails."""

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self.compiled: Callable[..., Any] | None = None

    def __call__(self, *args: Any) -> Any:
        if self.compiled is None:
            # One compile for every batch: all sizes but the last (batch, heads, tokens) are
            # symbolic, the last (hidden, head_dim) a constant, which keeps the kernels' index
            # arithmetic simple (everything symbolic made rotary 4x slower on an H100).
            for t in args:
                if isinstance(t, torch.Tensor):
                    for dim in range(t.ndim - 1):
                        torch._dynamo.maybe_mark_dynamic(t, dim)
            self.compiled = torch.compile(self.fn, fullgraph=True, options={"emulate_precision_casts": True})
            try:
                return self.compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: run eager instead
                log.warning("kvpipe: fused %s kernel unavailable (%s); using eager PyTorch",
                            self.fn.__name__, str(err).splitlines()[0][:200])
                self.compiled = self.fn
                return self.fn(*args)
        return self.compiled(*args)


FUSED = {f.__name__: Fused(f) for f in (rms_norm, silu_mul)}


def available(device: torch.device) -> bool:
    return device.type == "cuda" and importlib.util.find_spec("triton") is not None


def _norm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    return FUSED["rms_norm"](hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    return self.down_proj(FUSED["silu_mul"](self.gate_proj(x), self.up_proj(x)))


def _rotary_dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    """The model's own ``apply_rotary_pos_emb``, compiled, for CUDA tensors; as it is otherwise."""
    fused = Fused(original)

    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        return (fused if q.is_cuda else original)(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb._kvpipe_original = original
    return apply_rotary_pos_emb


def _calls(method: Callable[..., Any], name: str) -> bool:
    """Whether ``method`` (under its decorators) refers to the global ``name``."""
    code = getattr(inspect.unwrap(method), "__code__", None)
    return code is not None and name in code.co_names


def _is_rms_norm(m: torch.nn.Module) -> bool:
    return type(m).__name__.endswith("RMSNorm") and hasattr(m, "variance_epsilon") and hasattr(m, "weight")


def _is_silu_mlp(m: torch.nn.Module) -> bool:
    return (all(hasattr(m, p) for p in ("gate_proj", "up_proj", "down_proj"))
            and type(getattr(m, "act_fn", None)).__name__ == "SiLUActivation")


def fuse_decoder_kernels(language_model: torch.nn.Module, device: torch.device) -> list[str]:
    """Route the decoder's RMSNorms, SiLU MLPs and rotary embedding through the fused kernels.

    Rotary is a module-level function of the model's modeling file, replaced there by a
    dispatcher that sends CUDA tensors to that same function compiled and anything else to
    the original. Returns what was changed (nothing off CUDA or without Triton).
    """
    if not available(device):
        return []
    norms = mlps = 0
    rotary_in: set[str] = set()
    for m in language_model.modules():
        if _is_rms_norm(m):
            m.forward = _norm_forward.__get__(m)
            norms += 1
        elif _is_silu_mlp(m):
            m.forward = _mlp_forward.__get__(m)
            mlps += 1
        elif hasattr(m, "q_proj") and _calls(type(m).forward, "apply_rotary_pos_emb"):
            module = sys.modules[type(m).__module__]
            fn = getattr(module, "apply_rotary_pos_emb", None)
            if fn is not None and not hasattr(fn, "_kvpipe_original"):
                module.apply_rotary_pos_emb = _rotary_dispatch(fn)
            if fn is not None:
                rotary_in.add(module.__name__.rsplit(".", 1)[-1])
    changed = []
    if norms:
        changed.append(f"RMSNorm: {norms} modules as one fused kernel each")
    if mlps:
        changed.append(f"MLP activation: {mlps} modules with silu(gate) * up fused")
    if rotary_in:
        changed.append(f"rotary embedding fused ({', '.join(sorted(rotary_in))})")
    return changed
