"""Array encodings of the store: dtypes on disk (lossless, int8 / int4 per token, pca per chunk), the codec.

Why: bfloat16 is what 7B models compute in, and Zarr v3 has no bfloat16 type, so bf16 is
stored as its raw 16-bit pattern (uint16) and converted back on read: lossless and fast.
Blosc with byte shuffle + zstd is the default compressor (numcodecs' Blosc, via Zarr; ``CODECS``).
Each ``--store-dtype`` is one entry of ``ENCODINGS`` (disk dtype, token width, encode, decode);
the lossy ones record their parameters in the store's Encoding metadata (``lossy_meta``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from zarr.codecs import BloscCodec

from kvpipe.errors import StoreError
from kvpipe.store.pca import PCA_STEP, PcaChunk, encode_pca
from kvpipe.store.pca import header_rows as pca_header_rows
from kvpipe.store.quant import ROTATION_SEED, ROTATIONS, dequantize_int4, int4_stored_dim, quantize_int4, rotate

# int8 (lossy): each token vector of D numbers is stored as D int8 codes followed by its float32
# scale as 4 bytes, so a (layer, head) chunk stays one self-contained [tokens, D + 4] array and
# every part, chunk and reader path is the same as for the lossless dtypes.
SCALE_BYTES = 4
INT8_MAX = 127

# The basis a read returns vectors in. "model": the model's own vectors (int4's rotation undone).
# "stored": the encoding's own basis (int4's rotated vectors; the same as "model" for every other
# encoding). The rotation is orthogonal, so inner products, norms and distances are the same in
# both; a probe that uses nothing else reads the stored basis and skips the inverse rotation,
# most of int4's decoding cost on the host (docs/BENCHMARKS.md "Lossy encodings").
BASES = ("model", "stored")


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


def compressor_meta(store_dtype: str, codec: str = "zstd", pca_step: float | None = None) -> dict:
    """The store's Encoding metadata: the Blosc codec, and a lossy encoding's parameters."""
    cname, clevel, shuffle = CODECS[codec]
    return {"codec": "blosc", "cname": cname, "clevel": clevel, "shuffle": _SHUFFLE_META[shuffle],
            **lossy_meta(store_dtype, pca_step)}


def compressor_for(meta_compressor: Any, store_dtype: str) -> BloscCodec:
    """The codec a store's metadata names (``schema.Encoding`` or its dict; stores made before
    the choice existed: zstd 3)."""
    from kvpipe.store.schema import Encoding

    enc = Encoding.from_dict(meta_compressor)
    shuffle = _SHUFFLE_OF_META[enc.shuffle or "byte"]
    clevel = 3 if enc.clevel is None else enc.clevel
    return compressor(store_dtype, clevel, enc.cname or "zstd", shuffle)


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


def _bf16_encode(x: np.ndarray) -> np.ndarray:
    return x if x.dtype == np.uint16 else float32_to_bf16_bits(np.asarray(x, dtype=np.float32))


def _bf16_decode_into(raw: np.ndarray, out: np.ndarray) -> None:
    np.left_shift(raw, 16, out=out.view(np.uint32), dtype=np.uint32)


def _plain(dtype: str) -> "DiskEncoding":
    def enc(x: np.ndarray) -> np.ndarray:
        return np.asarray(x, dtype=dtype)

    def dec(raw: np.ndarray, out: np.ndarray) -> None:
        out[...] = raw

    return DiskEncoding(dtype, lambda d: d, enc, dec)


@dataclass(frozen=True)
class DiskEncoding:
    """One ``--store-dtype``: its disk dtype, token width on disk for a vector of D numbers,
    encode (float -> disk array; arrays already in the disk dtype, as the device sends them,
    pass unchanged) and decode (disk -> a float32 array, in place)."""

    disk_dtype: str
    width: Callable[[int], int]
    encode: Callable[[np.ndarray], np.ndarray]
    decode_into: Callable[[np.ndarray, np.ndarray], None]
    lossy: bool = False
    dim_of: Callable[[int], int] = lambda w: w  # the (even) vector length stored in w columns
    rotation: str | None = None  # int4: the rotation undone on read ("none" in the stored basis), and its seed
    rotation_seed: int = ROTATION_SEED
    # pca: a chunk is one record coded as a whole (``chunk_encode`` replaces ``encode``), with
    # ``header_rows(D)`` rows before its tokens; ``open_chunk`` parses a record once, for
    # slicing tokens and decoding them (identity for the encodings that code each token alone)
    chunk_encode: Callable[[np.ndarray], np.ndarray] | None = None
    header_rows: Callable[[int], int] = lambda d: 0
    open_chunk: Callable[[np.ndarray], Any] = lambda raw: raw


def _open_pca(raw: Any) -> PcaChunk:
    """A pca record, opened (one already opened as it is)."""
    return raw if isinstance(raw, PcaChunk) else PcaChunk(raw)


def _pca(step: float = PCA_STEP) -> DiskEncoding:
    def dec(chunk: Any, out: np.ndarray) -> None:
        _open_pca(chunk).decode_into(out)

    def passthrough(x: np.ndarray) -> np.ndarray:  # pieces stay as sent; each chunk is coded whole
        return x

    return DiskEncoding("int8", lambda d: d, passthrough, dec, lossy=True,
                        chunk_encode=lambda x: encode_pca(x, step), header_rows=pca_header_rows,
                        open_chunk=_open_pca)


def _int4(rotation: str = "hadamard", seed: int = ROTATION_SEED, basis: str = "model") -> DiskEncoding:
    undone = rotation if basis == "model" else "none"  # the stored basis keeps the rotated vectors

    def enc(x: np.ndarray) -> np.ndarray:
        return x if x.dtype == np.uint8 else quantize_int4(x, rotation, seed)

    def dec(raw: np.ndarray, out: np.ndarray) -> None:
        dequantize_int4(raw, out.shape[-1], out, undone, seed)

    return DiskEncoding("uint8", int4_stored_dim, enc, dec, lossy=True, dim_of=lambda w: 2 * (w - 8),
                        rotation=undone, rotation_seed=seed)


ENCODINGS: dict[str, DiskEncoding] = {
    "float32": _plain("float32"),
    "float16": _plain("float16"),
    "bfloat16": DiskEncoding("uint16", lambda d: d, _bf16_encode, _bf16_decode_into),
    "int8": DiskEncoding("int8", lambda d: d + SCALE_BYTES,
                         lambda x: x if x.dtype == np.int8 else quantize_int8(x),
                         lambda raw, out: dequantize_int8(raw, out), lossy=True, dim_of=lambda w: w - SCALE_BYTES),
    "int4": _int4(),
    "pca": _pca(),
}
DISK_DTYPE = {name: e.disk_dtype for name, e in ENCODINGS.items()}  # --store-dtype -> numpy dtype on disk


def check_store_dtype(store_dtype: str | None, pca_step: float | None = None) -> None:
    """A one-line UsageError for a ``--store-dtype`` or ``--pca-step`` kvpipe cannot write."""
    from kvpipe.errors import UsageError
    from kvpipe.store.schema import STORE_DTYPES

    if store_dtype is not None and store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}, not {store_dtype!r}")
    if pca_step is not None and (store_dtype != "pca" or not 0.01 <= pca_step <= 4):
        raise UsageError(f"--pca-step {pca_step} needs --store-dtype pca and a value in [0.01, 4] "
                         f"(the step in units of a chunk's typical RMS; default {PCA_STEP})")


def text_dtype_for(store_dtype: str, compute_dtype: str) -> str:
    """A store's ``text_dtype``: a lossy store keeps its few text queries lossless, in the compute
    dtype; "" (as the images) otherwise."""
    return compute_dtype if encoding_for(store_dtype).lossy else ""


def lossy_meta(store_dtype: str, pca_step: float | None = None) -> dict[str, Any]:
    """The lossy encoding's parameters for the store's Encoding metadata ({} when lossless)."""
    if store_dtype == "int8":
        return {"quant": "int8", "scale": "absmax"}
    if store_dtype == "int4":
        return {"quant": "int4", "scale": "minmax", "rotation": "hadamard", "rotation_seed": ROTATION_SEED}
    if store_dtype == "pca":
        return {"quant": "pca", "scale": "step", "step": PCA_STEP if pca_step is None else float(pca_step)}
    return {}


def encoding_for(store_dtype: str, params: Any = None, basis: str = "model") -> DiskEncoding:
    """The encoding of a store (``params``: its Encoding metadata, for a lossy encoding's
    rotation and seed; ``basis``: one of ``BASES``, what its decoder returns); a one-line
    StoreError for one this kvpipe does not know."""
    if basis not in BASES:
        raise StoreError(f"basis must be one of {', '.join(BASES)}, not {basis!r}")
    if store_dtype not in ENCODINGS:
        raise StoreError(f"the store uses encoding {store_dtype!r}, which this kvpipe does not know "
                         f"(known: {', '.join(ENCODINGS)}); upgrade kvpipe to read it")
    if store_dtype == "int4" and params is not None:
        get = params.get if hasattr(params, "get") else dict(params).get
        rotation = get("rotation") or "hadamard"
        if rotation not in ROTATIONS:
            raise StoreError(f"the store's int4 encoding uses rotation {rotation!r}, which this kvpipe does not "
                             f"know (known: {', '.join(ROTATIONS)}); upgrade kvpipe to read it")
        seed = get("rotation_seed")
        return _int4(rotation, ROTATION_SEED if seed is None else int(seed), basis)
    if store_dtype == "pca" and params is not None:
        get = params.get if hasattr(params, "get") else dict(params).get
        step = get("step")
        return ENCODINGS[store_dtype] if step is None or step == PCA_STEP else _pca(float(step))
    return _int4(basis=basis) if store_dtype == "int4" and basis != "model" else ENCODINGS[store_dtype]


def stored_dim(dim: int, store_dtype: str) -> int:
    """Length of a token's last axis on disk."""
    return encoding_for(store_dtype).width(dim)


def encode(x: np.ndarray, store_dtype: str, params: Any = None) -> np.ndarray:
    """float32 (or float16) array -> the on-disk array for ``store_dtype``.

    Arrays already in the on-disk dtype (bf16 bit patterns or int8 / int4 codes from the GPU)
    pass unchanged.
    """
    enc = encoding_for(store_dtype, params)
    if enc.chunk_encode is not None:  # pca: each [T, D] of the leading axes is one record
        flat = np.asarray(x).reshape(-1, *x.shape[-2:])
        return np.stack([enc.chunk_encode(c) for c in flat]).reshape(*x.shape[:-2], -1, x.shape[-1])
    return enc.encode(x)


def decode(raw: np.ndarray, store_dtype: str, params: Any = None, dim: int | None = None,
           basis: str = "model") -> np.ndarray:
    """On-disk array -> float32 (``dim``: the vector length, needed by int4 for odd lengths;
    a pca chunk's whole record, or one opened with ``open_chunk``)."""
    enc = encoding_for(store_dtype, params, basis)
    if enc.chunk_encode is not None:
        chunk = enc.open_chunk(raw)
        out = np.empty(chunk.shape, np.float32)
        enc.decode_into(chunk, out)
        return out
    out = np.empty(raw.shape[:-1] + (enc.dim_of(raw.shape[-1]) if dim is None else dim,), np.float32)
    enc.decode_into(raw, out)
    return out


def decode_into(raw: np.ndarray, store_dtype: str, out: np.ndarray, params: Any = None,
                basis: str = "model") -> None:
    """Decode ``raw`` into the float32 array ``out`` in place (no temporary float32 copy)."""
    encoding_for(store_dtype, params, basis).decode_into(raw, out)


def to_stored_basis(x: np.ndarray, store_dtype: str, params: Any = None) -> np.ndarray:
    """Model-basis vectors (a lossy store's lossless text queries, say) -> the encoding's stored
    basis, where they meet vectors read with ``basis="stored"`` (identity unless rotated)."""
    enc = encoding_for(store_dtype, params)
    return rotate(x, enc.rotation_seed) if enc.rotation == "hadamard" else np.asarray(x, np.float32)
