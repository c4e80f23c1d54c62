"""Where an MLM's prefill spends GPU time, and what kvpipe's kernels (``accelerate``) change.

In one process, on the same batches of one model (random full-size weights):
  1. transformers' prefill as it comes: images/s, GPU time by kernel class (matmul,
     attention, everything else), GPU idle time, host synchronisations per batch;
  2. each of ``accelerate``'s changes added in turn: images/s;
  3. the K/V of one batch against step 1's (max |difference| relative to the values' scale,
     fraction of elements that differ) and the same profile again. The yardstick for those
     differences: the stock forward of the batch's first image alone against the same image
     in its batch (bf16 results depend on the batch's shape through the kernels chosen).

    python benchmarks/prefill_kernels.py llava-ov 384 64 8     # model, image side, images, batch
    DEVICE=cpu python benchmarks/prefill_kernels.py tiny-llava-ov 56 4 2     # a smoke run
"""

from __future__ import annotations

import os
import re
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from kvpipe.pipeline.models.capture import Selection, gather_batch, inputs_to_device
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.llava_next import SIZES_ON_HOST, LlavaNextAdapter
from kvpipe.pipeline.models.text_kernels import fuse_decoder_kernels

CLASSES = (("matmul", re.compile(r"gemm|cutlass|nvjet|sm\d\d_xmma|cublas|splitK", re.I)),
           ("attention", re.compile(r"flash|fmha|attention|efficient", re.I)))


def kernel_class(name: str) -> str:
    return next((label for label, rx in CLASSES if rx.search(name)), "other")


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


def main(model: str, size: int, n: int, batch_size: int) -> None:
    device = os.environ.get("DEVICE", "cuda")
    adapter = load_model(model, dtype="bfloat16", device=device, init="random")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    ds = create_dataset("synthetic", limit=n, n_videos=-(-n // 8), n_frames=8, width=size, height=size)
    images = [r.image() for r in ds.records()]
    batches = [adapter.preprocess(images[i:i + batch_size]) for i in range(0, n, batch_size)]
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    print(f"{model} {size}x{size}, batch {batch_size}, {n} images, "
          f"{batches[0].layouts[0].positions.numel()} image tokens, "
          f"{torch.cuda.get_device_name() if device == 'cuda' else device}", flush=True)

    @torch.inference_mode()
    def forward(b) -> None:
        adapter.model.model(**inputs_to_device(b.inputs, adapter.device, adapter.host_inputs), use_cache=True)

    def rate(label: str) -> float:
        t0 = time.perf_counter()
        forward(batches[0])  # warm-up (compiles on first use)
        sync()
        warm = time.perf_counter() - t0
        t0 = time.perf_counter()
        for b in batches:
            forward(b)
        sync()
        ips = n / (time.perf_counter() - t0)
        print(f"{label:55s} {ips:7.2f} img/s   (warm-up {warm:.1f} s)", flush=True)
        return ips

    def report_profile(label: str) -> None:
        todo = batches[:2]
        sync()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            t0 = time.perf_counter()
            for b in todo:
                forward(b)
            sync()
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

        if device == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():  # restores showwarning and the filters on exit
                warnings.simplefilter("always")
                warnings.showwarning = note
                forward(batches[0])
        finally:
            if device == "cuda":
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
    for p in params:
        p.data = p.data.float()
    exact, _ = gather_batch(adapter, batches[0], sel, "float32")
    for p in params:
        p.data = p.data.to(torch.bfloat16)  # exact: the values came from bfloat16
    exact = {k: v.float() for k, v in exact.items()}
    deviation("stock bfloat16 vs float32 weights:", reference, exact)

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
    deviation("accelerated bfloat16 vs float32 weights:", got, exact)
    print(f"accelerated / stock: {rate('accelerated (again)') / stock_ips:.2f} x")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
