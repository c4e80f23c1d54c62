"""Where a batch's time goes in extraction: prefill, + gather, + host copy, + chunk writes.

Runs, in one process on the same batches of one model (random full-size weights), the
stages of kvpipe's capture path cumulatively and prints images/s for each:

  prefill                          the base model's forward with use_cache (kvpipe's kernels)
  prefill+gather bfloat16 / int8   + the gather of every layer's K/V on the device
  prefill+gather+copy (pool cold)  + the host copies (transfer.HostCopier), host buffers new
  prefill+gather+copy (pool warm)  the same with the buffers reused
  prefill+gather+copy+write        + each part's chunks encoded and written (store.chunks),
                                   one syncfs per part, parts of two batches, two writers

    python benchmarks/capture_stages.py llava-ov 384 64 8      # model, image side, images, batch
    PAGEABLE=1 CODEC=lz4bit DTYPE=int8 SYNC=0 THREADS=4,16 SWITCH=0.005,0.0005 DIR=/dev/shm \
        python benchmarks/capture_stages.py ...
        # pageable host buffers, the codec (store.encoding.CODECS), the int8 encoding (copies and writes), no
        # syncfs, the write stage once per encoder pool size and GIL switch interval (seconds),
        # the parts written under DIR (/dev/shm: memory only, no disk)
    SAMPLE=1 python benchmarks/capture_stages.py ...   # where the main thread waits in the write stages
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

from kvpipe.pipeline.models.capture import Selection, inputs_to_device
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.extraction.transfer import HostCopier
from kvpipe.store import chunks
from kvpipe.store.chunks import TokenSegments, write_chunks
from kvpipe.store.encoding import compressor_for, compressor_meta
from kvpipe.store.fs import sync_tree


def main_thread_sched() -> tuple[float, float]:
    """Seconds this thread has run on a CPU and waited runnable for one (Linux schedstat)."""
    try:
        run_ns, wait_ns, _ = Path("/proc/thread-self/schedstat").read_text().split()
        return int(run_ns) / 1e9, int(wait_ns) / 1e9
    except (OSError, ValueError):
        return 0.0, 0.0


class MainThreadSampler:
    """Where the main thread is when it is off its core (SAMPLE=1): every 2 ms, its kernel
    state and wait channel (/proc) and the Python line it is on, counted while not running."""

    def __init__(self) -> None:
        import threading

        self.tid, self.ident = threading.main_thread().native_id, threading.main_thread().ident
        self.seen: dict[str, int] = {}
        self.samples = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        task = Path(f"/proc/self/task/{self.tid}")
        while not self.stop.wait(0.002):
            try:
                state = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
                wchan = (task / "wchan").read_text().strip() or "-"
            except OSError:
                return
            self.samples += 1
            if state == "R":
                continue
            frame = sys._current_frames().get(self.ident)
            where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}" if frame else "?"
            key = f"{state} {wchan:24s} {where}"
            self.seen[key] = self.seen.get(key, 0) + 1

    def __enter__(self) -> "MainThreadSampler":
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join()
        total = max(self.samples, 1)
        print(f"  main thread off its core in {sum(self.seen.values()) / total:.0%} of {self.samples} samples:")
        for key, k in sorted(self.seen.items(), key=lambda kv: -kv[1])[:10]:
            print(f"    {k / total:6.1%}  {key}")


def load_batches(model: str, size: int, n: int, batch_size: int) -> tuple[Any, list, Selection]:
    """The model (random full-size weights, kvpipe's kernels) on the GPU, ``n`` synthetic images
    preprocessed in batches, and a selection of every layer's and head's keys and values."""
    adapter = load_model(model, dtype="bfloat16", device="cuda", init="random")
    adapter.accelerate()
    ds = create_dataset("synthetic", limit=n, n_videos=-(-n // 8), n_frames=8, width=size, height=size)
    images = [r.image() for r in ds.records()]
    batches = [adapter.preprocess(images[i:i + batch_size]) for i in range(0, n, batch_size)]
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    return adapter, batches, sel


def main(model: str, size: int, n: int, batch_size: int) -> None:
    adapter, batches, sel = load_batches(model, size, n, batch_size)
    copier = HostCopier(torch.device("cuda"), pinned=os.environ.get("PAGEABLE") != "1")
    dtype = os.environ.get("DTYPE", "bfloat16")
    codec = compressor_for(compressor_meta(dtype, os.environ.get("CODEC", "zstd")), dtype)
    out = Path(tempfile.mkdtemp(prefix="kvpipe-stages-", dir=os.environ.get("DIR")))  # DIR=/dev/shm: no disk

    def run(label: str, stage) -> None:
        stage(batches[:1])  # warm-up
        torch.cuda.synchronize()
        sampling = os.environ.get("SAMPLE") == "1" and "write" in label
        sampler = MainThreadSampler() if sampling else contextlib.nullcontext()
        with sampler:
            t0, s0 = time.perf_counter(), main_thread_sched()
            stage(batches)
            torch.cuda.synchronize()
            dt, s1 = time.perf_counter() - t0, main_thread_sched()
        print(f"{label:40s} {n / dt:7.2f} img/s {dt:6.2f} s; main thread on a core {s1[0] - s0[0]:.2f} s, "
              f"waiting for one {s1[1] - s0[1]:.2f} s", flush=True)

    @torch.inference_mode()
    def prefill(todo) -> None:
        for b in todo:
            adapter.model.model(**inputs_to_device(b.inputs, adapter.device, adapter.host_inputs), use_cache=True)

    def gather(dtype: str):
        return lambda todo: [adapter.gather(b, sel, dtype) for b in todo]

    def copies(todo) -> None:
        copied = [copier.submit(adapter.gather(b, sel, dtype)[0]) for b in todo]
        for c in copied:
            c.wait()
            c.release()

    spent = {"wait for copies": 0.0, "encode + write": 0.0, "syncfs": 0.0}

    def write(group: list, name: str) -> None:
        t0 = time.perf_counter()
        for c in group:
            c.wait()
        t1 = time.perf_counter()
        for kind in ("keys", "values"):
            seg = TokenSegments([c.host[kind] for c in group], axis=2)
            write_chunks(out / name / kind, seg, (1, 1, *seg.shape[2:]), codec)
        t2 = time.perf_counter()
        if os.environ.get("SYNC", "1") == "1":
            sync_tree(out / name)
        t3 = time.perf_counter()
        for c in group:
            c.release()
        for k, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2)):
            spent[k] += dt

    runs = [0]

    def full(todo) -> None:  # parts of two batches, two parts being written at a time
        runs[0] += 1  # new files every time: rewriting files whose pages are still dirty skips disk writes
        shutil.rmtree(out / str(runs[0] - 1), ignore_errors=True)
        with ThreadPoolExecutor(2) as writers:
            for i in range(0, len(todo), 2):
                group = [copier.submit(adapter.gather(b, sel, dtype)[0]) for b in todo[i:i + 2]]
                writers.submit(write, group, f"{runs[0]}/{i}")

    run("prefill", prefill)
    run("prefill+gather bfloat16", gather("bfloat16"))
    run("prefill+gather int8", gather("int8"))
    run("prefill+gather+copy (pool cold)", copies)
    run("prefill+gather+copy (pool warm)", copies)
    for threads in os.environ.get("THREADS", str(chunks.THREADS)).split(","):
        if int(threads) != chunks.THREADS:  # a new encoder pool of that size
            chunks.THREADS = int(threads)
            if chunks._pool is not None:
                chunks._pool.shutdown()
                chunks._pool = None
        for interval in os.environ.get("SWITCH", str(sys.getswitchinterval())).split(","):
            sys.setswitchinterval(float(interval))  # how long a thread keeps the GIL when others wait
            for k in spent:
                spent[k] = 0.0
            run(f"prefill+gather+copy+write ({threads} encoders, GIL switch {float(interval) * 1e3:g} ms)", full)
            print("  writer time by phase (both writers, warm-up included):",
                  ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()), flush=True)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
