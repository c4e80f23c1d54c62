"""Array encodings of the store: dtypes on disk (lossless, or int8 per token), the codec.

Why: bfloat16 is what 7B models compute in, and Zarr v3 has no bfloat16 type, so bf16 is
stored as its raw 16-bit pattern (uint16) and converted back on read: lossless and fast.
Blosc with byte shuffle + zstd is the default compressor (numcodecs' Blosc, via Zarr; ``CODECS``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.codecs import BloscCodec

DISK_DTYPE = {"float32": "float32", "float16": "float16", "bfloat16": "uint16", "int8": "int8"}
# int8 (lossy): each token vector of D numbers is stored as D int8 codes followed by its float32
# scale as 4 bytes, so a (layer, head) chunk stays one self-contained [tokens, D + 4] array and
# every part, chunk and reader path is the same as for the lossless dtypes.
SCALE_BYTES = 4
INT8_MAX = 127


# Lossless codecs by name: (Blosc compressor, level, shuffle). Measured on LLaVA-OV-7B's bf16
# K/V (docs/BENCHMARKS.md): zstd 1 (the default) stores 0.74 of the raw bytes at 296 MB/s per
# encoder thread; lz4 with bit shuffle stores 0.80 at 813 MB/s and decodes 2.4x faster;
# zstd 3 stores 0.69 at 138 MB/s. Writing to a local disk of ~1.2-1.4 GB/s, extraction is
# bound by the disk, so the smaller store wins; "lz4bit" is for faster disks and stores that
# are read far more often than written.
CODECS = {"zstd": ("zstd", 1, "shuffle"), "zstd3": ("zstd", 3, "shuffle"), "lz4": ("lz4", 1, "shuffle"),
          "lz4bit": ("lz4", 1, "bitshuffle")}
CLEVEL = 1
_SHUFFLE_META = {"shuffle": "byte", "bitshuffle": "bit", "noshuffle": "none"}
_SHUFFLE_OF_META = {v: k for k, v in _SHUFFLE_META.items()}


def compressor(store_dtype: str, clevel: int = CLEVEL, cname: str = "zstd", shuffle: str = "shuffle") -> BloscCodec:
    itemsize = np.dtype(DISK_DTYPE[store_dtype]).itemsize
    return BloscCodec(cname=cname, clevel=clevel, shuffle=shuffle, typesize=itemsize)


def compressor_meta(store_dtype: str, codec: str = "zstd") -> dict:
    cname, clevel, shuffle = CODECS[codec]
    return {"codec": "blosc", "cname": cname, "clevel": clevel, "shuffle": _SHUFFLE_META[shuffle]}


def compressor_for(meta_compressor: Any, store_dtype: str) -> BloscCodec:
    """The codec a store's metadata names (``schema.Encoding`` or its dict; stores made before
    the choice existed: zstd 3)."""
    from kvpipe.store.schema import Encoding

    enc = Encoding.from_dict(meta_compressor)
    shuffle = _SHUFFLE_OF_META[enc.shuffle or "byte"]
    clevel = 3 if enc.clevel is None else enc.clevel
    return compressor(store_dtype, clevel, enc.cname or "zstd", shuffle)


def stored_dim(dim: int, store_dtype: str) -> int:
    """Length of a token's last axis on disk."""
    return dim + SCALE_BYTES if store_dtype == "int8" else dim


def quantize_int8(x: np.ndarray) -> np.ndarray:
    """[..., D] float -> [..., D + 4] int8: symmetric per-token codes and the float32 scale
    (max |x| / 127). ``pipeline.capture.quantize_int8`` does the same on the device, with the
    same float32 arithmetic, so both give the same bytes."""
    x = np.asarray(x, dtype=np.float32)
    scale = np.abs(x).max(axis=-1, keepdims=True) / np.float32(INT8_MAX)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint(x / safe), -INT8_MAX, INT8_MAX).astype(np.int8)
    return np.concatenate([codes, np.ascontiguousarray(scale).view(np.int8)], axis=-1)


def dequantize_int8(raw: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """[..., D + 4] int8 -> [..., D] float32 (codes times the token's scale)."""
    scale = np.ascontiguousarray(raw[..., -SCALE_BYTES:]).view(np.float32)
    if out is None:
        out = np.empty(raw.shape[:-1] + (raw.shape[-1] - SCALE_BYTES,), np.float32)
    out[...] = raw[..., :-SCALE_BYTES]
    out *= scale
    return out


def encode(x: np.ndarray, store_dtype: str) -> np.ndarray:
    """float32 (or float16) array -> the on-disk array for ``store_dtype``.

    Arrays already in the on-disk dtype (bf16 bit patterns or int8 codes from the GPU) pass
    unchanged.
    """
    if store_dtype == "int8":
        return x if x.dtype == np.int8 else quantize_int8(x)
    if store_dtype == "bfloat16":
        if x.dtype == np.uint16:
            return x
        return float32_to_bf16_bits(np.asarray(x, dtype=np.float32))
    return np.asarray(x, dtype=store_dtype)


def decode(raw: np.ndarray, store_dtype: str) -> np.ndarray:
    """On-disk array -> float32."""
    if store_dtype == "int8":
        return dequantize_int8(raw)
    if store_dtype == "bfloat16":
        return bf16_bits_to_float32(raw)
    return raw.astype(np.float32, copy=False)


def float32_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """Round-to-nearest-even float32 -> bfloat16 bit patterns (as torch does)."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    out = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def bf16_bits_to_float32(raw: np.ndarray) -> np.ndarray:
    return (raw.astype(np.uint32) << 16).view(np.float32)


def decode_into(raw: np.ndarray, store_dtype: str, out: np.ndarray) -> None:
    """Decode ``raw`` into the float32 array ``out`` in place (no temporary float32 copy)."""
    if store_dtype == "int8":
        dequantize_int8(raw, out)
    elif store_dtype == "bfloat16":
        bits = out.view(np.uint32)
        np.left_shift(raw, 16, out=bits, dtype=np.uint32)
    else:
        out[...] = raw
