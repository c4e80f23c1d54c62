"""Write a Zarr array's chunk files directly: encode, write and checksum in one task.

Why not ``z[...] = data``: Zarr's write path merges every chunk into a fresh array and
compares it with the fill value on its event-loop thread, one chunk after another, before
the codecs run in threads; on a 16-core host that serial part, not Blosc, bounded a part's
commit (about 0.7 GB/s of bf16 K/V). Here each chunk is one task in a shared thread pool
(Blosc, file writes and CRC32C release the GIL), its checksum is taken from the
encoded bytes in memory instead of reading the file back, and the files are byte for byte
the ones Zarr writes (same codec, same chunk keys; tested), so every Zarr reader reads them.
Zarr still writes the arrays' metadata (zarr.json).
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from itertools import product
from pathlib import Path

import numcodecs
import numpy as np
from zarr.codecs import BloscCodec

from kvpipe.store.blas import one_blas_thread
from kvpipe.store.checksum import bytes_crc32c
from kvpipe.store.fs import start_writeback

_SHUFFLE = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE,
            "bitshuffle": numcodecs.Blosc.BITSHUFFLE}
THREADS = os.cpu_count() or 1
# Encoder threads run at a lower OS priority than the rest of the process: the thread that
# feeds the GPU (Python launching a 7B model's kernels) must get a core the moment it wants
# one, or the device idles while the previous part compresses on every core.
NICE = 10
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # this thread only (Linux)
    except (AttributeError, OSError):
        pass


def pool() -> ThreadPoolExecutor:
    """One encoder pool per process, shared by every part being written at the same time."""
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(THREADS, thread_name_prefix="kvpipe-encode", initializer=_lower_priority)
        return _pool


def set_threads(threads: int) -> None:
    """Size the encoder pool: the current pool (if any) finishes its tasks and the next
    ``pool()`` call starts one of ``threads`` threads."""
    global _pool, THREADS
    with _pool_lock:
        if _pool is not None and threads != THREADS:
            _pool.shutdown()
            _pool = None
        THREADS = threads


def blosc_of(codec: BloscCodec) -> numcodecs.Blosc:
    """numcodecs' Blosc with the parameters of Zarr's codec (what Zarr itself encodes with)."""
    return numcodecs.Blosc(cname=codec.cname.value, clevel=codec.clevel, shuffle=_SHUFFLE[codec.shuffle.value],
                           blocksize=codec.blocksize, typesize=codec.typesize)


class TokenSegments:
    """An array given as pieces along its token axis (one per batch, in token order).

    Why: each batch lands in its own pinned host buffer; joining them into one part array
    would be a second host copy on one thread. Here each chunk (one (layer, head), or a whole
    small array) is joined from its pieces inside the encoder task that compresses it.
    """

    def __init__(self, pieces: list[np.ndarray], axis: int):
        if not pieces:
            raise ValueError("TokenSegments needs at least one piece")
        self.pieces, self.axis = pieces, axis
        first = pieces[0]
        self.dtype, self.ndim = first.dtype, first.ndim
        self.shape = tuple(sum(p.shape[axis] for p in pieces) if i == axis else n
                           for i, n in enumerate(first.shape))
        self.size = int(np.prod(self.shape))

    def map(self, fn) -> "TokenSegments":
        return TokenSegments([fn(p) for p in self.pieces], self.axis)

    def __getitem__(self, sel: tuple[slice, ...]) -> np.ndarray:
        """A selection that spans the whole token axis (every chunk kvpipe writes does)."""
        tok = sel[self.axis]
        if (tok.start or 0) != 0 or (tok.stop is not None and tok.stop < self.shape[self.axis]):
            raise ValueError(f"a chunk must span the token axis; got {tok}")
        inner = sel[:self.axis] + (slice(None),) + sel[self.axis + 1:]
        parts = [p[inner] for p in self.pieces]
        return parts[0] if len(parts) == 1 else _join(parts, self.axis)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self.pieces[0] if len(self.pieces) == 1 else _join(self.pieces, self.axis)
        return out if dtype is None else out.astype(dtype)


def _join(parts: list[np.ndarray], axis: int) -> np.ndarray:
    """``np.concatenate`` without holding the GIL: numpy's concatenate copies with the GIL
    held, np.copyto releases it, so a dozen encoder threads joining chunks leave the GIL to
    the thread that launches the model's kernels."""
    shape = list(parts[0].shape)
    shape[axis] = sum(p.shape[axis] for p in parts)
    out = np.empty(shape, dtype=parts[0].dtype)
    at = 0
    for p in parts:
        index = (slice(None),) * axis + (slice(at, at + p.shape[axis]),)
        np.copyto(out[index], p)
        at += p.shape[axis]
    return out


def chunk_keys(shape: tuple[int, ...], chunks: tuple[int, ...]) -> list[tuple[str, tuple[slice, ...]]]:
    """(Zarr v3 default chunk key, selection) of every chunk: "c/1/2/0/0" for chunk (1, 2, 0, 0)."""
    grid = [range(-(-n // c)) for n, c in zip(shape, chunks)]
    return [("c/" + "/".join(map(str, idx)), tuple(slice(i * c, (i + 1) * c) for i, c in zip(idx, chunks)))
            for idx in product(*grid)]


def _write_one(path: Path, data: np.ndarray | TokenSegments, sel: tuple[slice, ...], codec: numcodecs.Blosc,
               transform=None) -> str:
    chunk = data[sel]  # joined here, in this thread
    encoded = codec.encode(np.ascontiguousarray(chunk if transform is None else transform(chunk)))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(encoded)
        while view:
            view = view[os.write(fd, view):]
        start_writeback(fd)
    finally:
        os.close(fd)
    return bytes_crc32c(encoded)


def write_chunks(array_dir: Path, data: np.ndarray | TokenSegments, chunks: tuple[int, ...],
                 codec: BloscCodec, transform=None) -> dict[str, str]:
    """Encode and write every chunk of ``data`` under ``array_dir``; returns each chunk file's
    CRC32C keyed by its path relative to ``array_dir``. Waits for all of them; making them
    durable is the caller's (``store.fs.sync_tree``, once per part). ``transform``: a coder of
    a whole chunk (pca's), run in the chunk's task before Blosc, with numpy's BLAS on one thread
    (``store.blas``: a pool of coders each starting a BLAS thread per core runs many times slower)."""
    blosc = blosc_of(codec)
    with one_blas_thread() if transform is not None else nullcontext():
        jobs = [(key, pool().submit(_write_one, array_dir / key, data, sel, blosc, transform))
                for key, sel in chunk_keys(data.shape, chunks)]
        return {key: fut.result() for key, fut in jobs}
