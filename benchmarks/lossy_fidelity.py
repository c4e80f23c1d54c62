"""What the lossy int8 encoding does to probe results, against the lossless store.

Extracts the same model and images twice (lossless float32 or bfloat16, and ``--store-dtype
int8``), runs every probe the dataset supports on both, and reports per task: the largest and
the mean absolute change of the primary metric over all (layer, head, kind) targets, whether
the best target is the same, and the stored bytes. Also the reconstruction error of the
features themselves (relative to each token's largest magnitude).

    python -m kvpipe.benchmarks.lossy_fidelity --out /tmp/kvpipe-lossy
    python -m kvpipe.benchmarks.lossy_fidelity --model tiny-llava-ov --images 48 --out /tmp/kvpipe-lossy-ov
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.probes import PROBES
from kvpipe.probes.runner import run_probe
from kvpipe.store import FeatureStore


def stored_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "parts").rglob("*") if f.is_file())


def feature_error(ref: FeatureStore, lossy: FeatureStore) -> dict[str, float]:
    errs, cos = [], []
    for kind in ("keys", "values"):
        for layer in ref.meta.layers:
            for head in ref.meta.heads:
                a, b = ref.read(kind, layer, head).data, lossy.read(kind, layer, head).data
                peak = np.maximum(np.abs(a).max(1), 1e-30)
                errs.append(np.abs(a - b).max(1) / peak)
                cos.append((a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30))
    e, c = np.concatenate(errs), np.concatenate(cos)
    return {"max_rel_error": float(e.max()), "mean_rel_error": float(e.mean()), "min_cosine": float(c.min())}


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "parts", "out"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--images", type=int, default=None, help="images of the dataset (default: all)")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--reference-dtype", default="float32",
                        help="the lossless store's dtype (default: %(default)s)")
    parser.add_argument("--tasks", default=None, help="probes to compare, comma list (default: every probe the "
                                                      "dataset supports)")
    parser.set_defaults(model="tiny-qwen25vl", init="pretrained", dtype="float32", device="cpu", part_size=8)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    if args.out is None:
        raise SystemExit("lossy_fidelity needs --out (the directory for its two stores)")
    shutil.rmtree(args.out, ignore_errors=True)
    stores = {}
    for name, dtype in (("reference", args.reference_dtype), ("int8", "int8")):
        stores[name] = args.out / name
        extract(ExtractConfig(model=args.model, dataset=args.dataset, out=str(stores[name]), limit=args.images,
                              init=args.init, dtype=args.dtype, device=args.device, store_dtype=dtype,
                              batch_size=args.batch_size, part_size=args.part_size))
    ref, lossy = FeatureStore.open(stores["reference"]), FeatureStore.open(stores["int8"])
    report = {"model": args.model, "dataset": args.dataset, "images": len(ref.images()),
              "bytes_per_image": {k: stored_bytes(v) / len(ref.images()) for k, v in stores.items()},
              "features": feature_error(ref, lossy), "tasks": {}}
    tasks = [t for t in (ref.meta.dataset.tasks or ()) if t in PROBES
             and (args.tasks is None or t in comma_list(args.tasks))]
    print(f"{'task':16s} {'metric':10s} {'targets':>7s} {'max |d|':>8s} {'mean |d|':>8s} {'best ref':>8s} "
          f"{'best int8':>9s} same-best")
    for task in tasks:
        metric = PROBES.get(task).primary_metric
        tables = {k: run_probe(v, task, use_cache=False, save_predictions="none").table.to_pylist() for k, v in stores.items()}
        vals = [{(r["kind"], r["layer"], r["head"]): r["value"] for r in t if r["metric"] == metric}
                for t in tables.values()]
        keys = sorted(k for k in vals[0] if k in vals[1] and np.isfinite(vals[0][k]) and np.isfinite(vals[1][k]))
        d = np.array([abs(vals[0][k] - vals[1][k]) for k in keys])
        best = [max(keys, key=lambda k: v[k]) for v in vals]
        row = {"metric": metric, "targets": len(keys), "max_abs_diff": float(d.max()),
               "mean_abs_diff": float(d.mean()), "best_reference": vals[0][best[0]], "best_int8": vals[1][best[1]],
               "same_best_target": best[0] == best[1]}
        report["tasks"][task] = row
        print(f"{task:16s} {metric:10s} {len(keys):7d} {row['max_abs_diff']:8.4f} {row['mean_abs_diff']:8.4f} "
              f"{row['best_reference']:8.4f} {row['best_int8']:9.4f} {row['same_best_target']}")
    print(json.dumps({k: report[k] for k in ("bytes_per_image", "features")}, indent=1))
    return finish(args, report)


if __name__ == "__main__":
    main()
