"""Capture image K/V (and post-projector features) during one forward pass.

Why the cache: the keys a text query attends to are the cached, post-RoPE keys, so kvpipe
reads them from the model's own ``DynamicCache`` (bit-identical by construction) and slices
the image positions on the model's device. Pre-RoPE keys come from a forward hook on
``k_proj``; the post-projector features are the LM's ``inputs_embeds`` at image positions,
read by a pre-hook on the language model. Hook code lives here and nowhere else.
A vision encoder (no cache, no text) returns its blocks' outputs itself (``gather_hidden``).
"""

from __future__ import annotations

import functools
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator

import numpy as np
import torch

from kvpipe.pipeline.models.selection import Selection
from kvpipe.store.device_decode import rotation_signs_on
from kvpipe.store.quant import INT4_LEVELS, ROTATION_SEED, hadamard_block, int4_stored_dim
from kvpipe.store.schema import HIDDEN, POST_PROJ

if TYPE_CHECKING:  # the adapter calls into this module; annotations only
    from kvpipe.pipeline.models.base import Batch, ModelAdapter


@contextmanager
def _hooks(adapter: ModelAdapter, sel: Selection) -> Iterator[dict[str, Any]]:
    seen: dict[str, Any] = {"k_proj": {}}
    handles = []
    if POST_PROJ in sel.kinds:
        def grab_embeds(_mod, args, kwargs):
            seen[POST_PROJ] = kwargs.get("inputs_embeds")
        handles.append(adapter.language_model().register_forward_pre_hook(grab_embeds, with_kwargs=True))
    if "keys" in sel.kinds and sel.keys_rope == "pre-rope":
        layers = adapter.decoder_layers()
        for li in sel.layers:
            def grab_k(_mod, _inp, out, li=li):
                seen["k_proj"][li] = out
            handles.append(layers[li].self_attn.k_proj.register_forward_hook(grab_k))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()


def inputs_to_device(inputs: dict[str, Any], device: torch.device, keep: tuple[str, ...] = ()) -> dict[str, Any]:
    """Model inputs with every tensor on ``device`` except those named in ``keep`` (read on
    the host by the model: ``ModelAdapter.host_inputs``); other values as they are."""
    return {k: (v.to(device) if isinstance(v, torch.Tensor) and k not in keep else v) for k, v in inputs.items()}


def _layer_kv(adapter: ModelAdapter, cache: Any, seen: dict[str, Any], sel: Selection, kind: str, layer: int,
              b: int, s: int) -> torch.Tensor:
    """[B, H, S, D] keys or values of one layer: from the cache, or pre-RoPE from the k_proj hook."""
    if kind == "keys" and sel.keys_rope == "pre-rope":
        return seen["k_proj"][layer].view(b, s, adapter.n_kv_heads, adapter.head_dim).transpose(1, 2)
    return getattr(cache.layers[layer], kind)


def model_cache(out: Any) -> Any:
    """The forward pass's KV cache: ``out.cache`` (transformers >= 5.24), else ``out.past_key_values``."""
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def quantize_int8(x: torch.Tensor) -> torch.Tensor:
    """[..., D] -> [..., D + 4] int8 on the device: per-token codes and the float32 scale's
    bytes, as ``store.encoding.quantize_int8`` computes them on the host (same bytes).

    Why this shape: max |x| is taken in x's own dtype (exact, half the bytes of a float32
    copy), x / scale promotes to float32 inside one kernel, and rounding and clamping run in
    place, so a batch's K/V is streamed through GPU memory four times instead of eight."""
    d = x.shape[-1]
    scale = x.abs().amax(dim=-1, keepdim=True).float() / device_constant((127.0,), str(x.device))[0]
    codes = torch.div(x, torch.where(scale > 0, scale, torch.ones_like(scale))).round_().clamp_(-127, 127)
    out = torch.empty(*x.shape[:-1], d + 4, dtype=torch.int8, device=x.device)
    out[..., :d] = codes
    out[..., d:] = scale.view(torch.int8)
    return out


def _fwht(y: torch.Tensor) -> torch.Tensor:
    """``store.quant.fwht`` on the device: the same float32 butterflies, so the same bits."""
    d = y.shape[-1]
    n = hadamard_block(d)
    lead = y.shape[:-1]
    y = y.reshape(-1, d // n, n)
    h = 1
    while h < n:
        y = y.reshape(y.shape[0], d // n, n // (2 * h), 2, h)
        y = torch.stack([y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]], dim=-2)
        h *= 2
    return y.reshape(*lead, d) * device_constant((float(np.float32(1 / np.sqrt(n))),), str(y.device))[0]


@functools.lru_cache(maxsize=64)
def device_constant(values: tuple[float, ...], device: str) -> torch.Tensor:
    """float32 ``values`` as a tensor on ``device``, made once per process and device.

    Why: ``torch.tensor(..., device="cuda")`` is a copy from pageable host memory, which waits
    until the GPU has run everything queued before it: in the per-layer loop of
    ``quantize_int4`` that stalled the host behind each batch's forward pass. A device tensor
    rather than a Python number, because CUDA divides by a Python number as a multiplication
    by its reciprocal, which can differ from the host's division in the last bit."""
    return torch.tensor(np.array(values, np.float32), device=device)


def quantize_int4(x: torch.Tensor, rotation: str = "hadamard", seed: int = ROTATION_SEED,
                  rows: int | None = None) -> torch.Tensor:
    """[..., D] -> [..., ceil(D/2) + 8] uint8 on the device, the bytes ``store.quant.quantize_int4``
    computes on the host: rotated (random signs, Walsh-Hadamard), 4-bit codes of the token's
    [min, max] range packed two per byte, then its float32 scale and minimum.

    Why in slices of the leading axis: the float32 rotation of a whole batch's K/V (a layer
    stack) would double its device memory. A slice holds ``int4_slice_rows`` rows (layers, or
    tokens of a [tokens, width] post-projector array), as many as fit in the device's float32
    budget ``INT4_SLICE_BYTES``: 1 GiB on a GPU, where a slice is about 40 kernel launches and
    one row per slice was launch-bound; 8 MiB on the CPU, where larger temporaries miss the
    cache (3.7 x slower with several 7B layers per slice). The slice size changes no byte;
    ``rows`` sets it (benchmarks/int4_slices.py compares one row per slice)."""
    d = x.shape[-1]
    out = torch.empty(*x.shape[:-1], int4_stored_dim(d), dtype=torch.uint8, device=x.device)
    dev = str(x.device)
    signs = rotation_signs_on(d, seed, dev) if rotation == "hadamard" else None
    levels = device_constant((float(INT4_LEVELS),), dev)[0]
    lead = x if x.dim() > 1 else x.unsqueeze(0)
    dest = out if x.dim() > 1 else out.unsqueeze(0)
    step = rows or int4_slice_rows(lead, x.device)
    for i in range(0, lead.shape[0], step):
        xi = lead[i:i + step].float()
        y = _fwht(xi * signs) if signs is not None else xi
        lo = y.amin(dim=-1, keepdim=True)
        scale = (y.amax(dim=-1, keepdim=True) - lo) / levels
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes = torch.div(y - lo, safe).round_().clamp_(0, INT4_LEVELS).to(torch.uint8)
        if d % 2:
            codes = torch.nn.functional.pad(codes, (0, 1))
        oi = dest[i:i + step]
        oi[..., : (d + 1) // 2] = codes[..., 0::2] | (codes[..., 1::2] << 4)
        oi[..., (d + 1) // 2:] = torch.cat([scale, lo], dim=-1).view(torch.uint8)
    return out


INT4_SLICE_BYTES = {"cuda": 1 << 30, "cpu": 8 << 20}  # float32 working set of one slice of quantize_int4


def int4_slice_rows(x: torch.Tensor, device: torch.device) -> int:
    """Rows of x's leading axis that ``quantize_int4`` quantises at once on ``device``: at least one."""
    budget = INT4_SLICE_BYTES.get(device.type, INT4_SLICE_BYTES["cuda"])
    return max(1, min(x.shape[0], budget // max(4 * x[0].numel(), 1)))


def to_bfloat16(x: torch.Tensor) -> torch.Tensor:
    """pca's device step: its chunks are coded whole on the host (``store.pca``), from bf16."""
    return x.to(torch.bfloat16)


# lossy store dtypes, quantised on the device (pca: sent as bf16, each chunk coded on the host)
DEVICE_QUANT = {"int8": quantize_int8, "int4": quantize_int4, "pca": to_bfloat16}


def to_store_dtype(x: torch.Tensor, dtype: str) -> torch.Tensor:
    quant = DEVICE_QUANT.get(dtype)
    return quant(x) if quant is not None else x.to(TORCH_DTYPES[dtype])


@dataclass
class CapturedBatch:
    """One batch's captured features, all images concatenated along the token axis.

    arrays: kind -> numpy array in the store's dtype ("keys"/"values": [L, H, tokens, D],
    "post_proj": [tokens, hidden]); bfloat16 comes as its uint16 bit pattern.
    counts: tokens per image, in batch order.
    """

    arrays: dict[str, np.ndarray]
    counts: list[int]

    def split(self) -> list[dict[str, np.ndarray]]:
        bounds = np.cumsum([0] + self.counts)
        return [{k: (v[..., a:b, :] if v.ndim == 4 else v[a:b]) for k, v in self.arrays.items()}
                for a, b in zip(bounds[:-1], bounds[1:])]


def _to_host(t: torch.Tensor) -> np.ndarray:
    """One device-to-host copy per kind and batch; bf16 travels as its 16-bit pattern.

    A plain copy into pageable memory: allocating fresh pinned buffers per batch (their
    pages must stay valid until the part is written) costs more than the copy it speeds up."""
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    arr = t.cpu().numpy()
    return arr.view(np.uint16) if arr.dtype == np.int16 else arr


@torch.inference_mode()
def gather_batch(adapter: ModelAdapter, batch: Batch, sel: Selection,
                 dtype: str = "float32") -> tuple[dict[str, torch.Tensor], list[int]]:
    """Forward the batch once and gather every image's K/V on the device.

    Why one gather: all images' image positions are selected with one indexing kernel per
    (kind, layer), written straight into the batch's [L, H, tokens, D] array in the store
    dtype (int8 / int4: quantised after), so the host receives one contiguous array per kind
    (post_proj: [tokens, hidden]) and the K/V are read once, not copied whole first.
    Returns the device tensors and the tokens per image.
    """
    inputs = inputs_to_device(batch.inputs, adapter.device, adapter.host_inputs)
    with _hooks(adapter, sel) as seen:
        out = adapter.model.model(**inputs, use_cache=True)  # the base model: no LM head, no logits
    cache = model_cache(out)
    device = adapter.device
    all_heads = sel.heads == tuple(range(adapter.n_kv_heads))
    heads = torch.tensor(sel.heads, device=device)
    b, s = inputs["input_ids"].shape
    # (sample, position) of every image token, in batch order (a sample may hold several images)
    rows = torch.cat([torch.full_like(lay.positions, batch.sample_of(i))
                      for i, lay in enumerate(batch.layouts)]).to(device)
    cols = torch.cat([lay.positions for lay in batch.layouts]).to(device)
    arrays: dict[str, torch.Tensor] = {}
    for kind in ("keys", "values"):
        if kind not in sel.kinds:
            continue
        gathered = None
        for i, l in enumerate(sel.layers):
            full = _layer_kv(adapter, cache, seen, sel, kind, l, b, s)  # [B, H, S, D]
            if not all_heads:
                full = full.index_select(1, heads)
            if gathered is None:
                into = full.dtype if dtype in DEVICE_QUANT else TORCH_DTYPES[dtype]
                gathered = torch.empty(len(sel.layers), full.shape[1], rows.numel(), full.shape[-1],
                                       dtype=into, device=device)
            gathered[i] = full.transpose(0, 1)[:, rows, cols]  # [H, tokens, D]
        arrays[kind] = DEVICE_QUANT[dtype](gathered) if dtype in DEVICE_QUANT else gathered  # [L, H, tokens, D]
    if POST_PROJ in sel.kinds:
        arrays[POST_PROJ] = to_store_dtype(seen[POST_PROJ][rows, cols], dtype)
    return arrays, [int(lay.positions.numel()) for lay in batch.layouts]


@torch.inference_mode()
def gather_hidden(adapter: ModelAdapter, batch: Batch, sel: Selection,
                  dtype: str = "float32") -> tuple[dict[str, torch.Tensor], list[int]]:
    """A vision encoder's block outputs at the patch positions: {"hidden": [L, 1, tokens, width]},
    and with post_proj its per-patch image-text embeddings (``adapter.project_patches`` of the
    final, normed states): {"post_proj": [tokens, width]}.

    Why ``output_hidden_states``: the encoder's own returned states (embeddings, then every
    block's output, before any final norm) are the reference, so the stored features equal
    them by construction; ``hidden_states[l + 1]`` is block l. One index_select per layer
    gathers all images' patch tokens (CLS/register positions are not in the layout).
    """
    inputs = inputs_to_device(batch.inputs, adapter.device)
    out = adapter.model(**inputs, output_hidden_states=True)
    states = out.hidden_states
    b, s, d = states[0].shape
    flat = torch.cat([lay.positions.to(adapter.device) + i * s for i, lay in enumerate(batch.layouts)])
    arrays: dict[str, torch.Tensor] = {}
    if HIDDEN in sel.kinds:
        per_layer = [states[l + 1].reshape(b * s, d).index_select(0, flat) for l in sel.layers]
        arrays[HIDDEN] = to_store_dtype(torch.stack(per_layer).unsqueeze(1), dtype)
    if POST_PROJ in sel.kinds:  # the encoder's projection of each patch into its image-text space
        last = out.last_hidden_state
        arrays[POST_PROJ] = to_store_dtype(adapter.project_patches(last.reshape(b * s, -1).index_select(0, flat)),
                                           dtype)
    return arrays, [int(lay.positions.numel()) for lay in batch.layouts]


def capture_batch(adapter: ModelAdapter, batch: Batch, sel: Selection, dtype: str = "float32") -> CapturedBatch:
    """The adapter's gather (``gather_batch`` for an MLM), then a synchronous copy to host numpy arrays."""
    arrays, counts = adapter.gather(batch, sel, dtype)
    return CapturedBatch({k: _to_host(v) for k, v in arrays.items()}, counts)


def run_capture(adapter: ModelAdapter, batch: Batch, sel: Selection) -> list[dict[str, torch.Tensor]]:
    """Per image of the batch: {"keys"/"values": [L, H, n, D], "post_proj": [n, hidden]} (float32, CPU)."""
    return [{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in item.items()}
            for item in capture_batch(adapter, batch, sel, "float32").split()]


@torch.inference_mode()
def run_text_capture(adapter: ModelAdapter, texts: list[str], sel: Selection,
                     template: str) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
    """Final-token features of each text from a text-only pass: {"keys"/"values": [L, H, Q, D],
    "post_proj": [Q, hidden]}.

    post_proj is the final token's row of the LM's input embeddings (what the embedding layer
    feeds the LM, read by the same pre-hook as the image tokens' post_proj): the text in the
    space the projector maps the image into, the query of the post-projector baseline."""
    enc, last = adapter.text_batch(texts, template)
    inputs = inputs_to_device(enc, adapter.device)
    with _hooks(adapter, sel) as seen:
        out = adapter.model.model(**inputs, use_cache=True)
    cache = model_cache(out)
    heads = torch.tensor(sel.heads, device=adapter.device)
    rows = torch.arange(len(texts), device=adapter.device)
    idx = torch.tensor(last, device=adapter.device)
    result: dict[str, torch.Tensor] = {}
    for kind in ("keys", "values"):
        if kind not in sel.kinds:
            continue
        per_layer = []
        for l in sel.layers:
            full = _layer_kv(adapter, cache, seen, sel, kind, l, *inputs["input_ids"].shape)
            per_layer.append(full[rows, :, idx].index_select(1, heads).transpose(0, 1))  # [H, Q, D]
        result[kind] = torch.stack(per_layer).float().cpu()
    if POST_PROJ in sel.kinds:
        result[POST_PROJ] = seen[POST_PROJ][rows, idx].float().cpu()  # [Q, hidden]
    ids = [enc["input_ids"][q, : last[q] + 1].tolist() for q in range(len(texts))]
    return result, ids
