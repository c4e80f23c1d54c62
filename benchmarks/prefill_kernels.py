"""Where an MLM's prefill spends GPU time, and what kvpipe's kernels (``accelerate``) change.

In one process, on the same batches of one model (random full-size weights):
  1. transformers' prefill as it comes: images/s, GPU time by kernel class (matmul,
     attention, everything else), GPU idle time, host synchronisations per batch;
  2. each of ``accelerate``'s changes added in turn: images/s;
  3. the K/V of one batch against step 1's (max |difference| relative to the values' scale,
     fraction of elements that differ) and the same profile again. The yardstick for those
     differences: the stock forward of the batch's first image alone against the same image
     in its batch (bf16 results depend on the batch's shape through the kernels chosen).

    python -m kvpipe.benchmarks.prefill_kernels --model llava-ov --image-size 384 --images 64 --batch-size 8
    python -m kvpipe.benchmarks.prefill_kernels --device cpu --model tiny-llava-ov --image-size 56 \
        --images 4 --batch-size 2      # a smoke run
"""

from __future__ import annotations

import argparse
import re
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import device_name, finish, forward, load_batches, parse_args, sync
from kvpipe.pipeline.models.capture import gather_batch
from kvpipe.pipeline.models.llava_next import SIZES_ON_HOST, LlavaNextAdapter
from kvpipe.pipeline.models.text_kernels import fuse_decoder_kernels

CLASSES = (("matmul", re.compile(r"gemm|cutlass|nvjet|sm\d\d_xmma|cublas|splitK", re.I)),
           ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)))


def kernel_class(name: str) -> str:
    return next((label for label, rx in CLASSES if rx.search(name)), "other")


def activities(device: torch.device) -> list[ProfilerActivity]:
    """What the profiler records: host calls, and the GPU's kernels on a CUDA device."""
    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])


def gpu_time(prof: profile) -> tuple[dict[str, float], Counter, float, list[tuple[float, str]]]:
    """A profile's GPU kernels: ms by kernel class, ms by kernel name, busy ms (the union of
    their intervals) and the idle gaps between them (ms, the kernel after each)."""
    by_class: dict[str, float] = defaultdict(float)
    by_name: Counter = Counter()
    spans = []
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA and ev.device_time > 0:
            by_class[kernel_class(ev.name)] += ev.device_time / 1e3
            by_name[ev.name[:90]] += ev.device_time / 1e3
            spans.append((ev.time_range.start, ev.time_range.end, ev.name))
    busy, end, gaps = 0.0, None, []
    for a, b, name in sorted(spans):  # union of kernel intervals (us)
        if end is not None and a > end:
            gaps.append(((a - end) / 1e3, name))
        if end is None or a > end:
            busy, end = busy + b - a, b
        elif b > end:
            busy, end = busy + b - end, b
    return by_class, by_name, busy / 1e3, gaps


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "data"))
    parser.set_defaults(model="llava-ov", image_size=384, images=64, batch_size=8)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    n, batch_size = args.images, args.batch_size
    adapter, images, batches, sel = load_batches(args, accelerate=False)
    device = adapter.device
    results: dict[str, float] = {}
    print(f"{args.model} {args.image_size}x{args.image_size}, batch {batch_size}, {n} images, "
          f"{batches[0].layouts[0].positions.numel()} image tokens, {device_name(device)}", flush=True)

    def run_forward(b) -> None:
        with torch.inference_mode():
            forward(adapter, b, device)

    def rate(label: str) -> float:
        t0 = time.perf_counter()
        run_forward(batches[0])  # warm-up (compiles on first use)
        sync(device)
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            run_forward(b)
        sync(device)
        ips = n / (time.perf_counter() - t0)
        results[label] = ips
        print(f"{label:55s} {ips:7.2f} img/s   (warm-up {warm:.1f} s)", flush=True)
        return ips

    def report_profile(label: str) -> None:
        todo = batches[:2]
        sync(device)
        with profile(activities=activities(device)) as prof:
            t0 = time.perf_counter()
            for b in todo:
                run_forward(b)
            sync(device)
            wall = time.perf_counter() - t0
        by_class, by_name, busy, _ = gpu_time(prof)
        per = 1e3 / len(todo)
        print(f"  [{label}] per batch: wall {wall * per:.0f} ms, GPU busy {busy / len(todo):.0f} ms; "
              + ", ".join(f"{k} {v / len(todo):.0f} ms" for k, v in sorted(by_class.items())), flush=True)
        for name, ms in by_name.most_common(12):
            print(f"    {ms / len(todo):7.1f} ms  {name}")

    def count_syncs() -> None:
        seen: Counter = Counter()

        def note(message, category, filename, lineno, file=None, line=None):
            frames = [f for f in traceback.extract_stack()[:-1]
                      if "transformers/" in f.filename or "kvpipe/" in f.filename]
            where = frames[-1] if frames else None
            seen[f"{where.filename.rsplit('/', 2)[-1]}:{where.lineno} {where.line}" if where else "?"] += 1

        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():  # restores showwarning and the filters on exit
                warnings.simplefilter("always")
                warnings.showwarning = note
                run_forward(batches[0])
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
        print(f"  host synchronisations in one batch's forward: {sum(seen.values())}")
        for where, k in seen.most_common(8):
            print(f"    {k:3d} x {where[:150]}")

    stock_ips = rate("transformers (stock)")
    report_profile("stock")
    count_syncs()
    reference, counts = gather_batch(adapter, batches[0], sel, "bfloat16")
    reference = {k: v.float() for k, v in reference.items()}

    def deviation(label: str, got: dict, ref: dict) -> None:
        for kind, want in ref.items():
            diff = (got[kind].float() - want).abs()
            print(f"  {label} {kind}: max |diff| {diff.max().item():.3g} (max |x| {want.abs().max().item():.3g}), "
                  f"mean |diff| / mean |x| {diff.mean().item() / want.abs().mean().item():.2e}, "
                  f"elements that differ {(diff > 0).float().mean().item():.2%}")

    # the yardstick: stock kernels, the first image alone against the same image in its batch
    alone, _ = gather_batch(adapter, adapter.preprocess(images[:1]), sel, "bfloat16")
    deviation(f"stock, batch of 1 vs batch of {batch_size}:", alone, {k: v[..., :counts[0], :] for k, v in reference.items()})
    # and the same weights in float32 (buffers such as RoPE's frequencies stay as they are)
    params = list(adapter.model.parameters())
    dtypes = [p.dtype for p in params]
    for p in params:
        p.data = p.data.float()
    exact, _ = gather_batch(adapter, batches[0], sel, "float32")
    for p, dtype in zip(params, dtypes):
        p.data = p.data.to(dtype)  # exact: the values came from that dtype
    exact = {k: v.float() for k, v in exact.items()}
    deviation(f"stock {args.dtype} vs float32 weights:", reference, exact)

    steps = []
    if isinstance(adapter, LlavaNextAdapter):  # LLaVA-NeXT / OV: image sizes read on the host
        steps.append(("+ image sizes on the host", lambda: setattr(adapter, "host_inputs", SIZES_ON_HOST)))
    steps.append(("+ fused RMSNorm, SiLU*up, rotary (torch.compile)",
                  lambda: print("  ", fuse_decoder_kernels(adapter.language_model(), adapter.device))))
    steps.append(("+ the rest of accelerate()", lambda: print("  ", adapter.accelerate())))
    for label, apply in steps:
        apply()
        rate(label)
    report_profile("accelerated")
    count_syncs()
    got, _ = gather_batch(adapter, batches[0], sel, "bfloat16")
    deviation("accelerated vs stock, same batch:", got, reference)
    deviation(f"accelerated {args.dtype} vs float32 weights:", got, exact)
    speedup = rate("accelerated (again)") / stock_ips
    print(f"accelerated / stock: {speedup:.2f} x")
    return finish(args, {"images_per_s": results, "accelerated_over_stock": speedup})


if __name__ == "__main__":
    main()
