"""Where a full extraction's steady time goes, against the same model's bare prefill.

In one process, on one model (random full-size weights, kvpipe's kernels) and one synthetic
image set:
  1. the prefill alone over every batch (img/s), then a profiled window of 4 batches: GPU
     time by kernel class, GPU busy time, idle gaps between kernels and what ran after the
     largest ones;
  2. the same prefill while 16 threads encode zstd on the host (does CPU load slow the GPU?);
  3. ``kvpipe extract`` runs (a short warm-up first), one per variant in ``--variants``:
       upload    as shipped: batches' inputs sent to the GPU ahead (transfer.InputUploader)
       noupload  the inputs copied to the GPU by the forward pass itself, as before
     For each: steady img/s (from the end of the first part), the driver's seconds by phase
     inside that window, a profiled window of 4 batches mid-run, as in 1;
  4. GPU clock, power and throttle reasons (nvidia-smi, every 250 ms) during each phase.

    python -m kvpipe.benchmarks.extract_timeline --model llava-ov --image-size 384 --images 512 \
        --batch-size 8 --part-size 16 --variants noupload,upload,noupload,upload
    python -m kvpipe.benchmarks.extract_timeline --device cpu --model tiny-llava-ov --image-size 64 \
        --images 64 --batch-size 4 --part-size 8      # a smoke run
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import profile

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import (comma_list, finish, forward, load_batches, parse_args, settle, sync,
                                      synthetic_options)
from kvpipe.benchmarks.prefill_kernels import activities, gpu_time
from kvpipe.pipeline.extraction import ExtractConfig, ExtractResult, extract
from kvpipe.pipeline.extraction import worker as extraction_worker
from kvpipe.store.chunks import NICE, blosc_of
from kvpipe.store.encoding import compressor

WINDOW = 4  # batches profiled


class GpuSampler:
    """nvidia-smi's clock, power, temperature and throttle reasons, sampled in the background."""

    def __init__(self) -> None:
        self.rows: list[tuple] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        query = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
        try:
            proc = subprocess.Popen(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader,nounits",
                                     "-lms", "250"], stdout=subprocess.PIPE, text=True)
        except OSError:
            return
        for line in proc.stdout:
            try:
                sm, watts, temp, reasons = (x.strip() for x in line.split(","))
                self.rows.append((time.perf_counter(), float(sm), float(watts), float(temp), reasons))
            except ValueError:
                pass

    def report(self, label: str, t0: float, t1: float) -> None:
        rows = [r for r in self.rows if t0 <= r[0] <= t1]
        if rows:
            n = len(rows)
            print(f"  [{label}] SM clock {sum(r[1] for r in rows) / n:.0f} MHz (min {min(r[1] for r in rows):.0f}), "
                  f"power {sum(r[2] for r in rows) / n:.0f} W (max {max(r[2] for r in rows):.0f}), "
                  f"{max(r[3] for r in rows):.0f} C, throttle reasons {dict(Counter(r[4] for r in rows))}",
                  flush=True)


def report_profile(prof: Any, wall: float, label: str) -> None:
    """GPU busy time, kernel classes and idle gaps of a profiled window of WINDOW batches."""
    by_class, _, busy, gaps = gpu_time(prof)
    if not by_class:
        print(f"  [{label}] no GPU kernels")
        return
    print(f"  [{label}] per batch: wall {wall * 1e3 / WINDOW:.0f} ms, GPU busy {busy / WINDOW:.0f} ms; "
          + ", ".join(f"{k} {v / WINDOW:.0f} ms" for k, v in sorted(by_class.items()))
          + f"; idle gaps over 0.5 ms {sum(g for g, _ in gaps if g > 0.5) / WINDOW:.0f} ms", flush=True)
    print("    largest gaps (ms, kernel after):",
          "; ".join(f"{g:.0f} {n[:40]}" for g, n in sorted(gaps, reverse=True)[:4]))


def encoder_load(stop: threading.Event) -> None:
    """A zstd encoder thread at kvpipe's encoder priority, on bf16-like noise."""
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), NICE)
    rng = np.random.default_rng(threading.get_native_id())
    a = (rng.standard_normal((16 * 1485, 128)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    codec = blosc_of(compressor("bfloat16"))
    while not stop.is_set():
        codec.encode(a)


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help,
                                    groups=("model", "device", "data", "parts", "out"))
    parser.add_argument("--variants", default="noupload,upload,noupload,upload",
                        help="extraction runs, comma list of upload | noupload (default: %(default)s)")
    parser.add_argument("--load-threads", type=int, default=16,
                        help="zstd encoder threads beside the second prefill (default: %(default)s)")
    parser.set_defaults(model="llava-ov", image_size=384, images=512, batch_size=8, part_size=16)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    variants = comma_list(args.variants)
    unknown = set(variants) - {"upload", "noupload"}
    if unknown:
        raise SystemExit(f"--variants: unknown {', '.join(sorted(unknown))}; known: upload, noupload")
    n, batch_size, part_size = args.images, args.batch_size, args.part_size
    adapter, _, batches, _ = load_batches(args)
    device = adapter.device
    gpu = GpuSampler() if device.type == "cuda" else None
    ds_opts = synthetic_options(n, args.image_size, args.seed)
    mid = min(len(batches) // 2, max(0, len(batches) - WINDOW))
    results: dict[str, dict] = {}

    def prefill(label: str, load: bool = False) -> None:
        stop, threads = threading.Event(), []
        if load:
            threads = [threading.Thread(target=encoder_load, args=(stop,)) for _ in range(args.load_threads)]
            for t in threads:
                t.start()
        with torch.inference_mode():
            forward(adapter, batches[0], device)
            sync(device)
            t0 = time.perf_counter()
            for b in batches:
                forward(adapter, b, device)
            sync(device)
            t1 = time.perf_counter()
            with profile(activities=activities(device)) as prof:
                w0 = time.perf_counter()
                for b in batches[mid:mid + WINDOW]:
                    forward(adapter, b, device)
                sync(device)
                wall = time.perf_counter() - w0
        stop.set()
        for t in threads:
            t.join()
        results[label] = {"images_per_s": n / (t1 - t0)}
        print(f"{label}: {n / (t1 - t0):.2f} img/s", flush=True)
        if gpu:
            gpu.report(label, t0, t1)
        report_profile(prof, wall, label)

    prefill("prefill")
    prefill(f"prefill, {args.load_threads} zstd encoder threads busy", load=True)

    # every phase the driver times, with its start and end (ExtractResult.timed)
    events: list[tuple[str, float, float]] = []
    timed = ExtractResult.timed

    def timed_and_kept(self: ExtractResult, key: str, t0: float) -> None:
        events.append((key, t0, time.perf_counter()))
        timed(self, key, t0)
    ExtractResult.timed = timed_and_kept

    # a profiled window of WINDOW batches, from the middle of the run's gathers
    calls, window = [0], {}
    gather = adapter.gather

    def gather_in_window(*a: Any, **kw: Any) -> Any:
        calls[0] += 1
        if calls[0] == mid + 1 and window.get("on"):
            window["prof"] = profile(activities=activities(device))
            window["prof"].start()
            window["t0"] = time.perf_counter()
        out = gather(*a, **kw)
        if calls[0] == mid + WINDOW and "prof" in window:
            sync(device)
            window["prof"].stop()
            window["wall"] = time.perf_counter() - window["t0"]
        return out
    adapter.gather = gather_in_window

    tmp = Path(tempfile.mkdtemp(prefix="kvpipe-timeline-", dir=args.out))  # --out: where the stores go
    uploads = extraction_worker.on_device_ahead

    def run(label: str, variant: str, images: int, profiled: bool = True) -> None:
        store = tmp / "store"
        shutil.rmtree(store, ignore_errors=True)
        settle(device)
        extraction_worker.on_device_ahead = uploads if variant == "upload" else (lambda adapter, batches, *_: batches)
        cfg = ExtractConfig(model=args.model, dataset="synthetic", out=str(store), limit=images, init=args.init,
                            dtype=args.dtype, device=args.device, batch_size=batch_size, part_size=part_size,
                            dataset_options=ds_opts)
        stamps: list[tuple[float, int]] = []
        done = [0]

        def progress(k: int) -> None:
            done[0] += k
            stamps.append((time.perf_counter(), done[0]))
        events.clear()
        calls[0] = 0
        window.clear()
        window["on"] = profiled
        res = extract(cfg, adapter=adapter, progress=progress)
        t_end = time.perf_counter()
        extraction_worker.on_device_ahead = uploads
        start, first = next((t, k) for t, k in stamps if k >= part_size)
        inside: dict[str, float] = defaultdict(float)
        for key, a, b in events:
            if b > max(a, start):
                inside[key] += b - max(a, start)
        results[f"{label} ({variant})"] = {"steady_images_per_s": (res.images_ok - first) / (t_end - start),
                                           "seconds_in_steady_window": dict(inside)}
        print(f"{label} ({variant}): steady {(res.images_ok - first) / (t_end - start):.2f} img/s over "
              f"{t_end - start:.2f} s; inside it: " + ", ".join(f"{k} {v:.2f} s" for k, v in inside.items()),
              flush=True)
        if gpu:
            gpu.report(label, start, t_end)
        if "wall" in window:
            report_profile(window["prof"], window["wall"], label)

    try:
        run("warm-up", "upload", 2 * part_size, profiled=False)
        for i, variant in enumerate(variants):
            run(f"extraction {i + 1}", variant, n)
    finally:
        ExtractResult.timed = timed
        adapter.gather = gather
        extraction_worker.on_device_ahead = uploads
        shutil.rmtree(tmp, ignore_errors=True)
    return finish(args, results)


if __name__ == "__main__":
    main()
