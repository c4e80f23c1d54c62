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
    PINNED=1 CODEC=lz4 python benchmarks/capture_stages.py ...  # pinned host buffers, lz4 codec
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from kvpipe.pipeline.capture import Selection
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.transfer import HostCopier
from kvpipe.store.chunks import TokenSegments, write_chunks
from kvpipe.store.encoding import compressor
from kvpipe.store.fs import sync_tree


def main(model: str, size: int, n: int, batch_size: int) -> None:
    adapter = load_model(model, dtype="bfloat16", device="cuda", init="random")
    adapter.accelerate()
    ds = create_dataset("synthetic", limit=n, n_videos=-(-n // 8), n_frames=8, width=size, height=size)
    images = [r.image() for r in ds.records()]
    batches = [adapter.preprocess(images[i:i + batch_size]) for i in range(0, n, batch_size)]
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    copier = HostCopier(torch.device("cuda"), pinned=os.environ.get("PINNED") == "1")
    codec = compressor("bfloat16", cname=os.environ.get("CODEC", "zstd"))
    out = Path(tempfile.mkdtemp(prefix="kvpipe-stages-"))

    def run(label: str, stage) -> None:
        stage(batches[:1])  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        stage(batches)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        print(f"{label:40s} {n / dt:7.2f} img/s {dt:6.2f} s", flush=True)

    @torch.inference_mode()
    def prefill(todo) -> None:
        for b in todo:
            adapter.model.model(**{k: (v.to("cuda") if isinstance(v, torch.Tensor) else v)
                                   for k, v in b.inputs.items()}, use_cache=True)

    def gather(dtype: str):
        return lambda todo: [adapter.gather(b, sel, dtype) for b in todo]

    def copies(todo) -> None:
        copied = [copier.submit(adapter.gather(b, sel, "bfloat16")[0]) for b in todo]
        for c in copied:
            c.wait()
            c.release()

    def write(group: list, name: str) -> None:
        for c in group:
            c.wait()
        for kind in ("keys", "values"):
            seg = TokenSegments([c.host[kind] for c in group], axis=2)
            write_chunks(out / name / kind, seg, (1, 1, *seg.shape[2:]), codec)
        sync_tree(out / name)
        for c in group:
            c.release()

    def full(todo) -> None:  # parts of two batches, two parts being written at a time
        with ThreadPoolExecutor(2) as writers:
            for i in range(0, len(todo), 2):
                group = [copier.submit(adapter.gather(b, sel, "bfloat16")[0]) for b in todo[i:i + 2]]
                writers.submit(write, group, str(i))

    run("prefill", prefill)
    run("prefill+gather bfloat16", gather("bfloat16"))
    run("prefill+gather int8", gather("int8"))
    run("prefill+gather+copy (pool cold)", copies)
    run("prefill+gather+copy (pool warm)", copies)
    run("prefill+gather+copy+write", full)
    shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]))
