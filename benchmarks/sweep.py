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
  frame and object, reads inline), and the speed-up.

``--cold`` evicts the store's files from the page cache before each timed pass
(``posix_fadvise(DONTNEED)``, no root needed); without it reads come from a warm cache when
the store fits in memory.

    python -m kvpipe.benchmarks.sweep --out /tmp/kvpipe-sweep [--probe semantic-corr] [--repeat 3] [--cold]
    python -m kvpipe.benchmarks.sweep --probe temporal-corr --videos 3 --images 60 --layers 2 --heads 2 \
        --baseline --device cpu --json sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args
from kvpipe.probes import run_probe
from kvpipe.probes.device import resolve_device
from kvpipe.store import FeatureSetMeta, FeatureStore
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter


def build_store(out: Path, args: argparse.Namespace) -> Path:
    """Write the store part by part (random float32 -> bfloat16 on disk); skip if already complete."""
    g = args.grid
    n_tok = g * g
    n = args.images
    tasks = [args.probe]
    meta = FeatureSetMeta(
        model={"name": f"random-{args.layers}x{args.heads}x{args.head_dim}"},
        dataset={"name": f"bench-{args.probe}", "tasks": tasks, "images": n, "seed": args.seed},
        layers=tuple(range(args.layers)), heads=tuple(range(args.heads)), kinds=("keys", "values", "post_proj"),
        keys_rope="post-rope", n_layers=args.layers, n_kv_heads=args.heads, head_dim=args.head_dim,
        hidden_size=args.hidden, compute_dtype="bfloat16", store_dtype=args.store_dtype, template="none",
        prefix="", prefix_token_ids=(), image_token_id=0, part_size=args.part_size, n_images=n,
        image_ids_sha256=f"bench-{n}-{args.seed}")
    rng = np.random.default_rng(args.seed)
    sizes = [(int(rng.integers(280, 500)), int(rng.integers(330, 500))) for _ in range(n)]  # (h, w)
    ids = [f"img{i:04d}" for i in range(n)]
    structure: dict = {}
    masks: list[np.ndarray | None] = [None] * n
    groups = [("", -1)] * n
    if args.probe == "semantic-corr":
        pairs = []
        for _ in range(args.pairs):
            s, t = rng.choice(n, 2, replace=False)
            k = int(rng.integers(3, 16))
            (hs, ws), (ht, wt) = sizes[s], sizes[t]
            x0, y0 = rng.uniform(0, wt / 2), rng.uniform(0, ht / 2)
            pairs.append({"source": ids[s], "target": ids[t],
                          "source_kps": np.c_[rng.uniform(0, ws, k), rng.uniform(0, hs, k)].round(1).tolist(),
                          "target_kps": np.c_[rng.uniform(0, wt, k), rng.uniform(0, ht, k)].round(1).tolist(),
                          "target_bbox": [round(x0, 1), round(y0, 1), round(rng.uniform(x0 + 20, wt), 1),
                                          round(rng.uniform(y0 + 20, ht), 1)], "category": "bench"})
        structure = {"pairs": pairs}
    else:
        mh, mw = args.mask_size[1], args.mask_size[0]
        per = max(1, n // args.videos)
        groups = [(f"video{i // per:02d}", i % per) for i in range(n)]
        yy, xx = np.mgrid[:mh, :mw]
        for v in range(0, n, per):  # 2-3 elliptic objects per video, moving, annotated on every frame
            objs = [(rng.uniform(0.2, 0.8) * mh, rng.uniform(0.2, 0.8) * mw, rng.uniform(0.08, 0.25) * mh,
                     rng.uniform(0.08, 0.2) * mw, rng.normal(0, 2), rng.normal(0, 3))
                    for _ in range(int(rng.integers(2, 4)))]
            for i in range(v, min(v + per, n)):
                t = i - v
                m = np.zeros((mh, mw), np.uint8)
                for label, (cy, cx, ry, rx, vy, vx) in enumerate(objs, start=1):
                    m[((yy - cy - vy * t) / ry) ** 2 + ((xx - cx - vx * t) / rx) ** 2 <= 1] = label
                masks[i] = m
                sizes[i] = (mh, mw)
    writer = StoreWriter.create_or_resume(out, meta, structure)
    seg = json.dumps([{"name": "base", "offset": 0, "rows": g, "cols": g, "newline": False}])
    for part in writer.pending_parts():
        t0 = time.perf_counter()
        lo, hi = part * args.part_size, min((part + 1) * args.part_size, n)
        rows, mask_parts, mask_off = [], [], 0
        for j, i in enumerate(range(lo, hi)):
            m = masks[i]
            rows.append(ImageRow(index=i, image_id=ids[i], part=part, token_offset=j * n_tok, n_tokens=n_tok,
                                 grid_h=g, grid_w=g, segments=seg, image_h=sizes[i][0], image_w=sizes[i][1],
                                 source=f"random:{ids[i]}", group=groups[i][0], frame=groups[i][1],
                                 mask_offset=mask_off if m is not None else -1,
                                 mask_h=m.shape[0] if m is not None else 0, mask_w=m.shape[1] if m is not None else 0))
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
    return out


def drop_page_cache(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


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
               baseline: bool = False) -> tuple[dict[str, float], int]:
    """Seconds of one full sweep: total, inside ``FeatureStore.read`` (in the prefetch thread),
    waiting for reads, computing, in the nearest-neighbour search (semantic-corr), the rest; and
    the number of targets. ``baseline``: temporal-corr through the replaced code."""
    import kvpipe.probes.semantic_corr as sc
    import kvpipe.probes.temporal_corr as tc

    spent = {"read": 0.0, "search": 0.0}
    originals = (FeatureStore.read, sc.nearest_in_groups, sc.nearest_in_groups_torch, tc.VideoReference)

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
    if baseline:
        tc.VideoReference = _DilationReference
    try:
        t0 = time.perf_counter()
        run = run_probe(root, probe, params=params or {}, use_cache=False, device="numpy" if baseline else device,
                        prefetch=not baseline, save_predictions="none")  # the sweep alone
        total = time.perf_counter() - t0
    finally:
        FeatureStore.read, sc.nearest_in_groups, sc.nearest_in_groups_torch, tc.VideoReference = originals
    n_targets = len({(r["kind"], r["layer"], r["head"]) for r in run.table.to_pylist() if r["layer"] >= 0
                     or r["kind"] == "post_proj"})
    t = run.timings
    out = {"total_s": total, "read_s": spent["read"], "read_wait_s": t.get("read_wait_s", 0.0),
           "compute_s": t.get("compute_s", 0.0), "search_s": spent["search"]}
    out["rest_s"] = total - out["read_wait_s"] - out["compute_s"]
    if not t.get("read_s"):  # a probe that reads inside its compute: its reads are part of compute_s
        out["compute_s"] -= spent["read"]
        out["read_wait_s"] = spent["read"]
    return out, n_targets


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "parts").rglob("*") if p.is_file())


def mask_size(text: str) -> tuple[int, int]:
    w, h = (int(v) for v in text.lower().split("x"))
    return w, h


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("parts", "out", "device"))
    parser.add_argument("--probe", choices=("semantic-corr", "temporal-corr"), default="semantic-corr")
    parser.add_argument("--images", type=int, default=None,
                        help="images (default: 200 for semantic-corr; 1999 frames for temporal-corr, DAVIS-2017 val)")
    parser.add_argument("--grid", type=int, default=27, help="base grid side (27 x 27 = 729 tokens)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=3584, help="post-proj width")
    parser.add_argument("--store-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--pairs", type=int, default=1000, help="semantic-corr: keypoint pairs")
    parser.add_argument("--videos", type=int, default=30, help="temporal-corr: videos (images / videos frames each)")
    parser.add_argument("--mask-size", type=mask_size, default=(854, 480),
                        help="temporal-corr: frame and mask size WxH (default: 854x480, DAVIS 480p)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the store from the page cache before each pass")
    parser.add_argument("--no-raw-read", dest="raw_read", action="store_false",
                        help="skip timing the raw read of every (layer, head, kind)")
    parser.add_argument("--baseline", action="store_true",
                        help="temporal-corr: also time the replaced code (numpy float64 propagation and "
                             "upsampling, two disk dilations per frame and object, inline reads)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", default="auto",
                        help="semantic-corr: nearest-neighbour backends to time, comma list of "
                             "auto,numpy,faiss,faiss-gpu,torch (each a full sweep)")
    parser.set_defaults(out=Path("/tmp/kvpipe-sweep"), part_size=32)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    if args.images is None:
        args.images = 200 if args.probe == "semantic-corr" else 1999
    device = resolve_device(args.device)
    if args.probe == "semantic-corr":
        variants = [(b, {"search": b}, False) for b in comma_list(args.search)]
    else:
        variants = [("device", {}, False)] + ([("baseline", {}, True)] if args.baseline else [])

    t0 = time.perf_counter()
    root = build_store(args.out, args)
    build_s = time.perf_counter() - t0
    store = FeatureStore.open(root)
    n_tokens = sum(r.n_tokens for r in store.images())
    on_disk = disk_bytes(root)
    print(f"store {root}: {len(store.images())} images x {n_tokens // max(len(store.images()), 1)} tokens, "
          f"{args.layers} layers x {args.heads} KV heads x {args.head_dim}, {args.store_dtype}, "
          f"{on_disk / 2**30:.2f} GiB on disk (built/checked in {build_s:.0f} s); device {device}", flush=True)

    reads: list[float] = []
    sweeps: dict[str, list[dict[str, float]]] = {name: [] for name, _, _ in variants}
    n_targets, nbytes = 0, 0
    for i in range(args.repeat):
        if args.raw_read:
            if args.cold:
                drop_page_cache(root)
            t, nbytes = time_raw_read(root)
            reads.append(t)
            print(f"  run {i + 1}: raw read {t:.1f} s", flush=True)
        for name, params, baseline in (variants if i % 2 == 0 else variants[::-1]):  # alternate the order
            if args.cold:
                drop_page_cache(root)
            res, n_targets = time_sweep(root, args.probe, params, device, baseline)
            sweeps[name].append(res)
            print(f"  run {i + 1}, {name}: sweep {res['total_s']:.1f} s (reads {res['read_s']:.1f} s, waited for "
                  f"reads {res['read_wait_s']:.1f} s, compute {res['compute_s']:.1f} s, search {res['search_s']:.1f} s)",
                  flush=True)

    med = statistics.median
    n_chunks = 2 * args.layers * args.heads
    cache = "cold (evicted)" if args.cold else "warm page cache"
    per = lambda x: f"{1000 * x / max(n_targets, 1):.0f} ms"  # noqa: E731
    print()
    print(f"| what ({cache}, median of {args.repeat}, device {device}) | seconds | per target | throughput |")
    print("|---|---|---|---|")
    if reads:
        print(f"| raw read: {n_chunks} (layer, head, kind) + post-proj, all images | {med(reads):.1f} | "
              f"{1000 * med(reads) / (n_chunks + 1):.0f} ms | {nbytes / 2**30 / med(reads):.2f} GiB/s decoded, "
              f"{on_disk / 2**20 / med(reads):.0f} MiB/s from disk |")
    medians = {name: {k: med([r[k] for r in runs]) for k in runs[0]} for name, runs in sweeps.items()}
    for name, m in medians.items():
        label = f"{args.probe} sweep, {'search=' + name if args.probe == 'semantic-corr' else name}"
        print(f"| {label}: {n_targets} targets, tables + plots | {m['total_s']:.1f} | {per(m['total_s'])} | - |")
        print(f"| of which reads (FeatureStore.read; overlapped with compute where prefetched) | {m['read_s']:.1f} | "
              f"{per(m['read_s'])} | {100 * m['read_s'] / m['total_s']:.0f}% of the sweep |")
        print(f"| of which waiting for reads | {m['read_wait_s']:.1f} | {per(m['read_wait_s'])} | - |")
        print(f"| of which compute (search {m['search_s']:.1f} s) | {m['compute_s']:.1f} | {per(m['compute_s'])} | - |")
        print(f"| of which the rest (summary, table, plots) | {m['rest_s']:.1f} | {per(m['rest_s'])} | - |")
    speedup = None
    if "baseline" in sweeps:
        ratios = [b["total_s"] / d["total_s"] for b, d in zip(sweeps["baseline"], sweeps["device"])]
        speedup = med(ratios)
        print(f"\nspeed-up over the replaced code: {speedup:.1f} x (median of per-run ratios {[round(r, 2) for r in ratios]})")
    print(f"\nruns: reads {[round(x, 1) for x in reads]}, sweeps "
          f"{ {b: [round(r['total_s'], 1) for r in runs] for b, runs in sweeps.items()} }, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
    return finish(args, {"store": str(root), "probe": args.probe, "device": device, "disk_bytes": on_disk,
                         "build_s": build_s, "targets": n_targets, "images": len(store.images()),
                         "read_s": reads, "read_bytes": nbytes, "sweeps": sweeps, "medians": medians,
                         "speedup_over_baseline": speedup, "args": common.args_dict(args)})


if __name__ == "__main__":
    main()
