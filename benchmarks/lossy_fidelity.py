"""What the lossy int8 encoding does to probe results, against the lossless store.

Extracts the same model and images twice (lossless float32 or bfloat16, and ``--store-dtype
int8``), runs every probe the dataset supports on both, and reports per task: the largest and
the mean absolute change of the primary metric over all (layer, head, kind) targets, whether
the best target is the same, and the stored bytes. Also the reconstruction error of the
features themselves (relative to each token's largest magnitude).

    python benchmarks/lossy_fidelity.py --out /tmp/kvpipe-lossy
    python benchmarks/lossy_fidelity.py --model tiny-llava-ov --limit 48 --out /tmp/kvpipe-lossy-ov
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from kvpipe.pipeline.extract import ExtractConfig, extract
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-qwen25vl")
    ap.add_argument("--dataset", default="synthetic")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--reference-dtype", default="float32")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    stores = {}
    for name, dtype in (("reference", args.reference_dtype), ("int8", "int8")):
        stores[name] = args.out / name
        extract(ExtractConfig(model=args.model, dataset=args.dataset, out=str(stores[name]), limit=args.limit,
                              store_dtype=dtype, batch_size=4, part_size=8))
    ref, lossy = FeatureStore.open(stores["reference"]), FeatureStore.open(stores["int8"])
    report = {"model": args.model, "dataset": args.dataset, "images": len(ref.images()),
              "bytes_per_image": {k: stored_bytes(v) / len(ref.images()) for k, v in stores.items()},
              "features": feature_error(ref, lossy), "tasks": {}}
    tasks = [t for t in (ref.meta.dataset.tasks or ()) if t in PROBES]
    print(f"{'task':16s} {'metric':10s} {'targets':>7s} {'max |d|':>8s} {'mean |d|':>8s} {'best ref':>8s} "
          f"{'best int8':>9s} same-best")
    for task in tasks:
        metric = PROBES.get(task).primary_metric
        tables = {k: run_probe(v, task, use_cache=False).table.to_pylist() for k, v in stores.items()}
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
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
