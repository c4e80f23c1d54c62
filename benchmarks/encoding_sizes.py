"""Bytes per image and error of each lossy encoding, recoded from one lossless store.

Each ``--encodings`` entry (int8, int4, pca, pca@STEP: pca with that ``--pca-step``) is written
by ``store.recode`` from the lossless store STORE (in its compute dtype: the bytes extraction
would write), then compared with it: the stored bytes per image of the K/V chunk files and of
post_proj, the ratio of the lossless K/V bytes to each encoding's, and the relative squared
error (squared error over the vectors' energy, all K/V targets together) with its spread over
targets; also the seconds the recoding took on this machine (encoding and writing every part),
and the host's time per chunk during extraction on one thread (``host_seconds``: Blosc over
what the device sends, and pca's coding, which runs on the host), beside the lossless store's.

    python -m kvpipe.benchmarks.encoding_sizes STORE --encodings int4,pca@0.35,pca --out /tmp/kvpipe-sizes
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args
from kvpipe.store import FeatureStore
from kvpipe.store.recode import recode
from kvpipe.store.schema import Kind


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("out",))
    parser.add_argument("store", type=Path, help="a lossless store in its compute dtype")
    parser.add_argument("--encodings", default="int8,int4,pca", help="comma list; pca@STEP: pca with that step")
    parser.set_defaults(out=Path("/tmp/kvpipe-encoding-sizes"))
    return parser


def chunk_bytes(root: Path, kinds: tuple[str, ...]) -> int:
    """Bytes of the chunk files of ``kinds`` in every part of the store at ``root``."""
    return sum(f.stat().st_size for kind in kinds for f in root.glob(f"parts/*/{kind}/c/**/*") if f.is_file())


def errors(ref: FeatureStore, lossy: FeatureStore) -> tuple[float, list[float]]:
    """(relative squared error of every K/V target together, each target's own)."""
    sq = energy = 0.0
    per_target = []
    for kind in (Kind.KEYS, Kind.VALUES):
        for layer in ref.meta.layers:
            for head in ref.meta.heads:
                a = ref.read(kind, layer, head).data.astype(np.float64)
                b = lossy.read(kind, layer, head).data
                e, n = float(((a - b) ** 2).sum()), float((a ** 2).sum())
                sq, energy = sq + e, energy + n
                per_target.append(e / max(n, 1e-30))
    return sq / max(energy, 1e-30), per_target


def host_seconds(ref: FeatureStore, raw: np.ndarray, name: str, repeats: int = 5) -> float:
    """Seconds the host spends on one chunk ``raw`` of the lossless store ``ref`` (``first_chunk``)
    in the encoding ``name`` during extraction, on one thread (BLAS too), median of ``repeats``: the store's
    Blosc over what the device sends (int8 and int4 codes are made on the device, so their
    quantisation is not the host's), plus pca's whole coding."""
    from threadpoolctl import threadpool_limits

    from kvpipe.store.chunks import blosc_of
    from kvpipe.store.encoding import compressor, decode, encode, encoding_for

    dtype, _, step = name.partition("@")
    params = {"step": float(step)} if step else None
    # raw is what the device sends a lossless or pca store: the compute dtype
    device_coded = encoding_for(dtype).chunk_encode is None and dtype != ref.meta.store_dtype
    sent = encode(decode(raw, ref.meta.store_dtype), dtype) if device_coded else raw
    blosc = blosc_of(compressor(dtype))
    coder = encoding_for(dtype, params).chunk_encode
    times = []
    with threadpool_limits(1):
        for _ in range(repeats + 1):
            start = time.perf_counter()
            blosc.encode(np.ascontiguousarray(sent if coder is None else coder(sent)))
            times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def first_chunk(ref: FeatureStore) -> np.ndarray:
    """The first part's keys of layer 0, head 0, as the device sends them (the store's raw dtype)."""
    return np.asarray(ref._raw(ref.committed_parts[0], Kind.KEYS.value, 0, 0))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    ref = FeatureStore.open(args.store)
    images = len(ref.images())
    kv = (Kind.KEYS.value, Kind.VALUES.value)
    lossless = chunk_bytes(args.store, kv)
    report = {"store": str(args.store), "model": ref.meta.model.name, "images": images,
              "tokens_per_image": ref._part_tokens(0) / max(1, len([r for r in ref.rows if r.part == 0])),
              "part_size": ref.meta.part_size, "lossless": {"kv_bytes_per_image": lossless / images,
                                                              "post_proj_bytes_per_image":
                                                              chunk_bytes(args.store, ("post_proj",)) / images},
              "encodings": {}}
    chunk = first_chunk(ref)
    base = host_seconds(ref, chunk, ref.meta.store_dtype)
    report["lossless"]["host_s_per_chunk"] = base
    print(f"{ref.meta.model.name}: {images} images, parts of {ref.meta.part_size}; lossless K/V "
          f"{lossless / images / 1e6:.3f} MB per image; the host's Blosc on one chunk of {chunk.shape[0]} tokens: "
          f"{base * 1e3:.1f} ms on one thread")
    print(f"{'encoding':10s} {'K/V MB/img':>10s} {'x smaller':>9s} {'post_proj MB':>12s} {'rel. sq. error':>14s} "
          f"{'targets: min-max':>18s} {'recode s':>8s} {'host ms/chunk':>13s}")
    for name in comma_list(args.encodings):
        dtype, _, step = name.partition("@")
        out = args.out / name
        shutil.rmtree(out, ignore_errors=True)
        start = time.perf_counter()
        recode(args.store, out, dtype, float(step) if step else None)
        seconds = time.perf_counter() - start
        stored = chunk_bytes(out, kv)
        err, per_target = errors(ref, FeatureStore.open(out))
        row = {"kv_bytes_per_image": stored / images, "ratio": lossless / max(stored, 1),
               "post_proj_bytes_per_image": chunk_bytes(out, ("post_proj",)) / images, "rel_sq_error": err,
               "rel_sq_error_min": min(per_target), "rel_sq_error_max": max(per_target), "recode_s": seconds,
               "host_s_per_chunk": host_seconds(ref, chunk, name)}
        report["encodings"][name] = row
        print(f"{name:10s} {row['kv_bytes_per_image'] / 1e6:10.3f} {row['ratio']:9.2f} "
              f"{row['post_proj_bytes_per_image'] / 1e6:12.3f} {err:14.5f} "
              f"{min(per_target):8.5f}-{max(per_target):.5f} {seconds:8.1f} {row['host_s_per_chunk'] * 1e3:13.1f}")
        shutil.rmtree(out, ignore_errors=True)
    return finish(args, report)


if __name__ == "__main__":
    main()
