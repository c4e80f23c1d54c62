"""How many bits a value of a store needs at int4's error, by what a coder may exploit.

int4 codes each rotated token on its own: 16 levels between the token's min and max. What it
does not use is structure across tokens and channels: the mean every token of a head shares,
and channels of unequal variance (a per-head principal basis, the KLT). This reads a lossless
store and, per (kind, layer, head), measures int4's relative squared error D, then the bits per
value of coders at the same D:

- ``int4``: int4's codes, ideally entropy-coded (their order-0 entropy), plus its float32 scale
  and zero point per token;
- ``rotated ECSQ``: kvpipe's rotation, a uniform step proportional to each token's RMS, the codes'
  entropy plus a float16 RMS per token (the best scalar code that, like int4, sees each token
  alone);
- ``KLT ECSQ``: the head's mean removed, its principal basis, one uniform step for all channels
  and tokens, each channel's codes at their own entropy (side information, one basis and mean per
  head, not counted: it is 64 KB against a store's gigabytes); fitted on the vectors it codes
  (``klt_ecsq``), and held out (``klt_held_out``: fitted on the first half of the images, coding
  the second, as an encoding whose basis comes from a store's first images would), the latter
  also as Blosc zstd stores its int8 codes laid out channel by channel (``klt_held_out_zstd``);
  and fitted on each part of ``--part-tokens`` consecutive tokens (``klt_per_part``: a store whose
  parts carry their own mean and basis, which are counted);
- ``Gaussian R(D)``: the rate-distortion bound of a Gaussian with the head's covariance (reverse
  water-filling on its eigenvalues), the fewest bits any coder needs for such a source.

beside the lossless bf16 bytes under Blosc zstd (the store's own codec). The ratio
lossless / coder is the size reduction each would give at int4's total error; how that error
spreads over tokens is the 99th percentile of each token's relative error (int4's, and the
held-out KLT coder's). Figures: docs/BENCHMARKS.md, "What int4 leaves uncoded".

    python -m kvpipe.benchmarks.kv_structure STORE [--tokens 8192] [--part-tokens 8192] [--workers 14]
"""

from __future__ import annotations

import json
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import finish, parse_args
from kvpipe.store import FeatureStore


def entropy_bits(codes: np.ndarray, axis: int | None = None) -> float:
    """Order-0 entropy of integer codes, bits per code (``axis=1``: each column its own code,
    their mean)."""
    q = np.asarray(codes, np.int64)
    q = q - q.min()
    columns = 1 if axis is None else q.shape[1]
    if axis is not None:  # one histogram per column: each column's codes offset into a range of its own
        q = q + np.arange(columns) * (int(q.max()) + 1)
    counts = np.bincount(q.ravel())
    p = counts[counts > 0] / (q.size / columns)
    return float(-(p * np.log2(p)).sum() / columns)


def zstd_bits(a: np.ndarray, shuffle: bool = False) -> float:
    """Bits Blosc zstd 1 stores of array ``a`` (``shuffle``: byte shuffle, the store's default)."""
    from numcodecs import Blosc

    return 8 * len(Blosc("zstd", 1, Blosc.SHUFFLE if shuffle else Blosc.NOSHUFFLE).encode(np.ascontiguousarray(a)))


def lossless_bits(x: np.ndarray) -> float:
    """Bits per value of x as bf16 under the store's default codec (Blosc zstd 1, byte shuffle)."""
    from kvpipe.store.encoding import float32_to_bf16_bits

    raw = float32_to_bf16_bits(x)
    return zstd_bits(raw, shuffle=True) / raw.size


def token_error_p99(x: np.ndarray, decoded: np.ndarray) -> float:
    """The 99th percentile over tokens of |x - decoded| / |x|: how the error is spread over tokens."""
    return float(np.percentile(np.linalg.norm(x - decoded, axis=1) / np.maximum(np.linalg.norm(x, axis=1), 1e-30), 99))


def int4_point(x: np.ndarray) -> tuple[float, float, float]:
    """(relative squared error, bits per value, token error p99) of kvpipe's int4 with ideally
    coded codes."""
    from kvpipe.store.quant import INT4_TAIL, dequantize_int4, quantize_int4

    raw = quantize_int4(x)
    packed = raw[..., :-INT4_TAIL]
    codes = np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(len(x), -1)[:, : x.shape[-1]]  # the nibbles
    xh = dequantize_int4(raw, x.shape[-1])
    return (float(((x - xh) ** 2).sum() / (x ** 2).sum()), entropy_bits(codes) + 8 * INT4_TAIL / x.shape[-1],
            token_error_p99(x, xh))


def _bisect_step(rate_err, target: float) -> float:
    """log2 of the largest step of a uniform quantiser whose relative error is below ``target``."""
    lo, hi = -12.0, 6.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if rate_err(2.0 ** mid)[1] < target else (lo, mid)
    return lo


def _principal(fit: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(mean, variances, basis) of vectors ``fit``: their mean and their covariance's eigenvalues
    and eigenvectors (columns), in ascending order."""
    mean = fit.mean(0)
    vals, vecs = np.linalg.eigh((fit - mean).T @ (fit - mean) / len(fit))
    return mean, vals, vecs


def rotated_ecsq(x: np.ndarray, target: float) -> tuple[float, float]:
    from kvpipe.store.quant import rotate

    y = rotate(x)
    rms = np.maximum(np.sqrt((y ** 2).mean(-1, keepdims=True)), 1e-30)
    energy = (y ** 2).sum()

    def rate_err(step):
        q = np.rint(y / (step * rms))
        return entropy_bits(q) + 16 / y.shape[-1], float(((q * step * rms - y) ** 2).sum() / energy)

    return rate_err(2.0 ** _bisect_step(rate_err, target))


def klt_ecsq(x: np.ndarray, target: float,
             fit: np.ndarray | None = None) -> tuple[float, float, np.ndarray, float, float]:
    """(bits, error, the principal variances, bits under zstd, token error p99) of the KLT coder
    at relative error ``target``; ``fit``: the vectors its mean and basis come from (default:
    ``x`` itself). The zstd figure is what Blosc zstd 1 stores of the int8 codes laid out channel
    by channel (each channel's codes contiguous, so its one Huffman table per block sees like
    statistics)."""
    mean, vals, vecs = _principal(x if fit is None else fit)
    z = (x - mean) @ vecs
    energy = (x ** 2).sum()

    def rate_err(step):
        q = np.rint(z / step)
        return entropy_bits(q, axis=1), float(((q * step - z) ** 2).sum() / energy)

    step = 2.0 ** _bisect_step(rate_err, target)
    bits, err = rate_err(step)
    codes = np.clip(np.rint(z / step), -127, 127).astype(np.int8)
    zstd = zstd_bits(codes.T) / codes.size
    decoded = (codes.astype(np.float32) * step) @ vecs.T + mean
    return bits, err, np.maximum(vals[::-1], 0), zstd, token_error_p99(x, decoded)


def klt_per_part(x: np.ndarray, target: float, part_tokens: int) -> tuple[float, float]:
    """(ideal bits, zstd bits) per value of the KLT coder with a mean and basis fitted on each part
    of ``part_tokens`` consecutive tokens itself, one step for all, at relative error ``target``,
    counting its side information: the float16 mean and the float16 basis vectors of the
    components that get a code other than 0 (the decoder needs no others)."""
    parts = [x[a: a + part_tokens] for a in range(0, len(x) - part_tokens + 1, part_tokens)] or [x]
    fitted = []
    for p in parts:
        mean, _, vecs = _principal(p)
        fitted.append((p - mean) @ vecs)
    energy = sum(float((p ** 2).sum()) for p in parts)
    values = sum(p.size for p in parts)

    def rate_err(step):
        qs = [np.rint(z / step) for z in fitted]
        side = sum(16 * (z.shape[1] + z.shape[1] * int(np.any(q != 0, axis=0).sum())) for z, q in zip(fitted, qs))
        bits = sum(entropy_bits(q, axis=1) * q.size for q in qs) + side
        return bits / values, sum(float(((q * step - z) ** 2).sum()) for q, z in zip(qs, fitted)) / energy

    step = 2.0 ** _bisect_step(rate_err, target)
    ideal = rate_err(step)[0]
    zstd = 0.0
    for z in fitted:
        q = np.clip(np.rint(z / step), -127, 127).astype(np.int8)
        kept = q[:, np.any(q != 0, axis=0)].T
        zstd += zstd_bits(kept) + 16 * (z.shape[1] + z.shape[1] * len(kept))
    return ideal, zstd / values


def gaussian_rd(eigenvalues: np.ndarray, distortion: float) -> float:
    """Bits per value of a Gaussian with these variances at total squared error ``distortion``
    per vector (reverse water-filling)."""
    lam = np.sort(np.maximum(eigenvalues, 1e-30))
    lo, hi = 0.0, float(lam.max())
    for _ in range(100):
        theta = (lo + hi) / 2
        lo, hi = (theta, hi) if np.minimum(theta, lam).sum() < distortion else (lo, theta)
    return float(np.maximum(0.5 * np.log2(lam / lo), 0).sum() / len(lam))


def _spaced(x: np.ndarray, n: int | None) -> np.ndarray:
    return x if n is None or n >= len(x) else x[np.linspace(0, len(x) - 1, n).astype(int)]


def analyse(x: np.ndarray, tokens: int | None = None, part_tokens: int = 8192) -> dict:
    """Every figure of one target's vectors ``x`` (in image order), coding ``tokens`` of them
    evenly spaced (default: all). The held-out figures fit the mean and basis on every vector of
    the first half and code (``tokens`` / 2 of) the second, as a store coded with a basis fitted
    on its first images would be."""
    first = np.ascontiguousarray(x[: len(x) // 2], np.float32)
    second = np.ascontiguousarray(_spaced(x[len(x) // 2:], None if tokens is None else tokens // 2), np.float32)
    held_d, _, held_int4_p99 = int4_point(second)
    held_bits, _, _, held_zstd, held_p99 = klt_ecsq(second, held_d, fit=first)
    run = np.ascontiguousarray(x[: max(part_tokens, (tokens or len(x)) // part_tokens * part_tokens)], np.float32)
    part_bits, part_zstd = klt_per_part(run, int4_point(run)[0], part_tokens)
    x = np.ascontiguousarray(_spaced(x, tokens), np.float32)
    d_rel, int4_bits, _ = int4_point(x)
    ecsq_bits, _ = rotated_ecsq(x, d_rel)
    klt_bits, _, lam, _, _ = klt_ecsq(x, d_rel)
    energy = float((x ** 2).sum(1).mean())
    mean_share = float((x.mean(0) ** 2).sum() / energy)
    rd = gaussian_rd(lam, d_rel * energy)
    am_gm = 0.5 * np.log2(lam.mean() / np.exp(np.log(np.maximum(lam, lam.max() * 1e-9)).mean()))
    return {"tokens": len(x), "fit_tokens": len(first), "int4_rel_mse": d_rel, "lossless_bits": lossless_bits(x),
            "int4_bits": int4_bits, "rotated_ecsq_bits": ecsq_bits, "klt_ecsq_bits": klt_bits,
            "klt_held_out_bits": held_bits, "klt_held_out_zstd_bits": held_zstd,
            "klt_per_part_bits": part_bits, "klt_per_part_zstd_bits": part_zstd, "gaussian_rd_bits": rd,
            # one step for all tokens against int4's range per token: the error's spread over tokens
            "int4_token_error_p99": held_int4_p99, "klt_held_out_token_error_p99": held_p99,
            "mean_share": mean_share, "klt_gain_bits": float(am_gm),
            "top8_variance_share": float(lam[:8].sum() / lam.sum())}


def _target(root: str, kind: str, layer: int, head: int, tokens: int, part_tokens: int) -> dict:
    return analyse(FeatureStore.open(root).read(kind, layer, head).data, tokens, part_tokens)


def main(argv: list[str] | None = None) -> dict:
    p = common.get_args_parser(__doc__, groups=())
    p.add_argument("store", help="a lossless store")
    p.add_argument("--tokens", type=int, default=8192, help="tokens coded per target, evenly spaced; the held-out "
                   "basis is fitted on every token of the first half (default: %(default)s)")
    p.add_argument("--part-tokens", type=int, default=8192,
                   help="tokens of a part whose own mean and basis the per-part KLT coder fits (default: %(default)s)")
    p.add_argument("--workers", type=int, default=1, help="processes, one target each (default: %(default)s)")
    args = parse_args(p, argv)
    store = FeatureStore.open(args.store)
    targets = [(kind, layer, head) for kind in ("keys", "values") for layer in store.meta.layers
               for head in store.meta.heads]
    cols = ("lossless_bits", "int4_bits", "rotated_ecsq_bits", "klt_ecsq_bits", "klt_held_out_bits",
            "klt_held_out_zstd_bits", "klt_per_part_bits", "klt_per_part_zstd_bits", "gaussian_rd_bits")
    short = [c[:-5].replace("klt_held_out", "held").replace("klt_per_part", "part") for c in cols]
    print(f"{'target':18s} {'int4 D':>7s} " + " ".join(f"{c:>11s}" for c in short)
          + f" {'mean':>6s} {'KLT gain':>8s} {'top-8':>6s}")
    rows = {}
    with ProcessPoolExecutor(args.workers) as pool:
        jobs = [(f"{k}-L{l}-H{h}", pool.submit(_target, args.store, k, l, h, args.tokens, args.part_tokens))
                for k, l, h in targets]
        for name, job in jobs:
            r = rows[name] = job.result()
            print(f"{name:18s} {r['int4_rel_mse']:7.4f} " + " ".join(f"{r[c]:11.2f}" for c in cols)
                  + f" {r['mean_share']:6.3f} {r['klt_gain_bits']:8.2f} {r['top8_variance_share']:6.3f}", flush=True)
    medians = (*cols, "mean_share", "klt_gain_bits", "int4_token_error_p99", "klt_held_out_token_error_p99")
    summary = {c: float(np.median([r[c] for r in rows.values()])) for c in medians}
    summary.update({f"ratio_{c[:-5]}": float(np.median([r["lossless_bits"] / r[c] for r in rows.values()]))
                    for c in cols[1:]})
    print("median:", json.dumps(summary, indent=1))
    return finish(args, {"store": args.store, "targets": rows, "median": summary})


if __name__ == "__main__":
    main()
