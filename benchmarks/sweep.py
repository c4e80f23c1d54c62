"""Probe-sweep benchmark: a 7B-sized store of random features, the full sweep of one probe.

Builds (once; reused when --out already holds it) a store shaped like a Qwen2.5-VL-7B /
LLaVA-OneVision-7B extraction: N images x 729 image tokens (27 x 27 base grid), 28 layers x
4 KV heads x head_dim 128, keys + values + post-proj (hidden 3584), stored as bfloat16 with the
default lossless codec, 32 images per part -- and a synthetic dataset structure for the probe:

* semantic-corr (SPair-71k test shape): ``--pairs`` random keypoint pairs between the images
  (3-15 keypoints each, SPair-like image sizes); default 200 images, 1,000 pairs;
* temporal-corr (DAVIS-2017 val shape): ``--videos`` videos of N / videos frames of
  ``--mask-size`` (854x480) with 2-3 moving objects annotated on every frame (the metric's
  real work); default 30 videos, 1,999 frames.

Use ``--images``/``--videos``/``--pairs``/``--layers``/``--heads`` to scale down. Then times
(median of ``--repeat`` runs each, the variants alternating within each run):

* raw read: ``FeatureStore.read(kind, layer, head)`` of every image for every (layer, head,
  kind), plus post-proj -- what any sweep must at least do (``--no-raw-read`` skips it);
* the sweep: ``run_probe(store, probe, use_cache=False, device=--device)`` over every target,
  tables and plots included, split into reads (``FeatureStore.read``, in the prefetch thread),
  the time the sweep waited for them, compute, and the rest (summary rows, tables, plots);
* temporal-corr with ``--baseline``: the same sweep through the code this release replaced
  (numpy float64 propagation and upsampling, the boundary measure's two disk dilations per
  frame and object, reads inline), and the speed-up; cosegmentation with ``--baseline``: its
  image sets one after another, as before they ran one per core.

``--cold`` evicts the store's files from the page cache before each timed pass
(``posix_fadvise(DONTNEED)``, no root needed); without it reads come from a warm cache when
the store fits in memory.

    python -m kvpipe.benchmarks.sweep --out /tmp/kvpipe-sweep [--probe semantic-corr] [--repeat 3] [--cold]
    python -m kvpipe.benchmarks.sweep --probe temporal-corr --videos 3 --images 60 --layers 2 --heads 2 \
        --baseline --device cpu --json sweep.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, evict_files, finish, parse_args
from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.device import resolve_device
from kvpipe.probes.executor import ExecutorOptions, TargetCache
from kvpipe.probes.runner import results_dir
from kvpipe.raycluster import connect
from kvpipe.store import FeatureSetMeta, FeatureStore
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter


# ---------------------------------------------------------------- the datasets' shapes
@dataclass
class Shape:
    """What a probe reads besides the features: dataset.json's structure, per-image masks,
    groups (videos), manifest meta (labels, refs) and text queries."""

    structure: dict = field(default_factory=dict)
    sizes: list = field(default_factory=list)  # (h, w) per image
    masks: list = field(default_factory=list)  # uint8 (h, w) or None per image
    groups: list = field(default_factory=list)  # (group, frame) per image
    metas: list = field(default_factory=list)  # manifest meta per image
    queries: list = field(default_factory=list)  # text queries (their K/V are written too)


def _ellipses(h: int, w: int, objects, rng) -> np.ndarray:
    """A label mask of elliptic objects ``[(label, cy, cx, ry, rx)]`` (fractions of h, w)."""
    yy, xx = np.ogrid[:h, :w]
    m = np.zeros((h, w), np.uint8)
    for label, cy, cx, ry, rx in objects:
        m[((yy - cy * h) / (ry * h)) ** 2 + ((xx - cx * w) / (rx * w)) ** 2 <= 1] = label
    return m


def _blob(rng, label: int):
    return (label, rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.12, 0.3), rng.uniform(0.12, 0.3))


def _plain(n: int, rng, size=(280, 500)) -> Shape:
    sizes = [(int(rng.integers(size[0], size[1])), int(rng.integers(330, 500))) for _ in range(n)]
    return Shape(sizes=sizes, masks=[None] * n, groups=[("", -1)] * n, metas=[{}] * n)


def semantic_corr_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """SPair-71k test: ``--pairs`` keypoint pairs (3-15 keypoints each) between the images."""
    shape = _plain(n, rng)
    pairs = []
    for _ in range(args.pairs):
        s, t = rng.choice(n, 2, replace=False)
        k = int(rng.integers(3, 16))
        (hs, ws), (ht, wt) = shape.sizes[s], shape.sizes[t]
        x0, y0 = rng.uniform(0, wt / 2), rng.uniform(0, ht / 2)
        pairs.append({"source": ids[s], "target": ids[t],
                      "source_kps": np.c_[rng.uniform(0, ws, k), rng.uniform(0, hs, k)].round(1).tolist(),
                      "target_kps": np.c_[rng.uniform(0, wt, k), rng.uniform(0, ht, k)].round(1).tolist(),
                      "target_bbox": [round(x0, 1), round(y0, 1), round(rng.uniform(x0 + 20, wt), 1),
                                      round(rng.uniform(y0 + 20, ht), 1)], "category": "bench"})
    shape.structure = {"pairs": pairs}
    return shape


def temporal_corr_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """DAVIS-2017 val: ``--videos`` videos, 2-3 moving objects annotated on every frame."""
    mh, mw = args.mask_size[1], args.mask_size[0]
    per = max(1, n // args.videos)
    shape = Shape(sizes=[(mh, mw)] * n, masks=[None] * n, metas=[{}] * n,
                  groups=[(f"video{i // per:02d}", i % per) for i in range(n)])
    yy, xx = np.mgrid[:mh, :mw]
    for v in range(0, n, per):
        objs = [(rng.uniform(0.2, 0.8) * mh, rng.uniform(0.2, 0.8) * mw, rng.uniform(0.08, 0.25) * mh,
                 rng.uniform(0.08, 0.2) * mw, rng.normal(0, 2), rng.normal(0, 3))
                for _ in range(int(rng.integers(2, 4)))]
        for i in range(v, min(v + per, n)):
            t = i - v
            m = np.zeros((mh, mw), np.uint8)
            for label, (cy, cx, ry, rx, vy, vx) in enumerate(objs, start=1):
                m[((yy - cy - vy * t) / ry) ** 2 + ((xx - cx - vx * t) / rx) ** 2 <= 1] = label
            shape.masks[i] = m
    return shape


def fg_seg_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """Pascal-5i fold 0: 5 classes, one object of its class per image (label 1, 255 border
    ring), ``--episodes`` episodes of a query and 5 supports of its class."""
    shape = _plain(n, rng, (280, 500))
    classes = [1 + i % 5 for i in range(n)]
    for i, (h, w) in enumerate(shape.sizes):
        m = _ellipses(h, w, [_blob(rng, 1)], rng)
        m[:2], m[-2:], m[:, :2], m[:, -2:] = 255, 255, 255, 255
        shape.masks[i], shape.metas[i] = m, {"labels": {"1": classes[i]}}
    by_class = {c: [ids[i] for i in range(n) if classes[i] == c] for c in range(1, 6)}
    episodes = []
    for e in range(args.episodes):
        c = 1 + e % 5
        pool = by_class[c] or ids
        q = int(rng.integers(len(pool)))
        others = [x for j, x in enumerate(pool) if j != q] or pool  # tiny runs: supports may repeat
        support = rng.choice(len(others), 5, replace=len(others) < 5)
        episodes.append({"query": pool[q], "support": [others[j] for j in support], "class": c})
    shape.structure = {"classes": ["background", "aeroplane", "bicycle", "bird", "boat", "bottle"],
                       "episodes": episodes}
    return shape


def cosegmentation_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """MSRC (the co-segmentation subset): ``--sets`` image sets, each sharing one object class."""
    shape = _plain(n, rng, (200, 240))
    sets: dict = {}
    per = max(2, n // args.sets)
    for i in range(n):
        name = f"set{i // per:02d}"
        cls = 1 + i // per
        h, w = shape.sizes[i]
        shape.masks[i] = _ellipses(h, w, [_blob(rng, 1)], rng)
        shape.metas[i] = {"labels": {"1": cls}}
        shape.groups[i] = (name, i % per)
        sets.setdefault(name, {"images": [], "class": cls})["images"].append(ids[i])
    shape.structure = {"image_sets": sets}
    return shape


def semantic_seg_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """ImageNet-S: ``--classes`` classes plus background, one class-name query each, 1-2 classes
    per image on local labels ("labels" maps, as ImageNet-S masks are stored)."""
    shape = _plain(n, rng, (280, 500))
    for i, (h, w) in enumerate(shape.sizes):
        k = int(rng.integers(1, 3))
        cls = rng.choice(args.classes, k, replace=False) + 1
        shape.masks[i] = _ellipses(h, w, [_blob(rng, j + 1) for j in range(k)], rng)
        shape.metas[i] = {"labels": {str(j + 1): int(c) for j, c in enumerate(cls)}}
    shape.queries = [f"class {c}" for c in range(1, args.classes + 1)]
    shape.structure = {"classes": ["background", *shape.queries],
                       "class_queries": {str(c): c - 1 for c in range(1, args.classes + 1)}}
    return shape


def refexp_seg_shape(n: int, ids: list[str], args: argparse.Namespace, rng) -> Shape:
    """RefCOCO val: ``--sentences`` referring sentences over the images' objects (about 2.5
    referred objects per image, 2.8 sentences per object: 1,500 images, 10,834 sentences)."""
    shape = _plain(n, rng, (400, 640))
    per_image = max(1, round(args.sentences / n))
    for i, (h, w) in enumerate(shape.sizes):
        n_obj = int(rng.integers(1, 4))
        shape.masks[i] = _ellipses(h, w, [_blob(rng, j + 1) for j in range(n_obj)], rng)
        refs = []
        for j in range(per_image):
            label = 1 + j % n_obj
            if j < n_obj:
                refs.append({"label": label, "queries": []})
            refs[j % n_obj]["queries"].append(len(shape.queries))
            shape.queries.append(f"image {i} object {label} sentence {j}")
        shape.metas[i] = {"labels": {str(j + 1): 1 + j for j in range(n_obj)}, "refs": refs}
    return shape


SHAPES = {"semantic-corr": semantic_corr_shape, "temporal-corr": temporal_corr_shape, "fg-seg": fg_seg_shape,
          "cosegmentation": cosegmentation_shape, "semantic-seg": semantic_seg_shape,
          "refexp-seg": refexp_seg_shape}
TABLE1 = tuple(SHAPES)  # the paper's Table 1 tasks, in the order --probe all runs them
DEFAULT_IMAGES = {"semantic-corr": 200, "temporal-corr": 1999, "fg-seg": 346, "cosegmentation": 420,
                  "semantic-seg": 752, "refexp-seg": 1500}


def build_store(out: Path, args: argparse.Namespace, probe: str | None = None) -> Path:
    """Write the store part by part (random float32 -> bfloat16 on disk); skip if already complete."""
    probe = probe or args.probe
    g = args.grid
    n_tok = g * g
    n = args.images or DEFAULT_IMAGES[probe]
    rng = np.random.default_rng(args.seed)
    ids = [f"img{i:04d}" for i in range(n)]
    shape = SHAPES[probe](n, ids, args, rng)
    meta = FeatureSetMeta(
        model={"name": f"random-{args.layers}x{args.heads}x{args.head_dim}"},
        dataset={"name": f"bench-{probe}", "tasks": [probe], "images": n, "seed": args.seed},
        layers=tuple(range(args.layers)), heads=tuple(range(args.heads)), kinds=("keys", "values", "post_proj"),
        keys_rope="post-rope", n_layers=args.layers, n_kv_heads=args.heads, head_dim=args.head_dim,
        hidden_size=args.hidden, compute_dtype="bfloat16", store_dtype=args.store_dtype, template="none",
        prefix="", prefix_token_ids=(), image_token_id=0, part_size=args.part_size, n_images=n,
        image_ids_sha256=f"bench-{probe}-{n}-{args.seed}", text_queries=tuple(shape.queries))
    writer = StoreWriter.create_or_resume(out, meta, shape.structure)
    seg = json.dumps([{"name": "base", "offset": 0, "rows": g, "cols": g, "newline": False}])
    for part in writer.pending_parts():
        t0 = time.perf_counter()
        lo, hi = part * args.part_size, min((part + 1) * args.part_size, n)
        rows, mask_parts, mask_off = [], [], 0
        for j, i in enumerate(range(lo, hi)):
            m = shape.masks[i]
            h, w = m.shape if m is not None else shape.sizes[i]
            rows.append(ImageRow(index=i, image_id=ids[i], part=part, token_offset=j * n_tok, n_tokens=n_tok,
                                 grid_h=g, grid_w=g, segments=seg, image_h=h, image_w=w,
                                 source=f"random:{ids[i]}", group=shape.groups[i][0], frame=shape.groups[i][1],
                                 mask_offset=mask_off if m is not None else -1,
                                 mask_h=m.shape[0] if m is not None else 0, mask_w=m.shape[1] if m is not None else 0,
                                 meta=json.dumps(shape.metas[i])))
            if m is not None:
                mask_parts.append(m.ravel())
                mask_off += m.size
        t = (hi - lo) * n_tok
        prng = np.random.default_rng([args.seed, part])
        arrays = {kind: prng.standard_normal((args.layers, args.heads, t, args.head_dim), dtype=np.float32)
                  for kind in ("keys", "values")}
        arrays["post_proj"] = prng.standard_normal((t, args.hidden), dtype=np.float32)
        if mask_parts:
            arrays["masks"] = np.concatenate(mask_parts)
        writer.write_part(part, rows, arrays)
        del arrays
        print(f"  wrote part {part} ({hi - lo} images) in {time.perf_counter() - t0:.1f} s", flush=True)
    if shape.queries and not writer.text_committed():
        q = len(shape.queries)
        trng = np.random.default_rng([args.seed, 10**6])
        text = {kind: trng.standard_normal((args.layers, args.heads, q, args.head_dim), dtype=np.float32)
                for kind in ("keys", "values")}
        writer.write_text(list(shape.queries), [[0]] * q, text)
    return out


def time_raw_read(root: Path) -> tuple[float, int]:
    store = FeatureStore.open(root)
    meta = store.meta
    t0 = time.perf_counter()
    nbytes = 0
    for kind in ("keys", "values"):
        for layer in meta.layers:
            for head in meta.heads:
                nbytes += store.read(kind, layer, head).data.nbytes
    nbytes += store.read("post_proj").data.nbytes
    return time.perf_counter() - t0, nbytes


class _DilationReference:
    """The boundary measure as it was: no ground truth prepared, two disk dilations per frame and
    object (``evaluate_video_dilation``); stands in for ``VideoReference`` in the baseline."""

    def __init__(self, gt_masks, object_ids):
        self.gt, self.objects = list(gt_masks), list(object_ids)

    def evaluate(self, pred_masks):
        from kvpipe.probes.metrics.davis import evaluate_video_dilation

        return evaluate_video_dilation(self.gt, pred_masks, self.objects)


def time_sweep(root: Path, probe: str, params: dict | None = None, device: str = "auto",
               baseline: bool = False, executor: str = "local", options: ExecutorOptions | None = None,
               profile: bool = False):
    """Seconds of one full sweep: total, inside ``FeatureStore.read``, waiting for reads, computing,
    in the nearest-neighbour search (semantic-corr), the rest; the number of targets and the run.
    ``baseline``: temporal-corr through the replaced code; cosegmentation with its image sets one
    after another (the replaced code) instead of one per core. With ``executor="ray"`` reads and compute
    are the actors' seconds summed (they overlap across actors); the search is not split out.
    Locally each target's compute seconds are kept (the first carries the sweep's one-time
    preparation); ``profile``: the second target's compute under torch.profiler, its busiest
    operations as a table (where a GPU's time goes)."""
    import kvpipe.probes.cosegmentation as cs
    import kvpipe.probes.executor as ex
    import kvpipe.probes.semantic_corr as sc
    import kvpipe.probes.temporal_corr as tc

    spent = {"read": 0.0, "search": 0.0}
    originals = (FeatureStore.read, sc.nearest_in_groups, sc.nearest_in_groups_torch, tc.VideoReference,
                 cs.host_workers, ex.compute_target)
    real_compute = ex.compute_target
    per_target: list[float] = []
    profiled: dict[str, str] = {}

    def compute_target(probe_obj, target, data, cache):
        if profile and len(per_target) == 1:
            scores, seconds, profiled["table"] = profiled_compute(real_compute, probe_obj, target, data, cache)
        else:
            scores, seconds = real_compute(probe_obj, target, data, cache)
        per_target.append(seconds)
        return scores, seconds

    def timer(fn, key):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return timed

    FeatureStore.read, sc.nearest_in_groups = timer(originals[0], "read"), timer(originals[1], "search")
    sc.nearest_in_groups_torch = timer(originals[2], "search")  # returns on the host: synchronised
    ex.compute_target = compute_target
    if baseline:
        tc.VideoReference = _DilationReference
        cs.host_workers = lambda n: 1
    try:
        t0 = time.perf_counter()
        run = run_probe(root, probe, params=params or {}, use_cache=False, device="numpy" if baseline else device,
                        prefetch=not baseline, executor=executor, options=options,
                        save_predictions="none")  # the sweep alone
        total = time.perf_counter() - t0
    finally:
        (FeatureStore.read, sc.nearest_in_groups, sc.nearest_in_groups_torch, tc.VideoReference, cs.host_workers,
         ex.compute_target) = originals
    n_targets = len({(r["kind"], r["layer"], r["head"]) for r in run.table.to_pylist() if r["layer"] >= 0
                     or r["kind"] == "post_proj"})
    t = run.timings
    out = {"total_s": total, "read_s": t.get("read_s") or spent["read"], "read_wait_s": t.get("read_wait_s", 0.0),
           "compute_s": t.get("compute_s", 0.0), "search_s": spent["search"], "per_target_compute_s": per_target}
    if profiled:
        out["profile"] = profiled["table"]
    if executor == "local" and not t.get("read_s"):  # a probe that reads inside its compute
        out["compute_s"] -= spent["read"]
        out["read_wait_s"] = spent["read"]
    out["rest_s"] = max(0.0, total - out["read_wait_s"] - out["compute_s"]) if executor == "local" else \
        t.get("summary_s", 0.0)
    return out, n_targets, run


def profiled_compute(compute, probe_obj, target, data, cache):
    """``compute(...)`` under torch.profiler (CPU, and CUDA where the probe runs there): its
    scores, seconds and the 15 busiest operations by their own time on the device."""
    from torch.profiler import ProfilerActivity, profile

    on_gpu = str(getattr(probe_obj, "device", "")).startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else [])
    with profile(activities=activities) as prof:
        scores, seconds = compute(probe_obj, target, data, cache)
    table = prof.key_averages().table(sort_by="self_cuda_time_total" if on_gpu else "self_cpu_time_total",
                                      row_limit=15)
    return scores, seconds, table


def inner_product_flops(store: FeatureStore, probe: str, params: dict) -> tuple[float, str]:
    """FLOPs of the probe's inner products over the whole sweep (2 per multiply-add), a lower
    bound of its arithmetic, and how they were counted."""
    meta, rows = store.meta, store.images()
    s = store.structure()
    d, hidden = meta.head_dim, meta.hidden_size
    n_kv = 2 * len(meta.layers) * len(meta.heads)
    tokens = {r.image_id: r.n_tokens for r in rows}
    t_mean = float(np.mean(list(tokens.values())))

    def total(per_dim: float, baseline: bool = True) -> float:  # per_dim: multiply-adds per feature dimension
        return 2 * per_dim * (n_kv * d + (hidden if baseline else 0))

    if probe == "semantic-corr":
        n = sum(len(p["source_kps"]) * tokens[p["target"]] for p in s["pairs"])
        return total(n), "each source keypoint's token against every target token"
    if probe == "temporal-corr":
        memory = 1 + int(params.get("n_last_frames", 7))
        n = sum(r.n_tokens * min(r.frame, memory) * r.n_tokens for r in rows if r.frame > 0)
        return total(n), f"each frame's tokens against the first and last {memory - 1} frames (dense)"
    if probe == "fg-seg":
        iters = int(params.get("max_iter", 50))
        n = len(s["episodes"]) * (iters * 2 * 5 * t_mean + t_mean)
        return total(n), f"{iters} passes of two products over 5 supports' tokens per episode, then the query"
    if probe == "cosegmentation":
        n = sum(len(v["images"]) * t_mean * (1 + 2) for v in s["image_sets"].values())
        return total(n), "assigning every token to k = 1 and 2 centroids (the elbow loop's least; training left out)"
    if probe == "semantic-seg":
        n = sum(r.n_tokens * len(r.meta_dict().get("labels", {})) for r in rows)
        return total(n, False), "each image's tokens against its classes' query"
    if probe == "refexp-seg":
        n = sum(r.n_tokens * sum(len(ref["queries"]) for ref in r.meta_dict().get("refs", [])) for r in rows)
        return total(n, False), "each image's tokens against its sentences' queries"
    raise ValueError(probe)


def decoded_bytes(store: FeatureStore, probe: str) -> int:
    """Float32 bytes of the features one sweep decodes (every image, every target it scores)."""
    meta = store.meta
    n_tok = sum(r.n_tokens for r in store.images())
    kv = 2 * len(meta.layers) * len(meta.heads) * n_tok * meta.head_dim * 4
    text = probe in ("semantic-seg", "refexp-seg")
    return kv + (0 if text else n_tok * meta.hidden_size * 4)


def same_rows(a, b) -> bool:
    """Every row of two results tables equal (NaN equal to NaN)."""
    ra, rb = a.table.to_pylist(), b.table.to_pylist()
    return len(ra) == len(rb) and all(
        x.keys() == y.keys() and all(x[k] == y[k] or (isinstance(x[k], float) and isinstance(y[k], float)
                                                      and np.isnan(x[k]) and np.isnan(y[k])) for k in x)
        for x, y in zip(ra, rb))


def killer(seconds: float | None, killed: list[int]) -> Callable[[list[int]], None] | None:
    """``on_start`` for the Ray executor: SIGKILL the first actor ``seconds`` after the actors start
    (they run on this machine: a local Ray)."""
    if seconds is None:
        return None

    def on_start(pids: list[int]) -> None:
        def kill() -> None:
            try:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
            except ProcessLookupError:
                pass
        timer = threading.Timer(seconds, kill)
        timer.daemon = True
        timer.start()
    return on_start


def recomputed(root: Path, task: str) -> tuple[int, int]:
    """(computations, targets computed more than once) in the last sweep of ``task`` on the store
    (its per-target cache's journal; a sweep without the cache starts it empty)."""
    dirs = sorted((results_dir(root) / ".cache").glob(f"{task}-*.targets"))
    journal = [(j["kind"], j["layer"], j["head"]) for d in dirs for j in TargetCache(d).journal()]
    return len(journal), len(journal) - len(set(journal))


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "parts").rglob("*") if p.is_file())


def mask_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("parts", "out", "device"))
    parser.add_argument("--probe", choices=(*TABLE1, "all"), default="semantic-corr",
                        help="the probe to sweep, or all: the six Table 1 tasks one after another, each on its store")
    parser.add_argument("--images", type=int, default=None,
                        help="images (default: the dataset's: " + ", ".join(f"{k} {v}" for k, v in DEFAULT_IMAGES.items())
                        + ")")
    parser.add_argument("--grid", type=int, default=27, help="base grid side (27 x 27 = 729 tokens)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=3584, help="post-proj width")
    parser.add_argument("--store-dtype", default="bfloat16",
                        choices=("bfloat16", "float16", "float32", "int8", "int4", "pca"))
    parser.add_argument("--pairs", type=int, default=1000, help="semantic-corr: keypoint pairs")
    parser.add_argument("--videos", type=int, default=30, help="temporal-corr: videos (images / videos frames each)")
    parser.add_argument("--mask-size", type=mask_size, default=(854, 480),
                        help="temporal-corr: frame and mask size WxH (default: 854x480, DAVIS 480p)")
    parser.add_argument("--episodes", type=int, default=1000, help="fg-seg: episodes (Pascal-5i fold 0: 1,000)")
    parser.add_argument("--sets", type=int, default=14, help="cosegmentation: image sets (MSRC: 14 of 30 images)")
    parser.add_argument("--classes", type=int, default=50, help="semantic-seg: classes (ImageNet-S-50: 50)")
    parser.add_argument("--sentences", type=int, default=10834,
                        help="refexp-seg: referring sentences (RefCOCO val: 10,834 over 1,500 images)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the store from the page cache before each pass")
    parser.add_argument("--no-raw-read", dest="raw_read", action="store_false",
                        help="skip timing the raw read of every (layer, head, kind)")
    parser.add_argument("--baseline", action="store_true",
                        help="temporal-corr: also time the replaced code (numpy float64 propagation and "
                             "upsampling, two disk dilations per frame and object, inline reads); "
                             "cosegmentation: the image sets one after another")
    parser.add_argument("--host-decode", action="store_true",
                        help="also time the sweep with features decoded on the host, not on the probe's GPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", default="auto",
                        help="semantic-corr: nearest-neighbour backends to time, comma list of "
                             "auto,numpy,faiss,faiss-gpu,torch (each a full sweep)")
    parser.add_argument("--executor", default="local",
                        help="comma list of local,ray: each a full sweep; with both, every row of the two "
                             "results tables is checked equal and the ratio reported")
    parser.add_argument("--workers", type=int, default=None,
                        help="Ray actors (default: the cluster's GPUs, or 2 on CPU)")
    parser.add_argument("--ray-address", default=None, help="a running Ray cluster (default: a local one)")
    parser.add_argument("--kill-one-after", type=float, default=None, metavar="SECONDS",
                        help="ray: SIGKILL one actor this long after the actors start; the sweep must finish "
                             "with the same rows and recompute no finished target")
    parser.add_argument("--profile", action="store_true",
                        help="profile the second target's compute of the first sweep (torch.profiler): the "
                             "busiest operations, on the GPU where the probe runs there")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="assumed device peak for the arithmetic floor (default: 60 on a GPU -- an H100's "
                             "FP64 tensor / FP32 peak is 67 -- and 0.1 on the CPU)")
    parser.set_defaults(out=Path("/tmp/kvpipe-sweep"), part_size=32)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    device = resolve_device(args.device)
    executors = comma_list(args.executor)
    bad = [e for e in executors if e not in ("local", "ray")]
    if bad:
        raise UsageError(f"--executor {args.executor}: {', '.join(bad)} is not local or ray")
    if args.kill_one_after is not None and "ray" not in executors:
        raise UsageError("--kill-one-after kills a Ray actor: add ray to --executor")
    started = connect(args.ray_address) if "ray" in executors else False
    probes = list(TABLE1) if args.probe == "all" else [args.probe]
    try:
        results = {p: bench_probe(p, args, device, executors) for p in probes}
    finally:
        if started:
            import ray

            ray.shutdown()
    if len(probes) > 1:
        print(f"\n| all six Table 1 tasks for one model ({device}) | targets | sweep seconds |")
        print("|---|---|---|")
        sums = {}
        for e in executors:
            secs = {p: r["medians"].get(r["local"] if e == "local" else e, {}).get("total_s", 0.0)
                    for p, r in results.items()}
            sums[e] = sum(secs.values())
            for p, v in secs.items():
                print(f"| {p} ({e}) | {results[p]['targets']} | {v:.1f} |")
            print(f"| **sum ({e})** | {sum(r['targets'] for r in results.values())} | **{sums[e]:.1f}** |")
        out = {"probes": results, "sum_s": sums, "device": device, "args": common.args_dict(args)}
    else:
        out = results[probes[0]]
    return finish(args, out)


FULL_7B_TARGETS = 225  # 28 layers x 4 KV heads x (keys, values) + post-proj


def projected_sweep(res: dict, n_targets: int, targets: int) -> float:
    """Seconds of a sweep of ``targets`` targets from one of ``n_targets``: every target reads and
    scores the whole dataset, so the first target's compute (with the sweep's one-time
    preparation), then the median of the others' for each further target, the reads waited for
    per target, and the rest (summary, tables, plots) as measured."""
    each = res["per_target_compute_s"]
    return (each[0] + (targets - 1) * statistics.median(each[1:])
            + targets * res["read_wait_s"] / max(n_targets, 1) + res["rest_s"])


@contextlib.contextmanager
def decoded_on_host(on: bool):
    """Probes read features decoded on the host, as before ``Probe.decode_on`` (when ``on``)."""
    if not on:
        yield
        return
    from kvpipe.probes.base import Probe

    before = Probe.decode_on
    Probe.decode_on = lambda self: None
    try:
        yield
    finally:
        Probe.decode_on = before


def bench_probe(probe: str, args: argparse.Namespace, device: str, executors: list[str]) -> dict:
    """Build (or reuse) the probe's store, time its sweeps, return the figures."""
    if probe == "semantic-corr":
        variants = [(b, {"search": b}, False, "local") for b in comma_list(args.search)]
    else:
        variants = [("device", {}, False, "local")] + ([("baseline", {}, True, "local")]
                                                       if args.baseline and probe in ("temporal-corr", "cosegmentation") else [])
    if args.host_decode:  # the same sweep with every target decoded on the host (before device decoding)
        variants.append(("host-decode", dict(variants[0][1]), False, "local"))
    if "local" not in executors:
        variants = []
    if "ray" in executors:
        variants.append(("ray", {"search": comma_list(args.search)[0]} if probe == "semantic-corr" else {}, False,
                         "ray"))
    root = args.out / probe if args.probe == "all" else args.out
    t0 = time.perf_counter()
    build_store(root, args, probe)
    build_s = time.perf_counter() - t0
    store = FeatureStore.open(root)
    n_images = len(store.images())
    n_tokens = sum(r.n_tokens for r in store.images())
    on_disk = disk_bytes(root)
    print(f"{probe}: store {root}: {n_images} images x {n_tokens // max(n_images, 1)} tokens, "
          f"{args.layers} layers x {args.heads} KV heads x {args.head_dim}, {args.store_dtype}, "
          f"{on_disk / 2**30:.2f} GiB on disk (built/checked in {build_s:.0f} s); device {device}", flush=True)

    reads: list[float] = []
    sweeps: dict[str, list[dict[str, float]]] = {name: [] for name, *_ in variants}
    checks: list[dict] = []
    n_targets, nbytes = 0, 0
    for i in range(args.repeat):
        if args.raw_read:
            if args.cold:
                evict_files(root)
            t, nbytes = time_raw_read(root)
            reads.append(t)
            print(f"  run {i + 1}: raw read {t:.1f} s", flush=True)
        runs = {}
        for name, params, baseline, executor in (variants if i % 2 == 0 else variants[::-1]):
            if args.cold:
                evict_files(root)
            killed: list[int] = []
            options = ExecutorOptions(workers=args.workers, address=args.ray_address,
                                      on_start=killer(args.kill_one_after, killed)) if executor == "ray" else None
            with decoded_on_host(name == "host-decode"):
                res, n_targets, run = time_sweep(root, probe, params, device, baseline, executor, options,
                                                 profile=args.profile and i == 0 and name == variants[0][0])
            runs[name] = run
            sweeps[name].append(res)
            print(f"  run {i + 1}, {name}: sweep {res['total_s']:.1f} s (reads {res['read_s']:.1f} s, waited for "
                  f"reads {res['read_wait_s']:.1f} s, compute {res['compute_s']:.1f} s, search {res['search_s']:.1f} s)",
                  flush=True)
            if res["per_target_compute_s"]:
                each = res["per_target_compute_s"]
                later = f", then median {statistics.median(each[1:]):.3f} s" if len(each) > 1 else ""
                print(f"    compute per target: first {each[0]:.3f} s{later}", flush=True)
                if len(each) > 1:
                    res["projected_s"] = projected_sweep(res, n_targets, FULL_7B_TARGETS)
                    print(f"    {FULL_7B_TARGETS} targets (a 7B model): {res['projected_s'] / 60:.1f} min = first "
                          f"target + {FULL_7B_TARGETS - 1} x the median + reads waited for and the rest, scaled",
                          flush=True)
            if res.get("profile"):
                print(f"    profile of the second target's compute:\n{res['profile']}", flush=True)
            if executor == "ray":
                computations, twice = recomputed(root, probe)
                checks.append({"killed_pids": killed, "computations": computations, "recomputed": twice})
                if killed:
                    print(f"    killed actor pid {killed[0]}; {computations} computations, {twice} targets "
                          f"computed twice", flush=True)
        local = next((name for name, *_, e in variants if e == "local"), None)
        if "ray" in runs and local in runs:
            checks[-1]["identical_rows"] = same_rows(runs[local], runs["ray"])
            print(f"    every row of the ray and local tables identical: {checks[-1]['identical_rows']}", flush=True)

    med = statistics.median
    n_chunks = 2 * args.layers * args.heads
    cache = "cold (evicted)" if args.cold else "warm page cache"
    per = lambda x: f"{1000 * x / max(n_targets, 1):.0f} ms"  # noqa: E731
    flops, counted = inner_product_flops(store, probe, {})
    peak = args.peak_tflops or (60.0 if device.startswith("cuda") else 0.1)
    floors = {"flops": flops, "flops_counted": counted, "peak_tflops": peak, "arithmetic_s": flops / (peak * 1e12),
              "decoded_bytes": decoded_bytes(store, probe)}
    if reads:
        floors["read_gib_s"] = nbytes / 2**30 / med(reads)
        floors["bandwidth_s"] = floors["decoded_bytes"] / (nbytes / med(reads))
    print()
    print(f"| {probe} ({cache}, median of {args.repeat}, device {device}) | seconds | per target | floor / note |")
    print("|---|---|---|---|")
    if reads:
        print(f"| raw read: {n_chunks} (layer, head, kind) + post-proj, all images | {med(reads):.1f} | "
              f"{1000 * med(reads) / (n_chunks + 1):.0f} ms | {floors['read_gib_s']:.2f} GiB/s decoded, "
              f"{on_disk / 2**20 / med(reads):.0f} MiB/s from disk |")
    medians = {name: {k: med([r[k] for r in runs]) for k in runs[0]} for name, runs in sweeps.items() if runs}
    for name, m in medians.items():
        label = f"{probe} sweep, {'search=' + name if probe == 'semantic-corr' and name not in ('ray', 'host-decode') else name}"
        print(f"| {label}: {n_targets} targets, tables + plots | {m['total_s']:.1f} | {per(m['total_s'])} | "
              f"floor {max(floors['arithmetic_s'], floors.get('bandwidth_s', 0.0)):.2f} s |")
        print(f"| of which reads (FeatureStore.read{'; actors summed' if name == 'ray' else ''}) | {m['read_s']:.1f} | "
              f"{per(m['read_s'])} | bandwidth floor {floors.get('bandwidth_s', float('nan')):.2f} s "
              f"({floors['decoded_bytes'] / 2**30:.2f} GiB decoded at the raw read's rate) |")
        print(f"| of which waiting for reads | {m['read_wait_s']:.1f} | {per(m['read_wait_s'])} | - |")
        print(f"| of which compute{' (actors summed)' if name == 'ray' else ''} | {m['compute_s']:.1f} | "
              f"{per(m['compute_s'])} | arithmetic floor {floors['arithmetic_s']:.3f} s ({flops / 1e12:.2f} TFLOP "
              f"at an assumed {peak:g} TFLOP/s: {counted}) |")
        print(f"| of which the rest (summary, table, plots) | {m['rest_s']:.1f} | {per(m['rest_s'])} | - |")
    speedup = ray_ratio = None
    if "baseline" in sweeps and sweeps["baseline"]:
        ratios = [b["total_s"] / d["total_s"] for b, d in zip(sweeps["baseline"], sweeps["device"])]
        speedup = med(ratios)
        print(f"\nspeed-up over the replaced code: {speedup:.1f} x (median of per-run ratios {[round(r, 2) for r in ratios]})")
    local = next((name for name, *_, e in variants if e == "local"), None)
    if sweeps.get("ray") and local:
        ray_ratio = med([d["total_s"] / r["total_s"] for d, r in zip(sweeps[local], sweeps["ray"])])
        print(f"\nray / local: the Ray sweep is {ray_ratio:.2f} x as fast as the local one (median of per-run ratios)")
    print(f"\nruns: reads {[round(x, 1) for x in reads]}, sweeps "
          f"{ {b: [round(r['total_s'], 1) for r in runs] for b, runs in sweeps.items()} }, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return {"store": str(root), "probe": probe, "device": device, "disk_bytes": on_disk, "build_s": build_s,
            "targets": n_targets, "images": n_images, "read_s": reads, "read_bytes": nbytes, "sweeps": sweeps,
            "medians": medians, "local": local, "floors": floors, "speedup_over_baseline": speedup, "ray_speedup": ray_ratio,
            "ray_checks": checks, "args": common.args_dict(args)}


if __name__ == "__main__":
    main()
