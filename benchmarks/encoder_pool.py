"""Images per second the host's encoder pool codes and writes, per store encoding.

During extraction the device sends each part's K/V (bf16 for lossless and pca, codes for int8
and int4) and the host's encoder pool (``store.chunks``, a thread per core) Blosc-compresses,
checksums and writes every chunk; pca also codes each chunk there (numpy products). This runs
that step on one part of the lossless store STORE (its keys and values, as the device would
send them for each encoding) with the pool's threads, ``--rounds`` times in alternating order,
and prints the part's images per second: the rate above which the host, not the device, would
bound extraction (the chunk files go to memory, /dev/shm where there is one, so the disk's
speed, measured apart, does not hide the coding's). ``pca, BLAS free`` is the same pool with
numpy's BLAS left at its default (a thread per core inside each task), as ``write_chunks`` ran
before ``store.blas``: the baseline, in the same process.

    python -m kvpipe.benchmarks.encoder_pool STORE --encodings lossless,int8,int4,pca --rounds 5
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args
from kvpipe.store import FeatureStore
from kvpipe.store import chunks as store_chunks
from kvpipe.store.encoding import compressor, decode, encode, encoding_for
from kvpipe.store.schema import Kind

BLAS_FREE = "pca, BLAS free"


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=())
    parser.add_argument("store", type=Path, help="a lossless store in its compute dtype")
    parser.add_argument("--encodings", default="lossless,int8,int4,pca",
                        help="comma list of lossless, int8, int4, pca (pca also runs with BLAS free)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds; the median is printed")
    parser.add_argument("--threads", type=int, default=None, help="encoder threads (default: one per core)")
    parser.add_argument("--part", type=int, default=0, help="which committed part to code")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the chunk files go (default: a temp folder in /dev/shm, else the system's)")
    return parser


def sent_arrays(ref: FeatureStore, part: int, encoding: str) -> dict[str, np.ndarray]:
    """The part's keys and values [layer, head, token, D] as the device sends them for ``encoding``:
    the lossless store's own bytes for lossless and pca, the device's codes for int8 and int4."""
    meta = ref.meta
    out = {}
    for kind in (Kind.KEYS.value, Kind.VALUES.value):
        raw = np.stack([np.stack([np.asarray(ref._raw(part, kind, li, hi)) for hi in range(len(meta.heads))])
                        for li in range(len(meta.layers))])
        out[kind] = raw if encoding in ("lossless", "pca") else encode(decode(raw, meta.store_dtype), encoding)
    return out


def code_part(arrays: dict[str, np.ndarray], encoding: str, store_dtype: str, root: Path) -> float:
    """Seconds the encoder pool takes to code and write ``arrays`` in ``encoding``."""
    dtype = store_dtype if encoding == "lossless" else "pca" if encoding == BLAS_FREE else encoding
    codec = compressor(dtype)
    coder = encoding_for(dtype).chunk_encode
    shutil.rmtree(root, ignore_errors=True)
    start = time.perf_counter()
    for kind, data in arrays.items():
        chunks = (1, 1, *data.shape[2:])
        if encoding == BLAS_FREE:  # write_chunks' body without its BLAS limit
            blosc = store_chunks.blosc_of(codec)
            jobs = [store_chunks.pool().submit(store_chunks._write_one, root / kind / key, data, sel, blosc, coder)
                    for key, sel in store_chunks.chunk_keys(data.shape, chunks)]
            [job.result() for job in jobs]
        else:
            store_chunks.write_chunks(root / kind, data, chunks, codec, coder)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    ref = FeatureStore.open(args.store)
    part = ref.committed_parts[args.part]
    images = sum(1 for r in ref.rows if r.part == part)
    if args.threads:
        store_chunks.set_threads(args.threads)
    names = comma_list(args.encodings)
    if "pca" in names:
        names.insert(names.index("pca") + 1, BLAS_FREE)
    sent = {name: sent_arrays(ref, part, "pca" if name == BLAS_FREE else name) for name in names}
    tokens = next(iter(sent[names[0]].values())).shape[2]
    print(f"{ref.meta.model.name}: part {part}, {images} images, {tokens} tokens, "
          f"{store_chunks.THREADS} encoder threads, {args.rounds} rounds", flush=True)
    shm = Path("/dev/shm")
    scratch = (Path(tempfile.mkdtemp(prefix="kvpipe-encoder-pool-", dir=shm if shm.is_dir() else None))
               if args.out is None else args.out)
    seconds: dict[str, list[float]] = {name: [] for name in names}
    try:
        for name in names:  # one untimed pass each: first calls (LAPACK, Blosc contexts, the pool) cost more
            code_part(sent[name], name, ref.meta.store_dtype, scratch / "warm")
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                seconds[name].append(code_part(sent[name], name, ref.meta.store_dtype, scratch / "part"))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    rows = {name: {"seconds": float(np.median(s)), "images_per_s": images / float(np.median(s))}
            for name, s in seconds.items()}
    print(f"{'encoding':16s} {'s per part':>10s} {'img/s':>8s} {'vs lossless':>11s}")
    for name, row in rows.items():
        rel = f"{row['images_per_s'] / rows['lossless']['images_per_s']:10.2f}x" if "lossless" in rows else f"{'-':>11s}"
        print(f"{name:16s} {row['seconds']:10.3f} {row['images_per_s']:8.1f} {rel}")
    if BLAS_FREE in rows:
        print(f"pca with BLAS on one thread: {rows['pca']['images_per_s'] / rows[BLAS_FREE]['images_per_s']:.2f} x "
              f"the rate with BLAS free")
    return finish(args, {"store": str(args.store), "model": ref.meta.model.name, "part": part, "images": images,
                         "tokens": tokens, "threads": store_chunks.THREADS, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
