"""Size and speed of Blosc codecs on real K/V: a batch of a full-size model (random weights).

Captures one batch of images with all layers, heads, keys and values, in bf16 and in the
int8 encoding, and encodes every (layer, head) chunk with each codec: stored / raw bytes,
MB/s of raw bytes on one thread and on 16 threads together, and decode MB/s on one thread.

    python benchmarks/codecs.py llava-ov 384       # model, image side (4 images)
"""

from __future__ import annotations

import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numcodecs
import numpy as np

from kvpipe.pipeline.models.capture import Selection
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.extraction.transfer import host_view

BF16 = [("zstd", 1, 1), ("zstd", 3, 1), ("lz4", 1, 1), ("lz4", 1, 2), ("zstd", 1, 2), ("blosclz", 1, 1)]
INT8 = [("zstd", 1, 0), ("lz4", 1, 0)]


def main(model: str, size: int) -> None:
    adapter = load_model(model, dtype="bfloat16", device="cuda", init="random")
    ds = create_dataset("synthetic", limit=4, n_videos=1, n_frames=8, width=size, height=size)
    batch = adapter.preprocess([r.image() for r in ds.records()])
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    numcodecs.blosc.use_threads = False  # one thread per encode, as kvpipe's encoder pool runs it
    for dtype, combos in (("bfloat16", BF16), ("int8", INT8)):
        arrays, _ = adapter.gather(batch, sel, dtype)
        host = {k: np.ascontiguousarray(host_view(v.cpu())) for k, v in arrays.items()}
        chunks = [host[k][l, h] for k in host for l in range(host[k].shape[0]) for h in range(host[k].shape[1])]
        raw = sum(c.nbytes for c in chunks)
        sample = chunks[:40]
        sample_bytes = sum(c.nbytes for c in sample)
        for cname, clevel, shuffle in combos:
            codec = numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=shuffle)
            t0 = time.perf_counter()
            encoded = [codec.encode(c) for c in sample]
            one = sample_bytes / (time.perf_counter() - t0) / 1e6
            with ThreadPoolExecutor(16) as pool:
                t0 = time.perf_counter()
                encoded = list(pool.map(codec.encode, chunks))
                sixteen = raw / (time.perf_counter() - t0) / 1e6
            t0 = time.perf_counter()
            for e in encoded[:40]:
                codec.decode(e)
            decode = sample_bytes / (time.perf_counter() - t0) / 1e6
            ratio = sum(len(e) for e in encoded) / raw
            print(f"{model} {dtype:8s} {cname:7s} level {clevel} shuffle {shuffle}: stored/raw {ratio:.3f}  "
                  f"encode {one:6.0f} MB/s (1 thread) {sixteen:6.0f} MB/s (16)  decode {decode:6.0f} MB/s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
