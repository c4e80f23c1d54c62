"""Where a batch's time goes in extraction: prefill, + gather, + host copy, + chunk writes.

Runs, in one process on the same batches of one model (random full-size weights), the
stages of kvpipe's capture path cumulatively and prints images/s for each:

  prefill                          the base model's forward with use_cache (kvpipe's kernels)
  prefill+gather+copy (pool cold)  + the device gather and the host copies, host buffers new
  prefill+gather+copy (pool warm)  the same with the buffers reused
  prefill+gather+copy+write        + each part's chunks encoded and written (store.chunks),
                                   one syncfs per part, parts of two batches, two writers

    python benchmarks/capture_stages.py llava-ov 384 64 8      # model, image side, images, batch
    PINNED=1 CODEC=lz4 python benchmarks/capture_stages.py ...  # pinned host buffers, lz4 codec
"""
import sys, time, torch, numpy as np
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.capture import Selection
from kvpipe.pipeline.transfer import HostCopier
from kvpipe.store.chunks import TokenSegments, write_chunks, pool
from kvpipe.store.encoding import compressor
from pathlib import Path
from kvpipe.store.fs import sync_tree
model, size, n, bs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
a = load_model(model, dtype="bfloat16", device="cuda", init="random"); a.accelerate()
ds = create_dataset("synthetic", limit=n, n_videos=-(-n//8), n_frames=8, width=size, height=size)
imgs = [r.image() for r in ds.records()]
batches = [a.preprocess(imgs[i:i+bs]) for i in range(0, n, bs)]
sel = Selection(tuple(range(a.n_layers)), tuple(range(a.n_kv_heads)), ("keys", "values"))
def run(label, fn):
    fn(batches[:1]); torch.cuda.synchronize()
    t0 = time.perf_counter(); extra = fn(batches); torch.cuda.synchronize(); dt = time.perf_counter() - t0
    print(f"{label:40s} {n/dt:7.2f} img/s {dt:6.2f} s {extra or ''}", flush=True)
@torch.inference_mode()
def prefill(bs_):
    for b in bs_:
        inp = {k: (v.to("cuda") if isinstance(v, torch.Tensor) else v) for k, v in b.inputs.items()}
        a.model.model(**inp, use_cache=True)
def gather(bs_):
    t = 0.0
    for b in bs_:
        t0 = time.perf_counter(); a.gather(b, sel, "bfloat16"); t += time.perf_counter() - t0
    return f"python time in gather {t:.2f}"
for dt_ in ("bfloat16", "int8"):
    def gather_dt(bs_, dt_=dt_):
        for b in bs_: a.gather(b, sel, dt_)
    run(f"prefill+gather {dt_}", gather_dt)
run("prefill", prefill)

import os
cop = HostCopier(torch.device("cuda"), pinned=os.environ.get("PINNED") == "1")
def copies(bs_):
    cs = []
    for b in bs_:
        arr, _ = a.gather(b, sel, "bfloat16"); cs.append(cop.submit(arr))
    for c in cs: c.wait()
    for c in cs: c.release()
run("prefill+gather+copy (pool cold)", copies)
run("prefill+gather+copy (pool warm)", copies)
comp = compressor("bfloat16", cname=os.environ.get("CODEC", "zstd"))
out = Path("/tmp/profw"); import shutil
def full(bs_):
    futs = []; cs = []
    from concurrent.futures import ThreadPoolExecutor
    ex = ThreadPoolExecutor(2)
    for i in range(0, len(bs_), 2):
        group = []
        for b in bs_[i:i+2]:
            arr, _ = a.gather(b, sel, "bfloat16"); c = cop.submit(arr); group.append(c)
        def write(group=group, i=i):
            for c in group: c.wait()
            for k in ("keys", "values"):
                seg = TokenSegments([c.host[k] for c in group], 2)
                write_chunks(out / f"{i}" / k, seg, (1, 1, *seg.shape[2:]), comp)
            sync_tree(out / f"{i}")
            for c in group: c.release()
        futs.append(ex.submit(write))
    t0 = time.perf_counter()
    for f in futs: f.result()
    return f"write tail {time.perf_counter()-t0:.2f}"
shutil.rmtree(out, ignore_errors=True)
run("prefill+gather+copy+write (fsync)", full)
