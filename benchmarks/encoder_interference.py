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
from typing import Any

import numcodecs
import numpy as np
import torch

from capture_stages import load_batches  # benchmarks/ (this script's folder) is on sys.path
from kvpipe.pipeline.extraction.transfer import HostCopier
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
    adapter, batches, sel = load_batches(model, size, n, batch_size)
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

    def beside(label: str, kind: Any, count: int, cname: str, settle_s: float) -> None:
        """Time the capture while ``count`` encode loops run as ``kind`` (threading or a
        multiprocessing context: both have Event and Thread/Process with start and join)."""
        stop = kind.Event()
        make = kind.Thread if kind is threading else kind.Process
        runners = [make(target=encode_loop, args=(stop, cname, tokens)) for _ in range(count)]
        for r in runners:
            r.start()
        time.sleep(settle_s)
        timed(label)
        stop.set()
        for r in runners:
            r.join()

    capture()  # warm-up: kernels and host buffers
    timed("capture alone")
    default = sys.getswitchinterval()
    for cname in ("zstd", "lz4"):
        for workers in (16, 8):
            for interval in (default, 0.0002):
                sys.setswitchinterval(interval)
                beside(f"+ {workers} encoder threads {cname}, GIL switch {interval * 1e3:g} ms",
                       threading, workers, cname, 0.5)
            sys.setswitchinterval(default)
            # forked: the children never touch CUDA
            beside(f"+ {workers} encoder processes {cname}", mp.get_context("fork"), workers, cname, 1.0)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
