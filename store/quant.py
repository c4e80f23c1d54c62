"""The 4-bit store encoding (``--store-dtype int4``), host side: encode and decode in numpy.

Why 4 bits with a rotation: at paper scale the store, not the GPU, is the limit (LLaVA-OV-7B
at 384 px stores ~59 MB per image lossless). Keys have a few channels far larger than the
rest, so a per-token range set by those channels leaves the others only one or two codes.
A random Hadamard rotation (random signs, then an orthonormal Walsh-Hadamard transform)
spreads every channel over all of them; the per-token range then fits the bulk, and the
rotation is undone on read (it is its own inverse up to the signs). Measured per probe in
docs/BENCHMARKS.md ("Lossy encodings").

A token vector of D numbers is stored as ceil(D / 2) bytes of codes (two 4-bit codes per
byte, the even element in the low nibble), then its float32 scale and float32 minimum (the
zero point): codes = rint((y - min) / scale), scale = (max - min) / 15, y the rotated vector.
``pipeline.models.capture.quantize_int4`` computes the same bytes on the device: every step
is an elementwise float32 operation or an exact min/max, in the same order.
"""

from __future__ import annotations

import functools

import numpy as np

INT4_LEVELS = 15  # codes 0..15
INT4_TAIL = 8  # float32 scale + float32 minimum after the codes
ROTATION_SEED = 0  # the random signs' seed (recorded in the store's Encoding metadata)
ROTATIONS = ("hadamard", "none")
DECODE_BLOCK = 2048  # tokens per decoding step: 1 MB of float32 temporaries for a head of 128


# byte -> its two codes as float32 (low nibble first): unpacking is one table lookup per byte
_NIBBLES = np.stack([np.arange(256) & 0x0F, np.arange(256) >> 4], axis=-1).astype(np.float32)


def int4_stored_dim(dim: int) -> int:
    return (dim + 1) // 2 + INT4_TAIL


def hadamard_block(dim: int) -> int:
    """The Walsh-Hadamard block: the largest power of two dividing ``dim`` (128 for a head of
    128; 512 for a 3584-wide post-projector vector, rotated as 7 blocks)."""
    return dim & -dim


@functools.lru_cache(maxsize=64)
def rotation_signs(dim: int, seed: int = ROTATION_SEED) -> np.ndarray:
    """The random +-1 signs of the rotation (float32, read-only), fixed by ``seed`` and ``dim``."""
    rng = np.random.default_rng([seed, dim])
    signs = np.where(rng.random(dim) < 0.5, np.float32(-1), np.float32(1)).astype(np.float32)
    signs.flags.writeable = False
    return signs


def fwht(x: np.ndarray) -> np.ndarray:
    """Orthonormal Walsh-Hadamard transform of the last axis in blocks of ``hadamard_block``;
    symmetric and orthogonal, so it is its own inverse. Butterflies of float32 sums and
    differences (the device version runs the same ones, so both give the same bits)."""
    d = x.shape[-1]
    n = hadamard_block(d)
    lead = x.shape[:-1]
    y = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, d // n, n)
    h = 1
    while h < n:
        y = y.reshape(y.shape[0], d // n, n // (2 * h), 2, h)
        a, b = y[..., 0, :], y[..., 1, :]
        y = np.stack([a + b, a - b], axis=-2)
        h *= 2
    return (y.reshape(*lead, d) * np.float32(1 / np.sqrt(n))).astype(np.float32, copy=False)


@functools.lru_cache(maxsize=16)
def hadamard_matrix(n: int) -> np.ndarray:
    """The orthonormal n x n Walsh-Hadamard matrix (float32, symmetric, read-only): ``fwht`` as a
    matrix, for decoding, where one BLAS product is about 8 x faster than the butterflies."""
    h = fwht(np.eye(n, dtype=np.float32))
    h.flags.writeable = False
    return h


def rotate(x: np.ndarray, seed: int = ROTATION_SEED) -> np.ndarray:
    """Encoding's rotation: butterflies, the same float32 operations as the device's."""
    return fwht(np.asarray(x, np.float32) * rotation_signs(x.shape[-1], seed))


def unrotate(y: np.ndarray, seed: int = ROTATION_SEED) -> np.ndarray:
    """Decoding's inverse rotation as a product with ``hadamard_matrix`` (equal to ``fwht`` up to
    float32 rounding, ~1e-6 relative: decoding needs no bit-exact match with the device)."""
    d = y.shape[-1]
    n = hadamard_block(d)
    flat = np.ascontiguousarray(y, dtype=np.float32).reshape(-1, n)
    return (flat @ hadamard_matrix(n)).reshape(y.shape) * rotation_signs(d, seed)


def quantize_int4(x: np.ndarray, rotation: str = "hadamard", seed: int = ROTATION_SEED) -> np.ndarray:
    """[..., D] float -> [..., ceil(D/2) + 8] uint8: packed codes, float32 scale, float32 min."""
    x = np.asarray(x, dtype=np.float32)
    y = rotate(x, seed) if rotation == "hadamard" else x
    lo = y.min(axis=-1, keepdims=True)
    scale = (y.max(axis=-1, keepdims=True) - lo) / np.float32(INT4_LEVELS)
    safe = np.where(scale > 0, scale, np.float32(1))
    codes = np.clip(np.rint((y - lo) / safe), 0, INT4_LEVELS).astype(np.uint8)
    if codes.shape[-1] % 2:
        codes = np.concatenate([codes, np.zeros(codes.shape[:-1] + (1,), np.uint8)], axis=-1)
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    tail = np.concatenate([np.ascontiguousarray(scale), np.ascontiguousarray(lo)], axis=-1).view(np.uint8)
    return np.concatenate([packed, tail], axis=-1)


def dequantize_int4(raw: np.ndarray, dim: int, out: np.ndarray | None = None, rotation: str = "hadamard",
                    seed: int = ROTATION_SEED) -> np.ndarray:
    """[..., ceil(D/2) + 8] uint8 -> [..., D] float32 (codes times scale plus min, rotated back).

    With the rotation the affine step is folded into the product: (codes * scale + min) @ H S
    = (codes @ H S) * scale + min * (1 @ H S), and 1 @ H S is sqrt(n) times the sign at the
    start of each Walsh-Hadamard block and zero elsewhere; so one product with the signed
    matrix, one scaling and a column update (1.4 x faster than the affine step, the product
    and the signs as three passes). Long inputs are decoded in blocks of ``DECODE_BLOCK``
    tokens so that the float32 temporaries stay in the CPU's cache."""
    raw = np.asarray(raw, np.uint8)
    if raw.ndim == 2 and raw.shape[0] > DECODE_BLOCK:
        out = np.empty((raw.shape[0], dim), np.float32) if out is None else out
        for a in range(0, raw.shape[0], DECODE_BLOCK):
            dequantize_int4(raw[a: a + DECODE_BLOCK], dim, out[a: a + DECODE_BLOCK], rotation, seed)
        return out
    lead = raw.shape[:-1]
    tail = np.ascontiguousarray(raw[..., -INT4_TAIL:]).view(np.float32)
    scale, lo = tail[..., :1], tail[..., 1:]
    packed = raw[..., :-INT4_TAIL]
    plain = rotation != "hadamard"
    # the last step writes straight into ``out`` where it can (no float32 temporary to copy)
    direct = out is not None and out.flags.c_contiguous and out.shape == lead + (dim,)
    into = out.reshape(lead + (dim // 2, 2)) if direct and plain and packed.shape[-1] * 2 == dim else None
    codes = np.take(_NIBBLES, packed, axis=0, out=into, mode="clip").reshape(lead + (packed.shape[-1] * 2,))
    if codes.shape[-1] != dim:
        codes = np.ascontiguousarray(codes[..., :dim])
    if plain:
        y = codes
        y *= scale
        y += lo
    else:
        n = hadamard_block(dim)
        y = np.matmul(codes.reshape(-1, n), signed_hadamard(n, seed) if n == dim else hadamard_matrix(n),
                      out=out.reshape(-1, n) if direct else None)
        y = y.reshape(lead + (dim,))
        y *= scale
        if n != dim:
            y *= rotation_signs(dim, seed)
        y[..., ::n] += lo * (np.float32(np.sqrt(n)) * rotation_signs(dim, seed)[::n])
    if out is None:
        return y
    if not np.may_share_memory(y, out):
        out[...] = y
    return out


@functools.lru_cache(maxsize=16)
def signed_hadamard(n: int, seed: int = ROTATION_SEED) -> np.ndarray:
    """``hadamard_matrix(n)`` with the rotation's signs of an n-wide vector folded into its
    columns (``unrotate(y) == y @ signed_hadamard(n)`` for y of width n), read-only."""
    h = np.ascontiguousarray(hadamard_matrix(n) * rotation_signs(n, seed)[None, :])
    h.flags.writeable = False
    return h
