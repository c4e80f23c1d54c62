"""What the lossy encodings do to probe results, against the lossless store.

Extracts the same model and images once lossless (float32 or bfloat16) and once per lossy
``--store-dtype`` (``--encodings``, default int8 and int4), runs every probe the dataset supports
on each, and reports per encoding and task: the largest and mean absolute change of the primary
metric over all (layer, head, kind) targets, whether the best target is the same, and the stored
bytes; for a probe with a random seed (cosegmentation's k-means) also the same figures between
two seeds on the lossless store (row ``seed+1``), the estimator's own spread; where the best
target differs, its regret (the lossless score lost by taking the lossy store's choice) beside
the lossless store's own lead of its best target over the runner-up (``ref-gap``); per
encoding the cosine of every decoded K/V token to its lossless vector. A second table
compares candidate encodings on the lossless features themselves (host quantisers, nothing
stored): int8, int4 with and without the Hadamard rotation, fp8 e4m3 with a per-token scale, and
the Gaussian-optimal 4-bit and 3-bit (Lloyd-Max) codebooks after the rotation.

    python -m kvpipe.benchmarks.lossy_fidelity --out /tmp/kvpipe-lossy
    python -m kvpipe.benchmarks.lossy_fidelity --model tiny-llava-ov --images 48 --out /tmp/kvpipe-lossy-ov
    # more images of the synthetic videos (16 x 6 = 96): --option is a dataset option
    python -m kvpipe.benchmarks.lossy_fidelity --option n_videos=16 --out /tmp/kvpipe-lossy-96
    # the full-size architecture with random weights (random-7B features are not real features:
    # this measures the encodings on 7B-shaped activations, not probe quality); about 30 minutes
    # and 18 GB of memory on a 2-core CPU, --device cuda on a GPU host
    python -m kvpipe.benchmarks.lossy_fidelity --model qwen25vl --init random --device cpu --dtype bfloat16 \
        --reference-dtype bfloat16 --batch-size 4 --out /tmp/kvpipe-lossy-7b

``--recode`` makes each lossy store from the lossless one (``store.recode``: the same bytes as
extracting it, tested) instead of running the model once per encoding; ``pca@STEP`` in
``--encodings`` is pca with that ``--pca-step``:

    python -m kvpipe.benchmarks.lossy_fidelity --model qwen25vl --init random --device cpu --dtype bfloat16 \
        --reference-dtype bfloat16 --encodings int4,pca@0.35,pca --recode --out /tmp/kvpipe-lossy-7b

``--resume`` keeps the complete stores of an earlier run in ``--out`` and extracts only the
missing ones: a run killed while probing redoes its probes (``--tasks``) without the model in
memory (a 7B model held through the probes of 96 images outgrew 24 GB).

A task the store cannot serve (e.g. fg-seg with fewer supports per episode than its shots) is
reported under "skipped"; the others still count.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args
from kvpipe.cli.common import parse_params
from kvpipe.errors import StoreError, UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.probes import PROBES
from kvpipe.probes.runner import run_probe
from kvpipe.store import FeatureStore
from kvpipe.store.recode import recode


SEED_ROW = "seed+1"  # the row of a randomised probe's lossless rerun with the next seed


def stored_bytes(root: Path) -> int:
    return sum(f.stat().st_size for f in (root / "parts").rglob("*") if f.is_file())


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)


def feature_error(ref: FeatureStore, lossy: FeatureStore) -> dict[str, float]:
    errs, cos, sq, energy = [], [], 0.0, 0.0
    for kind in ("keys", "values"):
        for layer in ref.meta.layers:
            for head in ref.meta.heads:
                a, b = ref.read(kind, layer, head).data, lossy.read(kind, layer, head).data
                peak = np.maximum(np.abs(a).max(1), 1e-30)
                errs.append(np.abs(a - b).max(1) / peak)
                cos.append(_cosine(a, b))
                sq += float(((a - b).astype(np.float64) ** 2).sum())
                energy += float((a.astype(np.float64) ** 2).sum())
    e, c = np.concatenate(errs), np.concatenate(cos)
    # rel_sq_error: the squared error over the vectors' energy, every K/V target together (the
    # "relative squared error" that docs/BENCHMARKS.md compares encodings at)
    return {"max_rel_error": float(e.max()), "mean_rel_error": float(e.mean()), "min_cosine": float(c.min()),
            "mean_cosine": float(c.mean()), "rel_sq_error": sq / max(energy, 1e-30)}


def _fp8(x: np.ndarray) -> np.ndarray:
    """fp8 e4m3 with a per-token float32 scale (max |x| / 448), decoded back (torch's rounding)."""
    import torch

    t = torch.from_numpy(x)
    scale = t.abs().amax(-1, keepdim=True) / 448.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return ((t / scale).to(torch.float8_e4m3fn).float() * scale).numpy()


# the positive levels of the MSE-optimal scalar quantisers of a unit Gaussian (Max 1960, Table I;
# Lloyd's algorithm gives the same): 16 levels, the codebook of rotation-based 4-bit KV coders
# (TurboQuant-style), and 8 levels, the 3-bit code the 4 x size target would need (MSE 0.009497
# and 0.03454 of the variance)
LLOYD_MAX_16 = np.array([0.1284, 0.3881, 0.6568, 0.9424, 1.2562, 1.6181, 2.0690, 2.7326])
LLOYD_MAX_8 = np.array([0.2451, 0.7560, 1.3439, 2.1520])


def _lloyd_max(x: np.ndarray, half: np.ndarray = LLOYD_MAX_16) -> np.ndarray:
    """Rotated (kvpipe's signs + Hadamard), each coordinate coded by the Gaussian codebook
    (``half``: its positive levels) scaled by the token's RMS (norm / sqrt(D): one float32 per
    token), decoded back."""
    from kvpipe.store.quant import rotate, unrotate

    levels = np.concatenate([-half[::-1], half])
    bounds = (levels[1:] + levels[:-1]) / 2
    y = rotate(x.astype(np.float32))
    rms = np.maximum(np.linalg.norm(y, axis=-1, keepdims=True) / np.sqrt(y.shape[-1]), 1e-30)
    return unrotate((levels[np.searchsorted(bounds, y / rms)] * rms).astype(np.float32))


def candidates() -> dict[str, tuple[float, object]]:
    """Encodings compared on the features: name -> (bytes per 128-number token, encode + decode)."""
    from kvpipe.store.encoding import dequantize_int8, quantize_int8
    from kvpipe.store.quant import dequantize_int4, int4_stored_dim, quantize_int4

    return {"int8": (132, lambda x: dequantize_int8(quantize_int8(x))),
            "fp8-e4m3": (132, _fp8),
            "int4 (hadamard)": (int4_stored_dim(128), lambda x: dequantize_int4(quantize_int4(x), x.shape[-1])),
            "int4 (no rotation)": (int4_stored_dim(128), lambda x: dequantize_int4(
                quantize_int4(x, rotation="none"), x.shape[-1], rotation="none")),
            "4-bit Lloyd-Max (hadamard, RMS scale)": (64 + 4, _lloyd_max),
            "3-bit Lloyd-Max (hadamard, RMS scale)": (48 + 4, lambda x: _lloyd_max(x, LLOYD_MAX_8))}


def compare_candidates(ref: FeatureStore) -> dict[str, dict[str, float]]:
    out = {}
    for name, (nbytes, roundtrip) in candidates().items():
        cos, rel = [], []
        for kind in ("keys", "values"):
            for layer in ref.meta.layers:
                for head in ref.meta.heads:
                    a = ref.read(kind, layer, head).data
                    b = roundtrip(a)
                    cos.append(_cosine(a, b))
                    rel.append(np.linalg.norm(a - b, axis=1) / np.maximum(np.linalg.norm(a, axis=1), 1e-30))
        c, r = np.concatenate(cos), np.concatenate(rel)
        out[name] = {"bytes_per_128": nbytes, "mean_cosine": float(c.mean()), "min_cosine": float(c.min()),
                     "mean_rel_l2": float(r.mean())}
    return out


def _complete(root: Path) -> bool:
    """A store from an earlier run of this script, every part committed: --resume keeps it."""
    try:
        return FeatureStore.open(root).complete
    except StoreError:  # absent or unreadable: extract it (again)
        return False


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("model", "device", "parts", "out"))
    parser.add_argument("--dataset", default="synthetic")
    parser.add_argument("--images", type=int, default=None, help="images of the dataset (default: all)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="dataset option (repeatable), e.g. n_videos=16 for synthetic's 96 images")
    parser.add_argument("--batch-size", type=int, default=4, help="images per forward pass (default: %(default)s)")
    parser.add_argument("--reference-dtype", default="float32",
                        help="the lossless store's dtype (default: %(default)s)")
    parser.add_argument("--encodings", default="int8,int4", help="lossy store dtypes to extract and probe, comma "
                                                                    "list; pca@STEP: pca with that --pca-step "
                                                                    "(default: %(default)s)")
    parser.add_argument("--tasks", default=None, help="probes to compare, comma list (default: every probe the "
                                                      "dataset supports)")
    parser.add_argument("--recode", action="store_true",
                        help="make the lossy stores by recoding the lossless one (kvpipe.store.recode: the "
                             "bytes extraction writes, without running the model again); needs "
                             "--reference-dtype equal to --dtype")
    parser.add_argument("--resume", action="store_true",
                        help="keep the stores of an earlier run in --out whose parts are all committed "
                             "(same arguments), extract the rest, then probe")
    parser.set_defaults(model="tiny-qwen25vl", init="pretrained", dtype="float32", device="cpu", part_size=8)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    if args.out is None:
        raise SystemExit("lossy_fidelity needs --out (the directory for its stores)")
    if not args.resume:
        shutil.rmtree(args.out, ignore_errors=True)
    encodings = comma_list(args.encodings)
    dataset_options = parse_params(args.option, "--option")
    stores = {}
    for name, dtype in (("reference", args.reference_dtype), *((e, e) for e in encodings)):
        stores[name] = args.out / name
        if args.resume and _complete(stores[name]):
            continue
        dtype, _, step = dtype.partition("@")  # pca@0.35: pca with --pca-step 0.35
        if args.recode and name != "reference":
            shutil.rmtree(stores[name], ignore_errors=True)
            recode(stores["reference"], stores[name], dtype, float(step) if step else None)
            continue
        extract(ExtractConfig(model=args.model, dataset=args.dataset, out=str(stores[name]), limit=args.images,
                              dataset_options=dataset_options,
                              init=args.init, dtype=args.dtype, device=args.device, store_dtype=dtype,
                              pca_step=float(step) if step else None,
                              batch_size=args.batch_size, part_size=args.part_size))
    opened = {k: FeatureStore.open(v) for k, v in stores.items()}
    ref = opened["reference"]
    report = {"model": args.model, "dataset": args.dataset, "images": len(ref.images()),
              "bytes_per_image": {k: stored_bytes(v) / len(ref.images()) for k, v in stores.items()},
              "features": {e: feature_error(ref, opened[e]) for e in encodings},
              "candidates": compare_candidates(ref), "tasks": {}}
    tasks = [t for t in (ref.meta.dataset.tasks or ()) if t in PROBES
             and (args.tasks is None or t in comma_list(args.tasks))]
    print(f"{'task':16s} {'encoding':9s} {'metric':10s} {'targets':>7s} {'max |d|':>8s} {'mean |d|':>8s} "
          f"{'best ref':>8s} {'best':>8s} same-best regret  ref-gap")
    for task in tasks:
        metric = PROBES.get(task).primary_metric
        runs = [(k, v, {}) for k, v in stores.items()]
        seed = PROBES.get(task).defaults.get("seed")
        if seed is not None:  # a randomised estimator: its own spread, lossless store, another seed
            runs.append((SEED_ROW, stores["reference"], {"seed": int(seed) + 1}))
        vals = {}
        try:
            for k, v, params in runs:
                table = run_probe(v, task, params, use_cache=False, save_predictions="none").table.to_pylist()
                vals[k] = {(r["kind"], r["layer"], r["head"]): r["value"] for r in table if r["metric"] == metric}
        except UsageError as err:  # e.g. too few images for the task: the other tasks still count
            print(f"{task:16s} skipped: {err}")
            report.setdefault("skipped", {})[task] = str(err)
            continue
        report["tasks"][task] = {}
        for enc in [e for e in (*encodings, SEED_ROW) if e in vals]:
            a, b = vals["reference"], vals[enc]
            keys = sorted(k for k in a if k in b and np.isfinite(a[k]) and np.isfinite(b[k]))
            d = np.array([abs(a[k] - b[k]) for k in keys])
            best = [max(keys, key=lambda k: v[k]) for v in (a, b)]
            row = {"metric": metric, "targets": len(keys), "max_abs_diff": float(d.max()),
                   "mean_abs_diff": float(d.mean()), "best_reference": a[best[0]], "best_lossy": b[best[1]],
                   "best_target_reference": list(best[0]), "best_target_lossy": list(best[1]),
                   "same_best_target": best[0] == best[1],
                   # what the lossy store's choice costs on the lossless store: 0 when it picks the
                   # same target, small when it picks a near-tie
                   "best_target_regret": float(a[best[0]] - a[best[1]]),
                   # how far the lossless store's best target leads its runner-up: a change of the
                   # best target within this gap is a swap of near-ties
                   "best_target_gap_reference": float(a[best[0]] - max(a[k] for k in keys if k != best[0]))
                   if len(keys) > 1 else float("nan")}
            report["tasks"][task][enc] = row
            print(f"{task:16s} {enc:9s} {metric:10s} {len(keys):7d} {row['max_abs_diff']:8.4f} "
                  f"{row['mean_abs_diff']:8.4f} {row['best_reference']:8.4f} {row['best_lossy']:8.4f} "
                  f"{str(row['same_best_target']):9s} {row['best_target_regret']:.4f}   "
                  f"{row['best_target_gap_reference']:.4f}")
    print(json.dumps({k: report[k] for k in ("bytes_per_image", "features", "candidates")}, indent=1))
    return finish(args, report)


if __name__ == "__main__":
    main()
