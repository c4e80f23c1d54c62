"""Where a batch's time goes in extraction: prefill, + gather, + host copy, + chunk writes.

Runs, in one process on the same batches of one model (random full-size weights), the
stages of kvpipe's capture path cumulatively and prints images/s for each:

  prefill                          the base model's forward with use_cache (kvpipe's kernels)
  prefill+gather bfloat16 / int8 / int4
                                   + the gather of every layer's K/V on the device
  prefill+gather+copy (pool cold)  + the host copies (transfer.HostCopier), host buffers new
  prefill+gather+copy (pool warm)  the same with the buffers reused
  prefill+gather+copy+write        + each part's chunks encoded and written (store.chunks),
                                   one syncfs per part, parts of two batches, two writers

    python -m kvpipe.benchmarks.capture_stages --model llava-ov --image-size 384 --images 64 --batch-size 8
    python -m kvpipe.benchmarks.capture_stages ... --pageable --codec lz4bit --store-dtype int8 --no-sync \
        --threads 4,16 --switch 0.005,0.0005 --dir /dev/shm
        # pageable host buffers, the codec (store.encoding.CODECS), the int8 encoding (copies and writes), no
        # syncfs, the write stage once per encoder pool size and GIL switch interval (seconds),
        # the parts written under --dir (/dev/shm: memory only, no disk)
    python -m kvpipe.benchmarks.capture_stages ... --sample   # where the main thread waits in the write stages
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, forward, load_batches, parse_args, sync
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
    """Where the main thread is when it is off its core (--sample): every 2 ms, its kernel
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


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "data", "out"))
    parser.add_argument("--store-dtype", default="bfloat16",
                        help="encoding of the copies and writes: bfloat16 | int8 | int4 (default: %(default)s)")
    parser.add_argument("--codec", default="zstd", help="store codec (store.encoding.CODECS; default: %(default)s)")
    parser.add_argument("--pageable", action="store_true", help="pageable host buffers instead of page-locked ones")
    parser.add_argument("--no-sync", dest="sync", action="store_false", help="no syncfs after each part's writes")
    parser.add_argument("--threads", default=None,
                        help="encoder pool sizes, comma list: the write stage once per size (default: kvpipe's)")
    parser.add_argument("--switch", default=None,
                        help="GIL switch intervals in seconds, comma list: the write stage once per interval "
                             "(default: Python's)")
    parser.add_argument("--sample", action="store_true", help="where the main thread waits in the write stages")
    parser.set_defaults(model="llava-ov", image_size=384, images=64, batch_size=8)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    adapter, _, batches, sel = load_batches(args)
    n = args.images
    device = adapter.device
    copier = HostCopier(device, pinned=not args.pageable)
    dtype = args.store_dtype
    codec = compressor_for(compressor_meta(dtype, args.codec), dtype)
    out = Path(tempfile.mkdtemp(prefix="kvpipe-stages-", dir=args.out))  # --dir /dev/shm: no disk
    results: dict[str, float] = {}

    def run(label: str, stage) -> None:
        stage(batches[:1])  # warm-up
        sync(device)
        sampling = args.sample and "write" in label
        sampler = MainThreadSampler() if sampling else contextlib.nullcontext()
        with sampler:
            t0, s0 = time.perf_counter(), main_thread_sched()
            stage(batches)
            sync(device)
            dt, s1 = time.perf_counter() - t0, main_thread_sched()
        results[label] = n / dt
        print(f"{label:40s} {n / dt:7.2f} img/s {dt:6.2f} s; main thread on a core {s1[0] - s0[0]:.2f} s, "
              f"waiting for one {s1[1] - s0[1]:.2f} s", flush=True)

    @torch.inference_mode()
    def prefill(todo) -> None:
        for b in todo:
            forward(adapter, b, device)

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
        if args.sync:
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

    threads_before, switch_before = chunks.THREADS, sys.getswitchinterval()
    try:
        run("prefill", prefill)
        run("prefill+gather bfloat16", gather("bfloat16"))
        run("prefill+gather int8", gather("int8"))
        run("prefill+gather int4", gather("int4"))
        run("prefill+gather+copy (pool cold)", copies)
        run("prefill+gather+copy (pool warm)", copies)
        for threads in comma_list(args.threads or str(chunks.THREADS), int):
            chunks.set_threads(threads)  # a new encoder pool of that size
            for interval in comma_list(args.switch or str(sys.getswitchinterval()), float):
                sys.setswitchinterval(interval)  # how long a thread keeps the GIL when others wait
                for k in spent:
                    spent[k] = 0.0
                run(f"prefill+gather+copy+write ({threads} encoders, GIL switch {interval * 1e3:g} ms)", full)
                print("  writer time by phase (both writers, warm-up included):",
                      ", ".join(f"{k} {v:.2f} s" for k, v in spent.items()), flush=True)
    finally:
        chunks.set_threads(threads_before)
        sys.setswitchinterval(switch_before)
        shutil.rmtree(out, ignore_errors=True)
    return finish(args, {"images_per_s": results})


if __name__ == "__main__":
    main()
