"""Linear-probe benchmark: fg-seg's batched logistic regressions on the CPU and on the GPU.

fg-seg trains one L2-regularised logistic regression per episode (5 support images x 729
tokens, head_dim features) for every (layer, head, kind) of the sweep; ``probes/logistic.py``
solves a batch of episodes at once with batched Newton steps in torch. This times that solver
on each device in one process, on the same synthetic episodes and in the batches fg-seg uses
(``fg_seg.BATCH_BYTES`` of padded features per batch), and checks that the devices agree.

    python -m kvpipe.benchmarks.linear_probes --episodes 1000 --cpu-episodes 136 [--devices cpu,cuda]

The CPU may run fewer episodes (``--cpu-episodes``): the work per episode is the same, so the
rate (episodes/s) is what is compared, and the per-target time is extrapolated from it.
``--spaces features,tokens`` times the solver's two Newton systems on the same episodes (the
post-proj shape: ``--tokens 48 --dim 3584``, where the support tokens are fewer than the features).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import comma_list, finish, parse_args, sync
from kvpipe.probes.fg_seg import batch_plan
from kvpipe.probes.logistic import fit_logistic


def episodes(n: int, tokens: int, dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Support features with a class signal along a random direction per episode; targets are
    the share of a token's pixels in the class (mostly 0 or 1, some in between)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, tokens, dim), dtype=np.float32)
    direction = rng.standard_normal((n, 1, dim), dtype=np.float32)
    fg = rng.random((n, tokens)) < 0.3
    x += 0.4 * fg[..., None] * direction
    y = np.where(fg, 1.0, 0.0).astype(np.float32)
    mixed = rng.random((n, tokens)) < 0.1  # border tokens: part foreground
    y[mixed] = rng.random(int(mixed.sum()), dtype=np.float32)
    return x, y, np.ones((n, tokens), np.float32)


def run(dev: str, x: np.ndarray, y: np.ndarray, w: np.ndarray, per_batch: int,
        space: str = "auto") -> tuple[float, np.ndarray, int]:
    """Seconds to fit all episodes in fg-seg's batches, the coefficients, the most Newton steps."""
    sync(dev)
    t0 = time.perf_counter()
    coefs, iters = [], 0
    for a in range(0, len(x), per_batch):
        m = fit_logistic(x[a:a + per_batch], y[a:a + per_batch], w[a:a + per_batch], dev=dev, space=space)
        coefs.append(m.coef)
        iters = max(iters, m.iterations)
    sync(dev)
    return time.perf_counter() - t0, np.concatenate(coefs), iters


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=())
    parser.add_argument("--episodes", type=int, default=1000, help="episodes per (layer, head, kind) target")
    parser.add_argument("--cpu-episodes", type=int, default=None, help="episodes timed on the CPU (default: all)")
    parser.add_argument("--shots", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=729, help="tokens per support image")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--targets", type=int, default=225, help="targets of a full sweep (28 x 4 x 2 + post-proj)")
    parser.add_argument("--devices", default=None, help="comma list (default: cpu,cuda where a GPU is seen, else cpu)")
    parser.add_argument("--spaces", default="auto", help="comma list of the solver's Newton systems: auto | "
                                                             "features | tokens")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    devices = comma_list(args.devices or ("cpu,cuda" if torch.cuda.is_available() else "cpu"))
    n_tok = args.shots * args.tokens
    per_batch = len(batch_plan(np.full(args.episodes, n_tok), args.dim)[0])  # fg-seg's batch of this shape
    spaces = comma_list(args.spaces)
    x, y, w = episodes(args.episodes, n_tok, args.dim, args.seed)
    print(f"{args.episodes} episodes x {n_tok} support tokens x {args.dim} dims, {per_batch} episodes per "
          f"batch; torch {torch.__version__}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads"
          + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""), flush=True)
    results: dict[str, tuple[float, int, int]] = {}
    coefs: dict[str, np.ndarray] = {}
    for dev in devices:
        n = args.episodes if dev != "cpu" or args.cpu_episodes is None else min(args.cpu_episodes, args.episodes)
        for space in spaces:
            key = dev if len(spaces) == 1 else f"{dev} {space}"
            run(dev, x[:per_batch], y[:per_batch], w[:per_batch], per_batch, space)  # warm-up (CUDA context)
            times = []
            for _ in range(args.repeat):
                t, coef, iters = run(dev, x[:n], y[:n], w[:n], per_batch, space)
                times.append(t)
            coefs[key] = coef
            results[key] = (statistics.median(times), n, iters)
            print(f"  {key}: {n} episodes in {[round(t, 2) for t in times]} s", flush=True)

    print()
    print(f"| device | episodes timed | seconds (median of {args.repeat}) | episodes/s | per target "
          f"({args.episodes} episodes) | full sweep ({args.targets} targets) | Newton steps |")
    print("|---|---|---|---|---|---|---|")
    for dev, (t, n, iters) in results.items():
        rate = n / t
        print(f"| {dev} | {n} | {t:.2f} | {rate:.3g} | {args.episodes / rate:.2f} s | "
              f"{args.targets * args.episodes / rate / 60:.1f} min | {iters} |")
    report = {dev: {"seconds": t, "episodes": n, "episodes_per_s": n / t, "newton_steps": iters}
              for dev, (t, n, iters) in results.items()}
    base = next(iter(results))  # the first device's first space
    for key in list(results)[1:]:
        speed = (results[key][1] / results[key][0]) / (results[base][1] / results[base][0])
        n = min(len(coefs[base]), len(coefs[key]))
        diff = np.abs(coefs[base][:n] - coefs[key][:n]).max() / np.abs(coefs[base][:n]).max()
        report[key].update({f"speed_vs_{base}": speed, "relative_coef_diff": float(diff)})
        print(f"\n{key} / {base}: {speed:.3g} x the episodes per second; coefficients agree to a relative "
              f"{diff:.1e} (largest difference over the largest coefficient)")
    return finish(args, {"per_batch": per_batch, "devices": report})


if __name__ == "__main__":
    main()
