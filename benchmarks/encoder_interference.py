"""Does chunk encoding slow the capture thread, through the GIL (threads) or the CPU (processes)?

Runs kvpipe's capture path (prefill, gather, pinned host copies; no writes) alone, then with
N encoder loops beside it (Blosc on a chunk of bf16 K/V-like data, join and CRC32C, as
``store.chunks`` does, without the disk): in threads at Python's GIL switch interval and at
0.2 ms, and in forked processes (no shared GIL). Prints images/s of the capture for each.

    python benchmarks/encoder_interference.py llava-ov 384 64 8     # model, image side, images, batch
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time

import numcodecs
import numpy as np
import torch

from kvpipe.pipeline.capture import Selection
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.transfer import HostCopier
from kvpipe.store.checksum import bytes_crc32c
from kvpipe.store.chunks import NICE, TokenSegments, blosc_of
from kvpipe.store.encoding import compressor


def encode_loop(stop, cname: str, tokens: int) -> None:
    """Encode one (layer, head) chunk of two batch pieces again and again until ``stop``."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)  # as the encoder pool does
    numcodecs.blosc.use_threads = False
    rng = np.random.default_rng(threading.get_native_id())
    piece = (rng.standard_normal((1, 1, tokens, 128)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    seg = TokenSegments([piece, piece.copy()], axis=2)
    codec = blosc_of(compressor("bfloat16", cname=cname))
    while not stop.is_set():
        bytes_crc32c(codec.encode(np.ascontiguousarray(seg[0:1, 0:1, :, :])))


def main(model: str, size: int, n: int, batch_size: int) -> None:
    adapter = load_model(model, dtype="bfloat16", device="cuda", init="random")
    adapter.accelerate()
    ds = create_dataset("synthetic", limit=n, n_videos=-(-n // 8), n_frames=8, width=size, height=size)
    images = [r.image() for r in ds.records()]
    batches = [adapter.preprocess(images[i:i + batch_size]) for i in range(0, n, batch_size)]
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    copier = HostCopier(torch.device("cuda"))
    tokens = batch_size * batches[0].layouts[0].n_tokens

    def capture() -> None:
        copied = [copier.submit(adapter.gather(b, sel, "bfloat16")[0]) for b in batches]
        for c in copied:
            c.wait()
            c.release()

    def timed(label: str) -> None:
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        capture()
        torch.cuda.synchronize()
        print(f"{label:55s} {n / (time.perf_counter() - t0):6.2f} img/s", flush=True)

    capture()  # warm-up: kernels and host buffers
    timed("capture alone")
    default = sys.getswitchinterval()
    for cname in ("zstd", "lz4"):
        for workers in (16, 8):
            for interval in (default, 0.0002):
                sys.setswitchinterval(interval)
                stop = threading.Event()
                threads = [threading.Thread(target=encode_loop, args=(stop, cname, tokens)) for _ in range(workers)]
                for t in threads:
                    t.start()
                time.sleep(0.5)
                timed(f"+ {workers} encoder threads {cname}, GIL switch {interval * 1e3:g} ms")
                stop.set()
                for t in threads:
                    t.join()
            sys.setswitchinterval(default)
            ctx = mp.get_context("fork")  # the children never touch CUDA
            pstop = ctx.Event()
            procs = [ctx.Process(target=encode_loop, args=(pstop, cname, tokens)) for _ in range(workers)]
            for p in procs:
                p.start()
            time.sleep(1.0)
            timed(f"+ {workers} encoder processes {cname}")
            pstop.set()
            for p in procs:
                p.join()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
