"""Does chunk encoding slow the capture thread, through the GIL (threads) or the CPU (processes)?

Runs kvpipe's capture path (prefill, gather, pinned host copies; no writes) alone, then with
N encoder loops beside it (Blosc on a chunk of bf16 K/V-like data, join and CRC32C, as
``store.chunks`` does, without the disk): in threads at Python's GIL switch interval and at
0.2 ms, and in forked processes (no shared GIL). Prints images/s of the capture for each.

    python -m kvpipe.benchmarks.encoder_interference --model llava-ov --image-size 384 --images 64 --batch-size 8
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Any

import numcodecs
import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, load_batches, parse_args, sync
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


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "data"))
    parser.add_argument("--codecs", default="zstd,lz4", help="Blosc codecs of the encoder loops (default: %(default)s)")
    parser.add_argument("--workers", default="16,8", help="encoder loops beside the capture, comma list "
                                                          "(default: %(default)s)")
    parser.add_argument("--switch", default="0.0002", help="GIL switch intervals (s) tried beside Python's own, "
                                                           "comma list (default: %(default)s)")
    parser.add_argument("--no-processes", dest="processes", action="store_false",
                        help="encoder loops in threads only (no forked processes)")
    parser.add_argument("--settle", type=float, default=0.5,
                        help="seconds the loops run before the capture is timed (processes: twice; "
                             "default: %(default)s)")
    parser.set_defaults(model="llava-ov", image_size=384, images=64, batch_size=8)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    adapter, _, batches, sel = load_batches(args)
    n, device = args.images, adapter.device
    copier = HostCopier(device)
    tokens = args.batch_size * batches[0].layouts[0].n_tokens
    results: dict[str, float] = {}

    def capture() -> None:
        copied = [copier.submit(adapter.gather(b, sel, "bfloat16")[0]) for b in batches]
        for c in copied:
            c.wait()
            c.release()

    def timed(label: str) -> None:
        sync(device)
        t0 = time.perf_counter()
        capture()
        sync(device)
        results[label] = n / (time.perf_counter() - t0)
        print(f"{label:55s} {results[label]:6.2f} img/s", flush=True)

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
    try:
        for cname in comma_list(args.codecs):
            for workers in comma_list(args.workers, int):
                for interval in [default, *comma_list(args.switch, float)]:
                    sys.setswitchinterval(interval)
                    beside(f"+ {workers} encoder threads {cname}, GIL switch {interval * 1e3:g} ms",
                           threading, workers, cname, args.settle)
                sys.setswitchinterval(default)
                if args.processes:  # forked: the children never touch CUDA
                    beside(f"+ {workers} encoder processes {cname}", mp.get_context("fork"), workers, cname,
                           2 * args.settle)
    finally:
        sys.setswitchinterval(default)
    return finish(args, {"images_per_s": results})


if __name__ == "__main__":
    main()
