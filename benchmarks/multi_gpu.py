"""Multi-GPU extraction with the Ray executor against one GPU, on the same images.

Runs, one after another on one host:
  1. local executor on cuda:0 (the single-GPU reference);
  2. Ray executor, one actor per GPU;
  3. Ray executor again, with one actor SIGKILLed right after the first part is committed.
Throughput is the steady rate from the moment every worker has committed its first part to the
last commit (model loading and each worker's first part excluded: Ray actors load their model
on their first part, and a first part pays the kernel warm-up). Stores 2 and 3
are compared with store 1 part by part through the CRC32C of every chunk file recorded in the
manifests (equal bytes on disk = equal K/V), and by decoded values where they differ.

    python benchmarks/multi_gpu.py --images 512 --out /tmp/mgpu
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import torch

from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore


def actor_pids() -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as fh:
                    if fh.read().startswith(b"ray::PartActor"):
                        out.append(int(d))
            except OSError:
                continue
    return sorted(out)


def run(cfg: ExtractConfig, kill: bool = False) -> dict:
    stamps: list[tuple[float, int]] = []
    killed: list[int] = []
    total = [0]

    def progress(n: int) -> None:
        total[0] += n
        stamps.append((time.perf_counter(), total[0]))
        if kill and not killed:
            pids = actor_pids()
            if pids:
                os.kill(pids[-1], signal.SIGKILL)
                killed.append(pids[-1])

    t0 = time.perf_counter()
    res = extract(cfg, progress=progress)
    wall = time.perf_counter() - t0
    # steady state: from the moment every worker has committed one part (its first part pays the
    # model's kernel warm-up) to the last commit
    workers = cfg.workers or 1
    (t_first, n_first), (t_last, n_last) = stamps[min(workers, len(stamps)) - 1], stamps[-1]
    steady = (n_last - n_first) / (t_last - t_first) if t_last > t_first else float("nan")
    return {"images": res.images_ok, "parts": res.parts_done, "wall_s": wall,
            "steady_img_s": steady, "killed_pid": killed[0] if killed else None,
            "timings": {k: round(v, 2) for k, v in res.timings.items()}}


def compare(ref: Path, other: Path) -> dict:
    a, b = FeatureStore.open(ref), FeatureStore.open(other)
    rows_equal = [(r.image_id, r.part, r.token_offset, r.n_tokens, r.segments) for r in a.images()] == \
                 [(r.image_id, r.part, r.token_offset, r.n_tokens, r.segments) for r in b.images()]
    same_parts = [p for p in a.checksums if a.checksums[p] == b.checksums.get(p)]
    diff_parts = sorted(set(a.checksums) - set(same_parts))
    max_abs = 0.0
    if diff_parts:  # decoded comparison of every (layer, head, kind)
        for kind in ("keys", "values"):
            for layer in a.meta.layers:
                for head in a.meta.heads:
                    x, y = a.read(kind, layer, head).data, b.read(kind, layer, head).data
                    max_abs = max(max_abs, float(np.nanmax(np.abs(x - y))))
    return {"rows_equal": rows_equal, "parts": len(a.checksums), "parts_identical": len(same_parts),
            "parts_differing": diff_parts, "max_abs_diff": max_abs}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="/tmp/kvpipe-mgpu")
    ap.add_argument("--model", default="qwen25vl")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--size", type=int, default=448)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--part-size", type=int, default=32)
    ap.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    ap.add_argument("--device", default="cuda", help="cuda, or cpu for a dry run with a tiny model")
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-kill", action="store_true", help="skip the run with a killed actor")
    args = ap.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    common = dict(model=args.model, dataset="synthetic", init="random",
                  dtype="bfloat16" if args.device == "cuda" else "float32", kinds="keys,values",
                  limit=args.images, batch_size=args.batch_size, part_size=args.part_size,
                  dataset_options={"width": args.size, "height": args.size, "n_frames": 8,
                                   "n_videos": -(-args.images // 8)})
    cuda = args.device == "cuda"
    report: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", **vars(args)}
    report["single"] = run(ExtractConfig(out=str(out / "single"), device="cuda:0" if cuda else "cpu", **common))
    print("single GPU:", json.dumps(report["single"]), flush=True)
    report["ray"] = run(ExtractConfig(out=str(out / "ray"), device=args.device, executor="ray",
                                      workers=args.gpus, **common))
    print(f"ray x{args.gpus}:", json.dumps(report["ray"]), flush=True)
    if not args.no_kill:
        report["ray_killed"] = run(ExtractConfig(out=str(out / "ray-killed"), device=args.device,
                                                 executor="ray", workers=args.gpus, **common), kill=True)
        print(f"ray x{args.gpus}, one actor killed:", json.dumps(report["ray_killed"]), flush=True)
    report["scaling"] = report["ray"]["steady_img_s"] / report["single"]["steady_img_s"]
    report["scaling_wall"] = report["single"]["wall_s"] / report["ray"]["wall_s"]
    report["ray_vs_single"] = compare(out / "single", out / "ray")
    if not args.no_kill:
        report["killed_vs_single"] = compare(out / "single", out / "ray-killed")
    print(json.dumps({k: report[k] for k in ("scaling", "scaling_wall", "ray_vs_single", "killed_vs_single")
                      if k in report}, indent=1), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
