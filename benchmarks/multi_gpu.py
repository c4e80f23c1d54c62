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

    python -m kvpipe.benchmarks.multi_gpu --images 512 --out /tmp/mgpu
    python -m kvpipe.benchmarks.multi_gpu --device cpu --model tiny-qwen25vl --gpus 1 ...   # a dry run on the CPU
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

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import args_dict, device_name, finish, parse_args, synthetic_options
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


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help,
                                    groups=("model", "device", "data", "parts", "out"))
    parser.add_argument("--gpus", type=int, default=None, help="Ray actors, one per GPU (default: the GPUs torch "
                                                               "sees; 1 on the CPU)")
    parser.add_argument("--no-kill", action="store_true", help="skip the run with a killed actor")
    parser.add_argument("--executor", default="ray", help="executor of the multi-GPU runs (default: %(default)s; "
                                                          "local: a dry run of this script without Ray)")
    parser.set_defaults(model="qwen25vl", dtype=None, images=512, image_size=448, batch_size=16, part_size=32,
                        out=Path("/tmp/kvpipe-mgpu"))
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    if args.gpus is None:
        args.gpus = max(1, torch.cuda.device_count())
    if args.dtype is None:  # bfloat16 on the GPU; float32 for a dry run on the CPU
        args.dtype = "bfloat16" if args.device.startswith("cuda") else "float32"
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    cuda = args.device == "cuda"
    shared = dict(model=args.model, dataset="synthetic", init=args.init, dtype=args.dtype, kinds="keys,values",
                  limit=args.images, batch_size=args.batch_size, part_size=args.part_size,
                  dataset_options=synthetic_options(args.images, args.image_size, args.seed))
    report: dict = {"gpu": device_name("cuda:0" if cuda else args.device), **args_dict(args)}
    report["single"] = run(ExtractConfig(out=str(out / "single"), device="cuda:0" if cuda else args.device,
                                         **shared))
    print("single GPU:", json.dumps(report["single"]), flush=True)
    report["ray"] = run(ExtractConfig(out=str(out / "ray"), device=args.device, executor=args.executor,
                                      workers=args.gpus, **shared))
    print(f"{args.executor} x{args.gpus}:", json.dumps(report["ray"]), flush=True)
    if not args.no_kill:
        report["ray_killed"] = run(ExtractConfig(out=str(out / "ray-killed"), device=args.device,
                                                 executor=args.executor, workers=args.gpus, **shared), kill=True)
        print(f"{args.executor} x{args.gpus}, one actor killed:", json.dumps(report["ray_killed"]), flush=True)
    report["scaling"] = report["ray"]["steady_img_s"] / report["single"]["steady_img_s"]
    report["scaling_wall"] = report["single"]["wall_s"] / report["ray"]["wall_s"]
    report["ray_vs_single"] = compare(out / "single", out / "ray")
    if not args.no_kill:
        report["killed_vs_single"] = compare(out / "single", out / "ray-killed")
    print(json.dumps({k: report[k] for k in ("scaling", "scaling_wall", "ray_vs_single", "killed_vs_single")
                      if k in report}, indent=1), flush=True)
    return finish(args, report)


if __name__ == "__main__":
    main()
