"""Exact nearest neighbours by inner product, searched within groups (one group = one image).

Why groups: correspondence probes look up every query (a source keypoint's token) among the
tokens of *its own* target image only. All queries of a score call are gathered first and
answered group by group, so a sweep makes one search per target image, not one per keypoint.

Backends (the results are the same up to exact ties):

* ``faiss-gpu``: one ``GpuIndexFlatIP`` reset and refilled per group; used by ``auto`` when the
  installed faiss sees a GPU (``faiss.get_num_gpus() > 0``).
* ``torch``: every group at once on the GPU: queries and bases padded into batches, one
  batched matrix product and argmax per batch of groups; used by ``auto`` when torch sees a
  CUDA device and no GPU build of faiss is installed (the faiss GPU wheels on PyPI need CUDA 12
  and numpy < 2, which a CUDA 13 torch install does not have). Exact, like the others.
* ``faiss``: CPU ``IndexFlatIP`` reset and refilled per group, with faiss's OpenMP pool set to
  one thread for the duration of the search (restored afterwards); used by ``auto`` on CPU.
  Each search is small (tens of queries x hundreds of tokens), so threads only add start-up
  and synchronisation; on a loaded 2-core machine (200 images x 9 keypoints x 729 tokens x 128
  dims per search call) one thread took 0.10 s against 1.8-2.4 s with two, and a multi-threaded
  pool left spinning also slowed later OpenBLAS products in the same process several-fold.
* ``numpy``: one BLAS matrix product + argmax per group (0.14 s single-threaded, 0.2-3 s
  with OpenBLAS's default threads on that loaded machine); for checking the others.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import numpy as np

from kvpipe.probes.logistic import device

BACKENDS = ("auto", "numpy", "faiss", "faiss-gpu", "torch")
_TORCH_BATCH_BYTES = 512 * 2**20  # padded bases per batch of groups (float32)


def l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """Rows divided by max(||row||, eps) in float32 (``torch.nn.functional.normalize``)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def resolve_backend(backend: str = "auto") -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend != "auto":
        return backend
    try:
        import faiss

        if faiss.get_num_gpus() > 0:
            return "faiss-gpu"
        cpu = "faiss"
    except (ImportError, AttributeError):
        cpu = "numpy"
    try:
        return "torch" if device() == "cuda" else cpu
    except ImportError:  # no torch: the CPU backends only
        return cpu


def nearest_in_groups(queries: np.ndarray, query_group: np.ndarray, bases: Sequence[np.ndarray],
                      backend: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """For each query i, the row of ``bases[query_group[i]]`` with the largest inner product.

    ``queries``: (Q, D); ``query_group``: (Q,) ints indexing ``bases``; ``bases``: arrays (N_g, D).
    Returns (index within its group's base, the inner product), both (Q,). Normalise rows
    beforehand for cosine similarity. Groups without queries are not searched.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    query_group = np.asarray(query_group, dtype=np.int64)
    if queries.ndim != 2 or query_group.shape != (queries.shape[0],):
        raise ValueError(f"queries {queries.shape} and query_group {query_group.shape} do not match")
    index = np.zeros(len(queries), dtype=np.int64)
    score = np.full(len(queries), -np.inf, dtype=np.float32)
    if not len(queries):
        return index, score
    order = np.argsort(query_group, kind="stable")
    groups, starts = np.unique(query_group[order], return_index=True)
    bounds = np.append(starts, len(order))
    kind = resolve_backend(backend)
    if kind == "torch":
        _torch_groups(queries, order, groups, bounds, bases, index, score)
        return index, score
    search = _numpy_search if kind == "numpy" else _FaissSearch(queries.shape[1], gpu=kind == "faiss-gpu")
    with _one_omp_thread(kind == "faiss"):
        for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
            sel = order[lo:hi]
            base = np.ascontiguousarray(bases[g], dtype=np.float32)
            if base.shape[0] == 0:
                raise ValueError(f"group {g} has queries but no base vectors")
            index[sel], score[sel] = search(queries[sel], base)
    return index, score


@contextmanager
def _one_omp_thread(active: bool) -> Iterator[None]:
    """faiss's OpenMP pool at one thread inside the block, as before after it."""
    if not active:
        yield
        return
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def _torch_groups(queries: np.ndarray, order: np.ndarray, groups: np.ndarray, bounds: np.ndarray,
                  bases: Sequence[np.ndarray], index: np.ndarray, score: np.ndarray) -> None:
    """Fill ``index``/``score`` for every group at once, on the GPU (``nearest_in_groups_torch``)."""
    import torch

    sizes = [len(bases[g]) for g in groups]
    if min(sizes) == 0:
        raise ValueError(f"group {groups[sizes.index(0)]} has queries but no base vectors")
    dev = device()
    group_start = np.zeros(len(bases) + 1, np.int64)
    group_start[1:] = np.cumsum([len(b) for b in bases])
    flat = torch.from_numpy(np.concatenate([np.asarray(b, np.float32) for b in bases])).to(dev)
    query_group = np.empty(len(order), np.int64)
    for g, lo, hi in zip(groups, bounds[:-1], bounds[1:]):
        query_group[order[lo:hi]] = g
    index[:], score[:] = nearest_in_groups_torch(torch.from_numpy(queries).to(dev), query_group, flat, group_start)


def nearest_in_groups_torch(queries, query_group: np.ndarray, bases, group_start: np.ndarray,
                            budget: int = _TORCH_BATCH_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """``nearest_in_groups`` with the vectors already in torch on their device: ``queries``
    (Q, D), ``bases`` (N, D) where group g is rows ``group_start[g]:group_start[g + 1]``.
    Groups are padded into batches of about ``budget`` bytes of bases: one ``bmm`` and argmax
    per batch. Returns (index within the group's base, inner product) on the host."""
    import torch

    dev, dim = queries.device, queries.shape[1]
    query_group = np.asarray(query_group, np.int64)
    index = np.zeros(len(query_group), np.int64)
    score = np.full(len(query_group), -np.inf, np.float32)
    if not len(query_group):
        return index, score
    order = np.argsort(query_group, kind="stable")
    groups, starts = np.unique(query_group[order], return_index=True)
    bounds = np.append(starts, len(order))
    sizes = (group_start[groups + 1] - group_start[groups]).astype(np.int64)
    if sizes.min() == 0:
        raise ValueError(f"group {groups[int(np.argmin(sizes))]} has queries but no base vectors")
    padded = torch.cat([bases, bases.new_zeros(1, dim)])  # the last row pads short groups
    start = 0
    while start < len(groups):  # batches of groups under the budget of padded bases
        stop, n_max = start, 0
        while stop < len(groups) and (stop == start or
                                      (stop + 1 - start) * max(n_max, sizes[stop]) * dim * 4 <= budget):
            n_max = max(n_max, int(sizes[stop]))
            stop += 1
        span = np.arange(start, stop)
        q_max = int((bounds[span + 1] - bounds[span]).max())
        cols = np.arange(n_max)[None, :]
        base_rows = np.where(cols < sizes[span, None], group_start[groups[span], None] + cols, len(bases))
        rows = order[bounds[start]:bounds[stop]]
        slot = np.concatenate([np.arange(bounds[i + 1] - bounds[i]) + j * q_max for j, i in enumerate(span)])
        slot_t = torch.from_numpy(slot).to(dev)
        q = queries.new_zeros(len(span) * q_max, dim)
        q[slot_t] = queries[torch.from_numpy(rows).to(dev)]
        sim = torch.bmm(q.view(len(span), q_max, dim), padded[torch.from_numpy(base_rows).to(dev)].transpose(1, 2))
        valid = torch.from_numpy(cols < sizes[span, None]).to(dev)
        sim = sim.masked_fill(~valid[:, None, :], float("-inf")).view(-1, n_max)[slot_t]
        best = sim.argmax(dim=1)
        index[rows] = best.cpu().numpy()
        score[rows] = sim.gather(1, best[:, None])[:, 0].float().cpu().numpy()
        start = stop
    return index, score


def _numpy_search(q: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sim = q @ base.T
    best = np.argmax(sim, axis=1)
    return best, sim[np.arange(len(q)), best]


class _FaissSearch:
    """One flat inner-product index, emptied and refilled for each group."""

    def __init__(self, dim: int, gpu: bool):
        import faiss

        if gpu:
            self._res = faiss.StandardGpuResources()  # keep alive as long as the index
            self.index = faiss.GpuIndexFlatIP(self._res, dim)
        else:
            self.index = faiss.IndexFlatIP(dim)

    def __call__(self, q: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.index.reset()
        self.index.add(base)
        dist, idx = self.index.search(q, 1)
        return idx[:, 0].astype(np.int64), dist[:, 0]
