"""The principal-component store encoding (``--store-dtype pca``): each chunk coded in its own basis.

Why: int4 codes every token alone, and no code of one token alone gets below about 3.7 bits
per value at int4's error, while a head's vectors share a mean and unequal principal
variances that such a code pays for again in every token (docs/BENCHMARKS.md, "What int4
leaves uncoded"). This encoding fits them once per chunk, one (layer, head, kind) of one part,
from the chunk's own vectors, and codes each token's principal components with one uniform
step: low-variance components round to 0 and cost almost nothing under zstd.

A chunk is one self-contained int8 record of ``T + header_rows(D)`` rows of D bytes:

    header   mean       D float32       the chunk's mean vector
             scales     D float32       per component: its step times its basis row's scale
             basis      D/b x b x b int8  per block of b channels: its components (rows), int8
    codes    D x T int8, component-major (component c of token t at c * T + t), so that each
             component's codes lie together and zstd's tables see like statistics

Decoding is x = mean + sum_c code_c * scale_c * basis_c (one b x b product per token and
block). The step is ``step`` (recorded in the store's Encoding metadata) times the chunk's
typical RMS per value (its median token length over sqrt(D): a few far tokens do not coarsen
every code); a component whose codes would pass +-127 gets a larger step of its own, so no
code is clipped. Vectors wider than 256 (the post-projector's 3,584) are coded in blocks of
128 channels so that the basis stays small beside the codes. A block whose basis would cost
more bytes than it saves (a part of few tokens) keeps its channels: the identity basis, the
same record and decoder (``basis_pays``).
"""

from __future__ import annotations

import numpy as np

PCA_STEP = 0.35  # default step in units of the chunk's typical RMS per value: int4's error (docs/BENCHMARKS.md, "pca")
CODE_MAX = 127
WIDE = 256  # vectors wider than this are coded in blocks of BLOCK channels
BLOCK = 128


def block_width(dim: int) -> int:
    """Channels per principal-component block: the whole vector up to ``WIDE``, else the
    largest power of two dividing ``dim``, at most ``BLOCK``."""
    return dim if dim <= WIDE else min(BLOCK, dim & -dim)


def header_rows(dim: int) -> int:
    """Rows of ``dim`` bytes before the codes: mean and scales (8 rows), the basis (b rows)."""
    return block_width(dim) + 8


BASIS_BITS = 8  # what an int8 basis entry costs under zstd (they barely compress)


def basis_pays(eigenvalues: np.ndarray, channel_variances: np.ndarray, noise: float, tokens: int) -> np.ndarray:
    """[blocks] bool: whether coding a block in its principal components saves more bits than its
    b x b int8 basis costs. Each component above the quantisation noise costs about half the log2
    of its variance per token (and the channels theirs), so the saving per token is half the log2
    of the channels' variances' product over the components' (each floored at the noise); a few
    hundred tokens do not pay for a 128 x 128 basis, and then the block keeps its channels (the
    identity basis, which zstd stores in almost nothing)."""
    floor = max(noise, 1e-30)
    saving = 0.5 * (np.log2(np.maximum(channel_variances, floor)).sum(-1)
                    - np.log2(np.maximum(eigenvalues, floor)).sum(-1))
    return tokens * saving > BASIS_BITS * eigenvalues.shape[-1] ** 2


def _as_float32(x: np.ndarray) -> np.ndarray:
    """Float vectors, or bfloat16 bit patterns (uint16, as the device sends them) -> float32."""
    x = np.asarray(x)
    if x.dtype == np.uint16:
        out = np.empty(x.shape, np.uint32)
        np.left_shift(x, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    return np.asarray(x, np.float32)


def encode_pca(x: np.ndarray, step: float = PCA_STEP) -> np.ndarray:
    """[..., T, D] vectors (leading axes of size 1) -> the [..., T + header_rows(D), D] int8 record.

    The covariance and the projection use the uncentred vectors (v'v - T m'm; B v' - B m',
    component-major as stored): the same quantities without a centred copy of the chunk."""
    lead = x.shape[:-2]
    v = _as_float32(x).reshape(x.shape[-2:])
    n, dim = v.shape
    b = block_width(dim)
    nb = dim // b
    mean = v.mean(0, dtype=np.float64)
    blocks = v.reshape(n, nb, b).transpose(1, 0, 2)  # [blocks, T, b] (a view)
    m = mean.reshape(nb, 1, b)
    cov = np.matmul(blocks.transpose(0, 2, 1), blocks).astype(np.float64) - n * m.transpose(0, 2, 1) * m
    vals, vecs = np.linalg.eigh(cov)
    basis = vecs[:, :, ::-1].transpose(0, 2, 1).astype(np.float32)  # [blocks, component, channel], largest first
    lengths = np.sqrt(np.einsum("td,td->t", v, v))
    typical = float(np.median(lengths)) / np.sqrt(dim) if n else 0.0  # a far token leaves it
    keep = basis_pays(vals, np.diagonal(cov, axis1=1, axis2=2), n * (step * typical) ** 2 / 12, n)
    basis[~keep] = np.eye(b, dtype=np.float32)  # blocks whose basis costs more than it saves: the channels
    row_scale = np.abs(basis).max(-1) / np.float32(CODE_MAX)
    basis8 = np.rint(basis / row_scale[..., None]).astype(np.int8)
    proj = basis8 * row_scale[..., None]  # [blocks, component, channel]
    z = np.matmul(proj, blocks.transpose(0, 2, 1))  # [blocks, component, T]: component-major, as stored
    z -= np.matmul(proj, m.astype(np.float32).transpose(0, 2, 1))
    largest = np.maximum(z.max(2), -z.min(2))  # [blocks, component]
    delta = np.maximum(np.float32(step * typical), largest / np.float32(CODE_MAX))
    delta = np.where(delta > 0, delta, np.float32(1)).astype(np.float32)
    z *= (1 / delta)[:, :, None]
    np.rint(z, out=z)  # within +-127: each component's step is at least its largest value / 127
    record = np.empty(((n + header_rows(dim)) * dim,), np.int8)
    head = 4 * dim
    record[:head] = mean.astype(np.float32).view(np.int8)
    record[head: 2 * head] = (delta * row_scale).reshape(-1).view(np.int8)
    record[2 * head: 2 * head + b * dim] = basis8.reshape(-1)
    np.copyto(record[2 * head + b * dim:].reshape(nb, b, n), z, casting="unsafe")
    return record.reshape(*lead, n + header_rows(dim), dim)


class PcaChunk:
    """One chunk's record, opened: the header parsed once; slicing selects tokens without
    decoding (``decode_into`` decodes a selection)."""

    def __init__(self, record: np.ndarray, start: int = 0, stop: int | None = None):
        record = np.asarray(record).reshape(record.shape[-2:])
        rows, dim = record.shape
        self.dim, self.n = dim, rows - header_rows(dim)
        self.record, self.start = record, start
        self.stop = self.n if stop is None else stop
        b = block_width(dim)
        flat = record.reshape(-1)
        self.mean = flat[: 4 * dim].view(np.float32)
        scale = flat[4 * dim: 8 * dim].view(np.float32).reshape(dim // b, b)
        self.basis8 = flat[8 * dim: (8 + b) * dim].reshape(dim // b, b, b)
        self.scale, self.block = scale, b
        self.codes = flat[(8 + b) * dim:].reshape(dim, self.n)  # component-major

    @property
    def shape(self) -> tuple[int, int]:
        return (self.stop - self.start, self.dim)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.float32)

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, sel: slice) -> "PcaChunk":
        a, b, stride = sel.indices(len(self))
        if stride != 1:
            raise ValueError("a PcaChunk is sliced by contiguous token ranges")
        out = PcaChunk.__new__(PcaChunk)
        out.__dict__.update(self.__dict__)
        out.start, out.stop = self.start + a, self.start + max(a, b)
        return out

    def weights(self) -> np.ndarray:
        """[blocks, component, channel] float32: each basis row times its code's scale."""
        w = getattr(self, "_w", None)
        if w is None:
            w = self._w = self.basis8.astype(np.float32) * self.scale[..., None]
        return w

    def decode_into(self, out: np.ndarray) -> np.ndarray:
        """This selection's tokens -> ``out`` [tokens, D] float32."""
        b, w = self.block, self.weights()
        codes = self.codes[:, self.start: self.stop]
        whole = self.dim == b and out.flags.c_contiguous
        for k in range(self.dim // b):  # one product per block: [tokens, b] codes @ [b, b]
            part = codes[k * b: (k + 1) * b].T.astype(np.float32)
            if whole:
                np.matmul(part, w[0], out=out)
            else:
                out[:, k * b: (k + 1) * b] = part @ w[k]
        out += self.mean
        return out


def decode_pca(record: np.ndarray) -> np.ndarray:
    """A whole record -> [T, D] float32."""
    chunk = PcaChunk(record)
    return chunk.decode_into(np.empty(chunk.shape, np.float32))
