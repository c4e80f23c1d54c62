"""Cost of checked reads: ``FeatureStore.read`` with and without the per-chunk CRC32C check.

Builds a bf16 store of K/V shaped like a small model's (random normal tokens with a few large
channels, as keys have), then reads every (kind, layer, head) across all parts, alternating
runs with the check on and off (off: ``reader.check_crc`` replaced by a no-op), files in
the page cache. Prints read throughput (decoded float32 MB/s) and the overhead.

    python -m kvpipe.benchmarks.read_checks [--parts 16] [--tokens 4096] [--layers 8] [--heads 4] [--repeats 7]
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kvpipe.benchmarks.common import args_dict, finish, get_args_parser
from kvpipe.store import FeatureSetMeta, FeatureStore, reader
from kvpipe.store.checksum import bytes_crc32c
from kvpipe.store.encoding import compressor_meta
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter


def build(root: Path, parts: int, tokens: int, layers: int, heads: int, dim: int = 128) -> FeatureSetMeta:
    meta = FeatureSetMeta(
        model={"name": "bench"}, dataset={"name": "bench", "tasks": []}, layers=tuple(range(layers)),
        heads=tuple(range(heads)), kinds=("keys", "values"), keys_rope="post-rope", n_layers=layers,
        n_kv_heads=heads, head_dim=dim, hidden_size=dim, compute_dtype="bfloat16", store_dtype="bfloat16",
        template="chat", prefix="", prefix_token_ids=(), image_token_id=1, part_size=4, n_images=4 * parts,
        image_ids_sha256="bench", compressor=compressor_meta("bfloat16"))
    rng = np.random.default_rng(0)
    scale = np.ones(dim, np.float32)
    scale[rng.choice(dim, 6, replace=False)] = 20.0  # outlier channels
    per_image = tokens // 4
    seg = json.dumps([{"name": "base", "offset": 0, "rows": 1, "cols": per_image, "newline": False}])
    with StoreWriter.create_or_resume(root, meta) as w:
        for p in range(parts):
            arrays = {k: (rng.standard_normal((layers, heads, tokens, dim), np.float32) * scale)
                      for k in ("keys", "values")}
            rows = [ImageRow(index=4 * p + i, image_id=f"i{4 * p + i}", part=p, token_offset=i * per_image,
                             n_tokens=per_image, grid_h=1, grid_w=per_image, segments=seg) for i in range(4)]
            w.write_part(p, rows, arrays)
    return meta


def read_all(store: FeatureStore) -> int:
    n = 0
    for kind in ("keys", "values"):
        for layer in store.meta.layers:
            for head in store.meta.heads:
                n += store.read(kind, layer, head).data.nbytes
    return n


def timeit(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def stage_times(root: Path, repeats: int) -> dict[str, float]:
    """Seconds per stage of the read path over every K/V chunk file, one thread (so other load
    on the machine shifts all stages alike): file read, CRC32C, Blosc decompression, bf16 ->
    float32; each stage's best of ``repeats`` sweeps."""
    from kvpipe.store.encoding import decode

    files = sorted(root.glob("parts/*/*/c/*/*/0/0"))  # every (kind, layer, head) chunk of every part
    best = {"read": np.inf, "crc32c": np.inf, "decompress": np.inf, "to float32": np.inf}
    for _ in range(repeats):
        t = dict.fromkeys(best, 0.0)
        for f in files:
            t0 = time.perf_counter()
            payload = f.read_bytes()
            t1 = time.perf_counter()
            bytes_crc32c(payload)
            t2 = time.perf_counter()
            raw = reader._BLOSC.decode(payload)
            t3 = time.perf_counter()
            decode(np.frombuffer(raw, np.uint16), "bfloat16")
            t4 = time.perf_counter()
            t["read"] += t1 - t0
            t["crc32c"] += t2 - t1
            t["decompress"] += t3 - t2
            t["to float32"] += t4 - t3
        best = {k: min(best[k], t[k]) for k in best}
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = get_args_parser(__doc__, groups=())
    ap.add_argument("--parts", type=int, default=16, help="store parts (default: %(default)s)")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens per part (default: %(default)s)")
    ap.add_argument("--layers", type=int, default=8, help="layers (default: %(default)s)")
    ap.add_argument("--heads", type=int, default=4, help="KV heads (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=7, help="alternating checked/unchecked runs (default: %(default)s)")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="kvpipe-read-checks-") as tmp:
        root = Path(tmp) / "store"
        build(root, args.parts, args.tokens, args.layers, args.heads)
        on_disk = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        store = FeatureStore.open(root)
        read_all(store)  # warm the page cache
        checked = reader.check_crc
        times: dict[str, list[float]] = {"checked": [], "unchecked": []}
        nbytes = 0
        for _ in range(args.repeats):
            for mode in ("checked", "unchecked"):
                reader.check_crc = checked if mode == "checked" else (lambda *a, **k: None)
                t0 = time.perf_counter()
                nbytes = read_all(FeatureStore.open(root))
                times[mode].append(time.perf_counter() - t0)
        reader.check_crc = checked
        payload = max((p for p in root.rglob("0") if p.is_file()), key=lambda p: p.stat().st_size).read_bytes()
        stages = stage_times(root, args.repeats)
        crc_rate = len(payload) / min(timeit(lambda: bytes_crc32c(payload)) for _ in range(50)) / 1e9
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"store: {args.parts} parts x {args.tokens} tokens x {args.layers} layers x {args.heads} heads x 2 kinds, "
          f"bf16, {on_disk / 1e6:.0f} MB on disk; {nbytes / 1e6:.0f} MB float32 per sweep; {args.repeats} repeats")
    for k in ("unchecked", "checked"):
        print(f"{k:>9}: median {med[k]:.3f} s ({nbytes / med[k] / 1e6:.0f} MB/s), min {min(times[k]):.3f} s")
    print(f" overhead: {100 * (med['checked'] / med['unchecked'] - 1):+.1f}% (median), "
          f"{100 * (min(times['checked']) / min(times['unchecked']) - 1):+.1f}% (min)")
    print(f"CRC32C alone: {crc_rate:.1f} GB/s over one {len(payload) / 1e3:.0f} kB chunk")
    total = sum(stages.values())
    print("one thread, every chunk file once, best of repeats: " + ", ".join(
        f"{k} {v:.3f} s ({100 * v / total:.1f}%)" for k, v in stages.items()))
    print(f" check / (everything else): {100 * stages['crc32c'] / (total - stages['crc32c']):.1f}%")
    return finish(args, {"args": args_dict(args), "on_disk_bytes": on_disk, "decoded_bytes": nbytes,
                         "median_s": med, "min_s": {k: min(v) for k, v in times.items()},
                         "overhead_median": med["checked"] / med["unchecked"] - 1,
                         "crc32c_gb_per_s": crc_rate, "one_thread_s": stages})


if __name__ == "__main__":
    main()
