"""Probe-sweep benchmark: a 7B-sized store of random features, the full sweep of one probe.

Builds (once; reused when --out already holds it) a store shaped like a Qwen2.5-VL-7B /
LLaVA-OneVision-7B extraction: N images x 729 image tokens (27 x 27 base grid), 28 layers x
4 KV heads x head_dim 128, keys + values + post-proj (hidden 3584), stored as bfloat16 with the
default lossless codec, 32 images per part -- and a synthetic dataset structure for the probe:

* semantic-corr: random keypoint pairs between the images (``--pairs`` pairs, 3-15 keypoints
  each, SPair-like image sizes);
* temporal-corr: ``--videos`` videos of N / videos frames with a first-frame object mask.

Then times (median of ``--repeat`` runs each):

* raw read: ``FeatureStore.read(kind, layer, head)`` of every image for every (layer, head,
  kind), plus post-proj -- what any sweep must at least do;
* the sweep: ``run_probe(store, probe, use_cache=False)`` over 28 x 4 x 2 targets + post-proj,
  tables and plots included, with the part of it spent inside ``FeatureStore.read``.

``--cold`` evicts the store's files from the page cache before each timed pass
(``posix_fadvise(DONTNEED)``, no root needed); without it reads come from a warm cache when
the store fits in memory.

    python -m kvpipe.benchmarks.sweep --out /tmp/kvpipe-sweep [--probe semantic-corr] [--repeat 3] [--cold]
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
        per = n // args.videos
        groups = [(f"video{i // per:02d}", i % per) for i in range(n)]
        for i in range(0, n, per):  # one object mask on each video's first frame
            h, w = sizes[i]
            m = np.zeros((h, w), np.uint8)
            m[h // 4: 3 * h // 4, w // 4: w // 2] = 1
            m[h // 3: 2 * h // 3, w // 2 + 10: 3 * w // 4] = 2
            masks[i] = m
            for j in range(i + 1, min(i + per, n)):
                sizes[j] = sizes[i]
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


def time_sweep(root: Path, probe: str, params: dict | None = None) -> tuple[float, float, float, int]:
    """(total seconds, seconds inside FeatureStore.read, seconds inside the nearest-neighbour
    search (semantic-corr), targets)."""
    import kvpipe.probes.semantic_corr as sc

    spent = {"read": 0.0, "search": 0.0}
    originals = (FeatureStore.read, sc.nearest_in_groups)

    def timer(fn, key):
        def timed(*a, **kw):
            t = time.perf_counter()
            try:
                return fn(*a, **kw)
            finally:
                spent[key] += time.perf_counter() - t
        return timed

    FeatureStore.read, sc.nearest_in_groups = timer(originals[0], "read"), timer(originals[1], "search")
    try:
        t0 = time.perf_counter()
        run = run_probe(root, probe, params=params or {}, use_cache=False)
        total = time.perf_counter() - t0
    finally:
        FeatureStore.read, sc.nearest_in_groups = originals
    n_targets = len({(r["kind"], r["layer"], r["head"]) for r in run.table.to_pylist() if r["layer"] >= 0
                     or r["kind"] == "post_proj"})
    return total, spent["read"], spent["search"], n_targets


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in (root / "parts").rglob("*") if p.is_file())


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("parts", "out"))
    parser.add_argument("--probe", choices=("semantic-corr", "temporal-corr"), default="semantic-corr")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--grid", type=int, default=27, help="base grid side (27 x 27 = 729 tokens)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=3584, help="post-proj width")
    parser.add_argument("--store-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    parser.add_argument("--pairs", type=int, default=1000, help="semantic-corr: keypoint pairs")
    parser.add_argument("--videos", type=int, default=20, help="temporal-corr: videos (images / videos frames each)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cold", action="store_true", help="evict the store from the page cache before each pass")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--search", default="auto",
                        help="semantic-corr: nearest-neighbour backends to time, comma list of "
                             "auto,numpy,faiss,faiss-gpu,torch (each a full sweep)")
    parser.set_defaults(out=Path("/tmp/kvpipe-sweep"), part_size=32)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    searches = comma_list(args.search) if args.probe == "semantic-corr" else [""]

    t0 = time.perf_counter()
    root = build_store(args.out, args)
    build_s = time.perf_counter() - t0
    store = FeatureStore.open(root)
    n_tokens = sum(r.n_tokens for r in store.images())
    on_disk = disk_bytes(root)
    print(f"store {root}: {len(store.images())} images x {n_tokens // max(len(store.images()), 1)} tokens, "
          f"{args.layers} layers x {args.heads} KV heads x {args.head_dim}, {args.store_dtype}, "
          f"{on_disk / 2**30:.2f} GiB on disk (built/checked in {build_s:.0f} s)", flush=True)

    reads: list[float] = []
    sweeps: dict[str, list[tuple[float, float, float]]] = {b: [] for b in searches}
    n_targets, nbytes = 0, 0
    for i in range(args.repeat):
        if args.cold:
            drop_page_cache(root)
        t, nbytes = time_raw_read(root)
        reads.append(t)
        print(f"  run {i + 1}: raw read {t:.1f} s", flush=True)
        for backend in searches:
            if args.cold:
                drop_page_cache(root)
            total, in_read, in_search, n_targets = time_sweep(root, args.probe, {"search": backend} if backend else {})
            sweeps[backend].append((total, in_read, in_search))
            print(f"  run {i + 1}, {backend or args.probe}: sweep {total:.1f} s (reads {in_read:.1f} s, "
                  f"search {in_search:.1f} s)", flush=True)

    med = statistics.median
    n_chunks = 2 * args.layers * args.heads
    cache = "cold (evicted)" if args.cold else "warm page cache"
    per = lambda x: f"{1000 * x / max(n_targets, 1):.0f} ms"  # noqa: E731
    print()
    print(f"| what ({cache}, median of {args.repeat}) | seconds | per target | throughput |")
    print("|---|---|---|---|")
    print(f"| raw read: {n_chunks} (layer, head, kind) + post-proj, all images | {med(reads):.1f} | "
          f"{1000 * med(reads) / (n_chunks + 1):.0f} ms | {nbytes / 2**30 / med(reads):.2f} GiB/s decoded, "
          f"{on_disk / 2**20 / med(reads):.0f} MiB/s from disk |")
    for backend, runs in sweeps.items():
        total, in_read, in_search = (med([r[k] for r in runs]) for k in range(3))
        label = f"{args.probe} sweep" + (f", search={backend}" if backend else "")
        print(f"| {label}: {n_targets} targets, tables + plots | {total:.1f} | {per(total)} | - |")
        print(f"| of which FeatureStore.read | {in_read:.1f} | {per(in_read)} | - |")
        if backend:
            print(f"| of which the nearest-neighbour search | {in_search:.1f} | {per(in_search)} | - |")
        rest = total - in_read - in_search
        print(f"| of which the rest (gather, normalise, PCK, table, plots) | {rest:.1f} | {per(rest)} | - |")
    print(f"\nruns: reads {[round(x, 1) for x in reads]}, sweeps "
          f"{ {b: [round(r[0], 1) for r in runs] for b, runs in sweeps.items()} }, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    return finish(args, {"store": str(root), "disk_bytes": on_disk, "build_s": build_s, "targets": n_targets,
                         "read_s": reads, "read_bytes": nbytes,
                         "sweeps": {b or args.probe: [dict(zip(("total_s", "read_s", "search_s"), r)) for r in runs]
                                    for b, runs in sweeps.items()}})


if __name__ == "__main__":
    main()
