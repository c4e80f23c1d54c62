"""Reads of one (layer, head, kind) per store encoding, against the raw read of the lossless files.

A probe reads one (layer, head, kind) across the whole store for every target. This script
builds one store per encoding (``--encodings``: bfloat16, int8, int4) with the same random
features (``benchmarks.sweep.build_store``: 7B width, 27 x 27 tokens, head_dim 128), then times,
alternating, ``FeatureStore.read`` of one target on each store and the plain file read of each
store's chunk files of that target ("raw E": the disk's floor for E), cold and warm. Each store is
opened once and read once untimed, as a sweep reads its later targets; cold, the target's files
are evicted from the page cache before each read (``--cold-mode files``; ``all`` empties the
whole cache, root only, which also evicts the process's code and libraries, a cost a running
sweep does not pay and the raw read hardly meets). int4 is also read in its stored (rotated)
basis, as the rotation-invariant probes read it (``basis="stored"``: no inverse rotation).
Figures are images per second, and the ratio of each encoding's read to the raw read of the
lossless files: what "decoding a smaller encoding keeps up with the disk" means.

    python -m kvpipe.benchmarks.encoded_reads --out /tmp/kvpipe-reads --images 192 --repeats 5
    python -m kvpipe.benchmarks.encoded_reads ... --device cuda   # also read to the GPU, decoded there
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import args_dict, comma_list, drop_page_cache, evict_files, finish, parse_args
from kvpipe.store import FeatureStore


STORED = " (stored basis)"  # a read of int4 left rotated (FeatureStore.read(..., basis="stored"))
COLD_MODES = ("files", "all")


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("parts", "out"))
    parser.set_defaults(out=Path("/tmp/kvpipe-encoded-reads"))
    parser.add_argument("--encodings", default="bfloat16,int8,int4",
                        help="comma list of store encodings; bfloat16 (the lossless reference) always included")
    parser.add_argument("--images", type=int, default=192)
    parser.add_argument("--grid", type=int, default=27, help="base grid side (27 x 27 = 729 tokens)")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-cold", dest="cold", action="store_false",
                        help="warm reads only (leave the machine's page cache alone)")
    parser.add_argument("--cold-mode", choices=COLD_MODES, default="files",
                        help="files: evict the target's files from the page cache before each cold read "
                             "(what a sweep's next target meets; no root needed); all: empty the whole "
                             "page cache, the process's code and libraries included (root)")
    parser.add_argument("--device", default=None,
                        help="also time each encoding read to this torch device and decoded there "
                             "(FeatureStore.read(device=...), what a GPU probe does), e.g. cuda")
    return parser


def build(out: Path, encoding: str, args: argparse.Namespace) -> Path:
    """One store of ``encoding``, built by the probe-sweep benchmark's writer (same seed: same features)."""
    from kvpipe.benchmarks import sweep

    store_args = parse_args(sweep.get_args_parser(), [
        "--probe", "semantic-corr", "--images", str(args.images), "--grid", str(args.grid),
        "--layers", str(args.layers), "--heads", str(args.heads), "--head-dim", str(args.head_dim),
        "--hidden", "64", "--part-size", str(args.part_size), "--store-dtype", encoding])
    return sweep.build_store(out / encoding, store_args, "semantic-corr")


def chunk_files(root: Path, kind: str, layer: int, head: int) -> list[Path]:
    """The chunk files that hold one (layer, head, kind): one per part."""
    return sorted((root / "parts").glob(f"*/{kind}/c/{layer}/{head}/*/*"))


def time_store_read(store: FeatureStore, kind: str, layer: int, head: int, device: str | None = None,
                    basis: str = "model") -> float:
    t0 = time.perf_counter()
    data = store.read(kind, layer, head, device=device, basis=basis).data
    if device is not None and device.startswith("cuda"):
        import torch

        torch.cuda.synchronize(data.device)
    return time.perf_counter() - t0


def time_raw_read(files: list[Path]) -> float:
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            fh.read()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    encodings = ["bfloat16"] + [e for e in comma_list(args.encodings) if e != "bfloat16"]
    roots = {e: build(args.out, e, args) for e in encodings}
    kind, layer, head = "values", args.layers // 2, 0
    files = {e: chunk_files(roots[e], kind, layer, head) for e in encodings}
    cold_ok = args.cold and (args.cold_mode == "files" or drop_page_cache())
    modes = ["cold", "warm"] if cold_ok else ["warm"]
    every_file = [f for fs in files.values() for f in fs]
    # each store opened once, as a sweep opens it for all its targets
    stores = {e: FeatureStore.open(root) for e, root in roots.items()}
    # "raw E": the plain read of encoding E's files, the disk's floor for reading E
    reads = ([f"raw {e}" for e in encodings] + encodings + [f"{e}{STORED}" for e in encodings if e == "int4"]
             + ([f"{e} to {args.device}" for e in encodings] if args.device else []))
    times: dict[str, dict[str, list[float]]] = {m: {e: [] for e in reads} for m in modes}

    def timed(name: str, cold: bool) -> float:
        if cold and args.cold_mode == "files":
            evict_files(every_file)
        elif cold:
            drop_page_cache()
        if name.startswith("raw "):
            return time_raw_read(files[name.removeprefix("raw ")])
        encoding, _, device = name.partition(" to ")
        basis = "stored" if encoding.endswith(STORED) else "model"
        return time_store_read(stores[encoding.removesuffix(STORED)], kind, layer, head, device or None, basis)

    for name in reads:  # a first read of each: the stores' lazy state and the device's first use
        timed(name, False)

    for mode in modes:
        cold = mode == "cold"
        for r in range(args.repeats):
            for name in (reads if r % 2 == 0 else reads[::-1]):
                times[mode][name].append(timed(name, cold))
    sizes = {e: sum(f.stat().st_size for f in files[e]) for e in encodings}
    table = {}
    print(f"\none (layer, head, kind) of {args.images} images x {args.grid ** 2} tokens x {args.head_dim}, "
          f"median of {args.repeats}; cold: {'the files evicted' if args.cold_mode == 'files' else 'page cache emptied'}\n")
    print("| read | mode | stored bytes | images/s | vs raw read of the lossless files |")
    print("|---|---|---|---|---|")
    for mode in modes:
        raw_s = statistics.median(times[mode]["raw bfloat16"])
        for name, ts in times[mode].items():
            s = statistics.median(ts)
            nbytes = sizes[name.removeprefix("raw ").partition(" to ")[0].removesuffix(STORED)]
            row = {"seconds": s, "images_per_s": args.images / s, "ratio_to_raw_lossless": raw_s / s,
                   "stored_bytes": nbytes, "runs": ts}
            table.setdefault(mode, {})[name] = row
            label = name if name.startswith("raw ") else f"FeatureStore.read {name}"
            print(f"| {label} | {mode} | {nbytes / 1e6:.1f} MB | {row['images_per_s']:.0f} | "
                  f"{row['ratio_to_raw_lossless']:.2f} x |")
    return finish(args, {"args": args_dict(args), "kind": kind, "layer": layer, "head": head, "reads": table})


if __name__ == "__main__":
    main()
