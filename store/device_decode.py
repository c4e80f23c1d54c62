"""Decoding on a torch device: ``FeatureStore.read(..., device="cuda")``.

Why: a GPU probe would otherwise decode on the host and send float32 to the device. Sent as
stored, an int4 target crosses the bus in 0.14 of the float32 bytes and its inverse rotation
(one 128 x 128 product per token) runs on the GPU instead of the host's cores. Every
encoding decodes here with the host decoder's arithmetic (``store.encoding``, ``store.quant``):
the same values to float32 rounding (tests/store/test_device_decode.py).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np

from kvpipe.store.encoding import SCALE_BYTES, encoding_for
from kvpipe.store.quant import INT4_TAIL, hadamard_block, hadamard_matrix, rotation_signs, signed_hadamard


def to_device(raw: np.ndarray, device: str):
    """A host array in the disk dtype -> a torch tensor on ``device`` (page-locked first for a
    GPU, so the copy runs at the bus's speed); uint16 bf16 patterns travel as int16."""
    import torch

    host = torch.from_numpy(raw.view(np.int16) if raw.dtype == np.uint16 else raw)
    if torch.device(device).type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def _plain(raw, dim):
    import torch

    return raw.to(torch.float32)


def _bf16(raw, dim):
    import torch

    return raw.view(torch.bfloat16).to(torch.float32)


def _int8(raw, dim):
    import torch

    scale = raw[..., -SCALE_BYTES:].contiguous().view(torch.float32)
    return raw[..., :-SCALE_BYTES].to(torch.float32) * scale


@functools.lru_cache(maxsize=16)
def _signed(n: int, dim: int, seed: int, device: str):
    """The decoding matrix of ``quant.dequantize_int4`` on ``device``: the n x n Walsh-Hadamard
    matrix, with the signs folded into its columns when one block spans the vector."""
    import torch

    return torch.from_numpy(np.array(signed_hadamard(n, seed) if n == dim else hadamard_matrix(n))).to(device)


@functools.lru_cache(maxsize=16)
def rotation_signs_on(dim: int, seed: int, device: str):
    """``quant.rotation_signs`` on ``device``, sent once per process (a copy from host memory
    waits for the GPU): the decoder's and the device quantiser's."""
    import torch

    return torch.from_numpy(rotation_signs(dim, seed).copy()).to(device)


def _int4(rotation: str, seed: int) -> Callable:
    def decode(raw, dim):
        """``quant.dequantize_int4`` in torch: codes @ H S, times the scale, plus the minimum's
        image (sqrt(n) times the sign at each block's start)."""
        import torch

        tail = raw[..., -INT4_TAIL:].contiguous().view(torch.float32)
        scale, lo = tail[..., :1], tail[..., 1:]
        packed = raw[..., :-INT4_TAIL]
        codes = torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(*packed.shape[:-1], -1)[..., :dim]
        codes = codes.to(torch.float32)
        if rotation != "hadamard":
            return codes * scale + lo
        n = hadamard_block(dim)
        dev = str(raw.device)
        y = torch.matmul(codes.reshape(-1, n), _signed(n, dim, seed, dev)).reshape(codes.shape) * scale
        signs = rotation_signs_on(dim, seed, dev)
        if n != dim:
            y = y * signs
        y[..., ::n] += lo * (np.float32(np.sqrt(n)) * signs[::n])
        return y

    return decode


def decode_chunks(chunks: list[tuple[Any, list[tuple[int, int, int]]]], tokens: int, dim: int, device: str):
    """pca's read to a device: each part's opened chunk (``store.pca.PcaChunk``) and its runs of
    (source token, destination token, tokens); the codes of each run and the chunk's mean and
    weights are sent as stored (int8 codes: a quarter of float32's bytes) and decoded there,
    ``PcaChunk.decode_into``'s arithmetic: codes @ (scale x basis) + mean, per block."""
    import torch

    out = torch.empty(tokens, dim, dtype=torch.float32, device=device)
    for chunk, runs in chunks:
        w = torch.from_numpy(chunk.weights()).to(device)  # [blocks, component, channel]
        mean = torch.from_numpy(np.array(chunk.mean)).to(device)
        blocks, b = w.shape[0], w.shape[1]
        for src, dst, n in runs:
            run = chunk.codes[:, chunk.start + src: chunk.start + src + n]
            codes = to_device(np.require(run, requirements=("C", "W")), device)  # torch wants writable memory
            c = codes.to(torch.float32).reshape(blocks, b, n).transpose(1, 2)  # [blocks, tokens, component]
            out[dst: dst + n] = torch.matmul(c, w).transpose(0, 1).reshape(n, dim) + mean
    return out


def decoder(store_dtype: str, params: Any = None, basis: str = "model") -> Callable:
    """``decode(raw tensor, dim) -> float32 tensor`` for a store's encoding (its Encoding
    metadata gives int4's rotation and seed), in ``basis`` (``encoding.BASES``)."""
    enc = encoding_for(store_dtype, params, basis)  # a one-line StoreError for an unknown encoding or basis
    if store_dtype == "int4":
        return _int4(enc.rotation, enc.rotation_seed)  # the rotation undone in this basis
    return {"bfloat16": _bf16, "int8": _int8}.get(store_dtype, _plain)
