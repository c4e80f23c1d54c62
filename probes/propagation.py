"""Label propagation for semi-supervised video object segmentation (DAVIS).

A port of facebookresearch/dino ``eval_video_segmentation.py`` (functions
``eval_video_tracking_davis``, ``label_propagation``, ``restrict_neighborhood``, ``norm_mask``,
``read_seg``/``to_one_hot``) to numpy, with the frame features supplied by the caller instead
of a ViT. The paper evaluates DAVIS "with the same method as semantic correspondence", i.e.
nearest neighbours between token features; DINO's protocol is that method for video.

Why each step is as it is (all from DINO):

* memory = first frame (with its ground-truth labels) + the ``n_last_frames`` most recent
  frames (with their *propagated soft* labels, not argmaxed);
* affinity ``exp(cos / T)`` between each target token and every memory token, zeroed outside a
  ``(2s+1) x (2s+1)`` spatial window around the target token's position (same window in every
  memory frame);
* top-k taken jointly over all memory frames' tokens (ties with the k-th value kept), the
  surviving affinities normalised to sum to one per target token, labels averaged with them.

DINO hard-codes the temperature to 0.1 (``torch.exp(torch.bmm(...) / 0.1)``); it is a
parameter here with that default.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Sequence

import numpy as np
from scipy import sparse

DINO_TEMPERATURE = 0.1  # eval_video_segmentation.py: label_propagation, "/ 0.1"
_QUERY_BLOCK_BYTES = 256 * 2**20  # affinity rows are computed in blocks of about this size


# ----------------------------------------------------------------------------------- propagation
def propagate_video(frame_features: Sequence[np.ndarray], first_labels: np.ndarray, *,
                    n_last_frames: int = 7, size_mask_neighborhood: int | tuple[int, int] | None = 12,
                    topk: int = 5, temperature: float = DINO_TEMPERATURE) -> list[np.ndarray]:
    """Propagate frame 0's labels through a video; soft label maps (h, w, C) for frames 1..T-1.

    Port of DINO ``eval_video_tracking_davis`` + ``label_propagation``. ``frame_features``: T
    arrays (h, w, D) on one token grid; ``first_labels``: (h, w, C) one-hot (C includes the
    background). ``size_mask_neighborhood``: the window's radius in tokens, one number for both
    axes as DINO's flag, or (rows, cols); an integer <= 0 (or None) disables the window, as in DINO.
    ``n_last_frames = 0`` keeps only the first frame in memory (DINO's ``queue.Queue(0)`` would
    be unbounded instead).
    """
    if len(frame_features) < 1:
        raise ValueError("propagate_video needs at least one frame")
    h, w, n_classes = first_labels.shape
    for t, f in enumerate(frame_features):
        if f.ndim != 3 or f.shape[:2] != (h, w):
            raise ValueError(f"frame {t} features have shape {f.shape}; expected ({h}, {w}, D) like the labels")
    if topk < 1 or n_last_frames < 0:
        raise ValueError(f"topk must be >= 1 and n_last_frames >= 0 (got {topk}, {n_last_frames})")
    feats = [_l2_normalise(f.reshape(h * w, -1)) for f in frame_features]
    first_seg = np.asarray(first_labels, dtype=np.float64).reshape(h * w, n_classes)
    window = None
    if isinstance(size_mask_neighborhood, (tuple, list)):
        window = neighborhood_mask(h, w, tuple(size_mask_neighborhood))
    elif size_mask_neighborhood is not None and size_mask_neighborhood > 0:
        window = neighborhood_mask(h, w, size_mask_neighborhood)
    memory: deque[tuple[np.ndarray, np.ndarray]] = deque(maxlen=n_last_frames)
    out = []
    for t in range(1, len(feats)):
        src_feats = [feats[0]] + [f for f, _ in memory]
        src_segs = [first_seg] + [s for _, s in memory]
        seg = propagate_frame(feats[t], src_feats, src_segs, window, topk=topk, temperature=temperature)
        if n_last_frames > 0:
            memory.append((feats[t], seg))
        out.append(seg.reshape(h, w, n_classes).astype(np.float32))
    return out


def propagate_frame(target: np.ndarray, sources: Sequence[np.ndarray], source_segs: Sequence[np.ndarray],
                    window: np.ndarray | None, *, topk: int, temperature: float) -> np.ndarray:
    """One step of DINO ``label_propagation``: labels (N, C) for ``target`` (N, D) tokens.

    ``sources``: L2-normalised (N, D) memory frames, ``source_segs`` their (N, C) labels,
    ``window``: (N, N) bool, True where a memory token is inside the target token's window.
    DINO forms ``A = exp(cos / T) * window``, keeps ``A >= (k-th largest A)`` per target token and
    normalises. Since exp is increasing and window-masked entries are 0, this selects the same
    entries as ``cos >= k-th largest windowed cos`` (ties kept, as DINO's ``aff < tk_val_min``);
    only those are exponentiated, as ``exp((cos - max cos) / T)``, a per-token rescaling that the
    normalisation cancels and that cannot overflow.
    """
    n = target.shape[0]
    n_frames = len(sources)
    src_t = np.concatenate(sources).astype(np.float64, copy=False).T  # (D, M*N), memory-frame major
    segs = np.concatenate(source_segs)  # (M*N, C), same order
    n_mem = n_frames * n
    k = min(topk, n_mem)
    block = max(1, _QUERY_BLOCK_BYTES // (8 * n_mem))
    out = np.empty((n, segs.shape[1]), dtype=np.float64)
    for start in range(0, n, block):  # blocks of target tokens, only to bound memory
        cos = target[start:start + block].astype(np.float64, copy=False) @ src_t  # (B, M*N)
        if window is not None:  # the same spatial window in every memory frame
            outside = np.broadcast_to(~window[start:start + block, None, :], (cos.shape[0], n_frames, n))
            np.copyto(cos.reshape(-1, n_frames, n), -np.inf, where=outside)
        rows, cols, vals = _top_k_with_ties(cos, k)
        weights = np.exp((vals - _row_max(rows, vals, cos.shape[0])[rows]) / temperature)
        aff = sparse.csr_matrix((weights, (rows, cols)), shape=cos.shape)
        out[start:start + block] = (aff @ segs) / np.asarray(aff.sum(axis=1))
    return out


# ------------------------------------------------------------------------- the device path
def propagate_videos_torch(videos: Sequence[Sequence[Any]], first_labels: Sequence[np.ndarray], *,
                           device: str, n_last_frames: int = 7,
                           size_mask_neighborhood: int | tuple[int, int] | None = 12, topk: int = 5,
                           temperature: float = DINO_TEMPERATURE, budget: int = 2**30,
                           defer_ties: bool | None = None) -> list[Any]:
    """``propagate_video`` of several videos at once, in torch on ``device``: soft labels per
    video as a tensor (T-1, h, w, C) on the device (C = that video's classes). A video's frames
    are (h, w, D) numpy arrays, or tensors (a read decoded on the device: nothing crosses the bus).

    Every video must be on one (h, w) grid (one window). The videos step through their frames
    together: at frame t the memory of every video still running is frame 0 and the same
    recent frames, so each step is one batched product (videos x target tokens x memory
    tokens), in float64 like the reference, in batches of about ``budget`` bytes. Top-k with
    ties, as ``propagate_frame``: ``torch.topk`` gives the k largest; a batch where some row
    has another entry equal to the k-th (or fewer than k inside the window) takes every entry
    >= the k-th instead, exactly the reference's rule. ``defer_ties`` (default: on a GPU) tests
    for such ties without waiting for the device and redoes the call with the test per block
    only if one occurred; a block with fewer than k entries inside the window is known from the
    window alone.
    """
    import torch

    if topk < 1 or n_last_frames < 0:
        raise ValueError(f"topk must be >= 1 and n_last_frames >= 0 (got {topk}, {n_last_frames})")
    if not videos:
        return []
    h, w, _ = first_labels[0].shape
    n = h * w
    for v, (frames, first) in enumerate(zip(videos, first_labels)):
        if first.shape[:2] != (h, w) or any(f.shape[:2] != (h, w) for f in frames):
            raise ValueError(f"video {v} is not on the ({h}, {w}) grid of the others")
    dev = torch.device(device)
    f64 = torch.float64
    order = sorted(range(len(videos)), key=lambda v: -len(videos[v]))  # running videos first
    lengths = [len(videos[v]) for v in order]
    t_max, dim = lengths[0], videos[order[0]][0].shape[-1]
    n_classes = max(int(f.shape[-1]) for f in first_labels)
    feats = torch.zeros(len(order), t_max, n, dim, dtype=f64, device=dev)
    segs = torch.zeros(len(order), t_max, n, n_classes, dtype=f64, device=dev)
    for j, v in enumerate(order):
        if torch.is_tensor(videos[v][0]):  # frames already on the device (a read decoded there)
            x = torch.stack([f.reshape(n, -1) for f in videos[v]]).to(dev, f64)
        else:
            x = torch.from_numpy(np.stack([np.asarray(f).reshape(n, -1) for f in videos[v]])).to(dev, f64)
        feats[j, : lengths[j]] = torch.nn.functional.normalize(x, dim=-1, p=2, eps=1e-12)
        segs[j, 0, :, : first_labels[v].shape[-1]] = torch.from_numpy(
            np.asarray(first_labels[v], dtype=np.float64).reshape(n, -1)).to(dev)
    window, reach = None, h  # reach: how many grid rows away a memory token can be in the window
    window_counts = None  # the window on the host, to count the entries inside it without the device
    if isinstance(size_mask_neighborhood, (tuple, list)):
        window_counts = neighborhood_mask(h, w, tuple(size_mask_neighborhood))
        reach = int(size_mask_neighborhood[0])
    elif size_mask_neighborhood is not None and size_mask_neighborhood > 0:
        window_counts = neighborhood_mask(h, w, size_mask_neighborhood)
        reach = int(size_mask_neighborhood)
    if window_counts is not None:
        window = torch.from_numpy(window_counts).to(dev)
    reach = max(0, min(reach, h))
    # on a GPU the tie test of each block (``_label_update``) would wait for the device: there it
    # is deferred, its flags kept on the device, and the propagation redone with the test per
    # block only where some row had a tie (one wait per call instead of two per block and frame)
    deferred = dev.type != "cpu" if defer_ties is None else defer_ties
    ties = torch.zeros((), dtype=torch.bool, device=dev) if deferred else None
    for t in range(1, t_max):
        running = sum(1 for length in lengths if length > t)
        lo_t = max(1, t - n_last_frames) if n_last_frames > 0 else t
        n_mem = 1 + (t - lo_t)
        k = min(topk, n_mem * n)
        # (V, M, N, D), (V, M, N, C): frame 0 and the recent frames, by slices (no index tensor)
        mem_feats = torch.cat([feats[:running, :1], feats[:running, lo_t:t]], dim=1)
        mem_segs = torch.cat([segs[:running, :1], segs[:running, lo_t:t]], dim=1)
        # target tokens in blocks of whole grid rows; a block compares with the memory rows its
        # window reaches only (a band of rows of every memory frame): the rest is outside anyway
        cost = lambda rows: 8 * 3 * rows * w * n_mem * min(h, rows + 2 * reach) * w  # noqa: E731
        block_rows = max(1, min(h, reach if window is not None else h))
        while block_rows > 1 and cost(block_rows) > budget:
            block_rows //= 2
        videos_per_batch = max(1, budget // cost(block_rows))
        inside_min: dict[int, int] = {}  # per block: the fewest window entries of a row, one memory frame
        for a in range(0, running, videos_per_batch):
            b = min(a + videos_per_batch, running)
            for r0 in range(0, h, block_rows):
                r1 = min(h, r0 + block_rows)
                lo, hi = max(0, r0 - reach), min(h, r1 + reach)
                band = slice(lo * w, hi * w)
                n_band = (hi - lo) * w
                src = mem_feats[a:b, :, band].reshape(b - a, n_mem * n_band, dim)
                cos = torch.bmm(feats[a:b, t, r0 * w: r1 * w], src.transpose(1, 2))  # (V, B, M * band)
                inside = n_mem * n_band  # the fewest entries inside the window of a row of the block
                if window is not None:
                    outside = ~window[r0 * w: r1 * w, band]  # the same window in every memory frame
                    cos.view(b - a, -1, n_mem, n_band).masked_fill_(outside[None, :, None, :], float("-inf"))
                    if r0 not in inside_min:
                        inside_min[r0] = int(window_counts[r0 * w: r1 * w, lo * w: hi * w].sum(1).min())
                    inside = n_mem * inside_min[r0]
                src_segs = mem_segs[a:b, :, band].reshape(b - a, n_mem * n_band, n_classes)
                kb = min(k, n_mem * n_band)
                if deferred:
                    segs[a:b, t, r0 * w: r1 * w] = _label_update_deferred(cos, src_segs, kb, temperature,
                                                                          inside >= kb, ties)
                else:
                    segs[a:b, t, r0 * w: r1 * w] = _label_update(cos, src_segs, kb, temperature)
    if deferred and bool(ties):  # the one wait: a tie somewhere, so the test per block, as on the CPU
        return propagate_videos_torch(videos, first_labels, device=device, n_last_frames=n_last_frames,
                                      size_mask_neighborhood=size_mask_neighborhood, topk=topk,
                                      temperature=temperature, budget=budget, defer_ties=False)
    out: list[Any] = [None] * len(videos)
    for j, v in enumerate(order):
        c = first_labels[v].shape[-1]
        out[v] = segs[j, 1: lengths[j], :, :c].reshape(lengths[j] - 1, h, w, c)
    return out


def _label_update_deferred(cos: Any, src_segs: Any, k: int, temperature: float, enough: bool, ties: Any) -> Any:
    """``_label_update`` without waiting for the device: the k largest alone when every row has
    at least k entries inside the window (``enough``, known from the window), their ties with the
    (k + 1)-th or-ed into ``ties`` (the caller redoes the propagation where one occurred); the
    dense rule of ``_label_update`` otherwise."""
    import torch

    n_mem = cos.shape[-1]
    if not enough:
        return _label_update(cos, src_segs, k, temperature, dense=True)
    vals, idx = cos.topk(min(k + 1, n_mem), dim=-1)
    if n_mem > k:
        ties |= (vals[..., k] >= vals[..., k - 1]).any()
    vals, idx = vals[..., :k], idx[..., :k]
    weights = torch.exp((vals - vals[..., :1]) / temperature)
    labels = torch.gather(src_segs[:, None].expand(-1, cos.shape[1], -1, -1), 2,
                          idx[..., None].expand(-1, -1, -1, src_segs.shape[-1]))
    return (weights[..., None] * labels).sum(2) / weights.sum(-1, keepdim=True)


def _label_update(cos: Any, src_segs: Any, k: int, temperature: float, dense: bool = False) -> Any:
    """Labels (V, B, C) from affinities ``cos`` (V, B, M*N, -inf outside the window) and the
    memory's labels (V, M*N, C): top-k with ties, ``exp((cos - max) / T)``, normalised.

    The k + 1 largest tell whether any row has an entry equal to its k-th (a tie the reference
    keeps) or fewer than k inside the window; only then (or with ``dense``) is the whole row
    looked at."""
    import torch

    n_mem = cos.shape[-1]
    vals, idx = cos.topk(min(k + 1, n_mem), dim=-1)
    kth = vals[..., k - 1: k]
    simple = not dense and bool(torch.isfinite(kth).all())
    if simple and n_mem > k:
        simple = bool((vals[..., k] < vals[..., k - 1]).all())
    if simple:  # the k entries alone
        vals, idx = vals[..., :k], idx[..., :k]
        weights = torch.exp((vals - vals[..., :1]) / temperature)
        labels = torch.gather(src_segs[:, None].expand(-1, cos.shape[1], -1, -1), 2,
                              idx[..., None].expand(-1, -1, -1, src_segs.shape[-1]))
        return (weights[..., None] * labels).sum(2) / weights.sum(-1, keepdim=True)
    kept = (cos >= kth) & torch.isfinite(cos)
    weights = torch.where(kept, torch.exp((cos - vals[..., :1]) / temperature), torch.zeros((), dtype=cos.dtype,
                                                                                          device=cos.device))
    return torch.bmm(weights, src_segs) / weights.sum(-1, keepdim=True)


def upsample_to_masks_torch(soft: Any, out_hw: tuple[int, int], budget: int = 2**30) -> np.ndarray:
    """``upsample_to_mask`` of frames (T, h, w, C) on their device, in float32: bilinear
    (``F.interpolate``, ``align_corners=False``, straight to ``out_hw``), ``norm_mask``, argmax;
    (T, H, W) uint8 labels on the host. Frames in batches of about ``budget`` bytes."""
    n_frames, _, _, c = soft.shape
    out = np.empty((n_frames, int(out_hw[0]), int(out_hw[1])), dtype=np.uint8)
    per = upsample_batch(c, out_hw, budget)
    for a in range(0, n_frames, per):
        out[a:a + per] = upsample_labels_torch(soft[a:a + per], out_hw).cpu().numpy()
    return out


def upsample_batch(n_classes: int, out_hw: tuple[int, int], budget: int) -> int:
    """How many frames ``upsample_labels_torch`` takes at once within about ``budget`` bytes."""
    return max(1, budget // (4 * 3 * n_classes * int(out_hw[0]) * int(out_hw[1])))


def upsample_labels_torch(soft: Any, out_hw: tuple[int, int]) -> Any:
    """Frames (T, h, w, C) -> (T, H, W) uint8 labels on their device (no host sync): bilinear in
    float32, ``norm_mask``, argmax (``upsample_to_masks_torch`` without the copy)."""
    import torch

    x = soft.permute(0, 3, 1, 2).to(torch.float32)
    big = torch.nn.functional.interpolate(x, size=tuple(int(v) for v in out_hw), mode="bilinear",
                                          align_corners=False)
    mn, mx = torch.aminmax(big.flatten(2), dim=-1)
    sel = mx > 0  # norm_mask, in place: classes with max > 0 to [0, 1] (0/0 -> NaN, as DINO)
    big.sub_(torch.where(sel, mn, 0)[..., None, None]).div_(torch.where(sel, mx - mn, 1)[..., None, None])
    return big.argmax(dim=1).to(torch.uint8)


def _top_k_with_ties(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Entries ``scores[r, c] >= k-th largest finite score of row r`` (all finite ones if fewer).

    DINO's ``topk`` + ``aff < tk_val_min`` rule. Done without partitioning whole rows: the k-th
    largest of G chunk maxima is a lower bound (k distinct entries reach it), so only entries
    above it are candidates, and the exact k-th value is found among those few.
    """
    n_rows, n_cols = scores.shape
    n_chunks = min(n_cols, max(16 * k, 64))
    chunk_max = np.maximum.reduceat(scores, np.linspace(0, n_cols, n_chunks, endpoint=False).astype(np.int64), axis=1)
    bound = np.partition(chunk_max, n_chunks - k, axis=1)[:, n_chunks - k] if n_chunks >= k else \
        np.full(n_rows, -np.inf)
    rows, cols = np.nonzero((scores >= bound[:, None]) & np.isfinite(scores))
    vals = scores[rows, cols]
    counts = np.bincount(rows, minlength=n_rows)
    width = max(int(counts.max(initial=0)), k)
    packed = np.full((n_rows, width), -np.inf)
    packed[rows, np.arange(rows.size) - np.repeat(np.cumsum(counts) - counts, counts)] = vals
    kth = np.partition(packed, width - k, axis=1)[:, width - k]
    keep = vals >= kth[rows]
    return rows[keep], cols[keep], vals[keep]


def _row_max(rows: np.ndarray, vals: np.ndarray, n_rows: int) -> np.ndarray:
    out = np.full(n_rows, -np.inf)
    np.maximum.at(out, rows, vals)
    return out


def neighborhood_mask(h: int, w: int, size: int | tuple[int, int]) -> np.ndarray:
    """(h*w, h*w) bool: |di| <= size and |dj| <= size (or (size_rows, size_cols)). DINO
    ``restrict_neighborhood``, vectorised."""
    size_r, size_c = (size, size) if isinstance(size, (int, np.integer)) else size
    rows = np.abs(np.arange(h)[:, None] - np.arange(h)[None, :]) <= size_r
    cols = np.abs(np.arange(w)[:, None] - np.arange(w)[None, :]) <= size_c
    return (rows[:, None, :, None] & cols[None, :, None, :]).reshape(h * w, h * w)


def _l2_normalise(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``F.normalize(x, dim=-1, p=2)``: x / max(||x||, eps)."""
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


# ------------------------------------------------------------------------------ first-frame mask
def labels_to_grid(mask: np.ndarray, grid_hw: tuple[int, int], n_classes: int) -> np.ndarray:
    """Integer mask (H, W) -> one-hot (h, w, C) on the token grid, the way DINO ``read_seg`` does.

    DINO reads the first annotation with ``PIL.Image.resize((w, h), 0)`` (nearest neighbour) and
    one-hots it (``to_one_hot``): *nearest* downsampling, not area/bilinear. The sampling
    positions reproduce Pillow's nearest resize. Labels outside ``[0, n_classes)`` (DAVIS void,
    255) become background, as the DAVIS-2017 evaluation does (``davis.py``: 255 -> 0).
    """
    small = resize_nearest(np.asarray(mask), grid_hw).astype(np.int64)
    small[(small < 0) | (small >= n_classes)] = 0
    return np.eye(n_classes, dtype=np.float32)[small]


def resize_nearest(mask: np.ndarray, out_hw: tuple[int, int]) -> np.ndarray:
    """Pillow ``Image.resize(size, NEAREST)`` for a 2-D array (Geometry.c ``ImagingScaleAffine``).

    Pillow samples source pixel ``int(x0 + 0.5*s + i*s)`` accumulated in double, ``s = in/out``.
    """
    ys = _pil_nearest_index(mask.shape[0], out_hw[0])
    xs = _pil_nearest_index(mask.shape[1], out_hw[1])
    return mask[ys[:, None], xs[None, :]]


def _pil_nearest_index(n_in: int, n_out: int) -> np.ndarray:
    scale = n_in / n_out
    pos = np.cumsum(np.r_[scale * 0.5, np.full(n_out - 1, scale)])  # sequential sum like the C loop
    return np.minimum(pos.astype(np.int64), n_in - 1)


# ---------------------------------------------------------------------------------- upsampling
def upsample_to_mask(soft: np.ndarray, out_hw: tuple[int, int], patch_size: int | None = None) -> np.ndarray:
    """Soft labels (h, w, C) -> integer mask (H, W): bilinear upsampling, ``norm_mask``, argmax.

    DINO ``eval_video_tracking_davis``: ``F.interpolate(scale_factor=patch_size, mode='bilinear',
    align_corners=False)``, ``norm_mask`` (per-class min-max), argmax, then a nearest resize to
    the annotation size. With ``patch_size`` that sequence is reproduced exactly; without it the
    bilinear resize goes straight to ``out_hw`` (same sampling rule, scale = in/out), which is the
    same thing when ``out_hw`` is an integer multiple of the grid and also works for other ratios.
    """
    h, w, _ = soft.shape
    if patch_size is not None:
        up = (h * patch_size, w * patch_size)
        scale = (1.0 / patch_size, 1.0 / patch_size)
    else:
        up, scale = tuple(out_hw), (h / out_hw[0], w / out_hw[1])
    wy = bilinear_matrix(h, up[0], scale[0])
    wx = bilinear_matrix(w, up[1], scale[1])
    # two matrix products (BLAS), rows then columns: (Y, x, C) then (X, x) @ (Y, x, C) -> (Y, X, C)
    big = np.matmul(wx, np.tensordot(wy, soft.astype(np.float64), axes=(1, 0)))
    labels = np.argmax(norm_mask(big), axis=-1)
    if tuple(labels.shape) != tuple(out_hw):
        labels = resize_nearest(labels, out_hw)
    return labels.astype(np.int64)


def bilinear_matrix(n_in: int, n_out: int, scale: float) -> np.ndarray:
    """(n_out, n_in) weights of PyTorch's 1-D linear interpolation with ``align_corners=False``.

    ``src = max(scale * (dst + 0.5) - 0.5, 0)``; neighbours ``floor(src)`` and the next one
    (clamped at the edge) -- aten ``area_pixel_compute_source_index`` / ``upsample_bilinear2d``.
    """
    src = np.maximum(scale * (np.arange(n_out) + 0.5) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    lam = src - i0
    m = np.zeros((n_out, n_in), dtype=np.float64)
    np.add.at(m, (np.arange(n_out), i0), 1.0 - lam)
    np.add.at(m, (np.arange(n_out), i1), lam)
    return m


def norm_mask(soft: np.ndarray) -> np.ndarray:
    """DINO ``norm_mask`` on (H, W, C): each class with max > 0 is shifted to min 0 and scaled to max 1.

    Kept because it changes the argmax (classes are rescaled independently). As in DINO, a class
    that is constant and positive becomes NaN (0/0); ``np.argmax`` then picks it, like torch.max.
    """
    out = soft.copy()
    mx = soft.max(axis=(0, 1))
    mn = soft.min(axis=(0, 1))
    sel = mx > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        out[..., sel] = (soft[..., sel] - mn[sel]) / (mx[sel] - mn[sel])
    return out
