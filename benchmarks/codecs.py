"""Size and speed of Blosc codecs on real K/V: a batch of a full-size model (random weights).

Captures one batch of images with all layers, heads, keys and values, in bf16 and in the
int8 encoding, and encodes every (layer, head) chunk with each codec: stored / raw bytes,
MB/s of raw bytes on one thread and on ``--threads`` threads together, and decode MB/s on
one thread.

    python -m kvpipe.benchmarks.codecs --model llava-ov --image-size 384 --images 4
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ThreadPoolExecutor

import numcodecs
import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import finish, load_batches, parse_args
from kvpipe.pipeline.extraction.transfer import host_view

BF16 = [("zstd", 1, 1), ("zstd", 3, 1), ("lz4", 1, 1), ("lz4", 1, 2), ("zstd", 1, 2), ("blosclz", 1, 1)]
INT8 = [("zstd", 1, 0), ("lz4", 1, 0)]
SAMPLE = 40  # chunks timed on one thread


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "data"))
    parser.add_argument("--threads", type=int, default=16, help="encoder threads together (default: %(default)s)")
    parser.set_defaults(model="llava-ov", image_size=384, images=4, batch_size=4)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    adapter, _, batches, sel = load_batches(args, accelerate=False)
    batch = batches[0]
    numcodecs.blosc.use_threads = False  # one thread per encode, as kvpipe's encoder pool runs it
    rows = []
    for dtype, combos in (("bfloat16", BF16), ("int8", INT8)):
        arrays, _ = adapter.gather(batch, sel, dtype)
        host = {k: np.ascontiguousarray(host_view(v.cpu())) for k, v in arrays.items()}
        chunks = [host[k][l, h] for k in host for l in range(host[k].shape[0]) for h in range(host[k].shape[1])]
        raw = sum(c.nbytes for c in chunks)
        sample = chunks[:SAMPLE]
        sample_bytes = sum(c.nbytes for c in sample)
        for cname, clevel, shuffle in combos:
            codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
            t0 = time.perf_counter()
            encoded = [codec.encode(c) for c in sample]
            one = sample_bytes / (time.perf_counter() - t0) / 1e6
            with ThreadPoolExecutor(args.threads) as pool:
                t0 = time.perf_counter()
                encoded = list(pool.map(codec.encode, chunks))
                together = raw / (time.perf_counter() - t0) / 1e6
            t0 = time.perf_counter()
            for e in encoded[:SAMPLE]:
                codec.decode(e)
            decode = sample_bytes / (time.perf_counter() - t0) / 1e6
            ratio = sum(len(e) for e in encoded) / raw
            rows.append({"dtype": dtype, "codec": cname, "level": clevel, "shuffle": shuffle, "stored_per_raw": ratio,
                         "encode_mb_s_1": one, f"encode_mb_s_{args.threads}": together, "decode_mb_s_1": decode})
            print(f"{args.model} {dtype:8s} {cname:7s} level {clevel} shuffle {shuffle}: stored/raw {ratio:.3f}  "
                  f"encode {one:6.0f} MB/s (1 thread) {together:6.0f} MB/s ({args.threads})  "
                  f"decode {decode:6.0f} MB/s", flush=True)
    return finish(args, {"model": args.model, "codecs": rows})


if __name__ == "__main__":
    main()
