"""The int4 quantiser with one row per slice against slices that fill the device's budget.

Times ``pipeline.models.capture.quantize_int4`` on a 7B batch's K/V stack ([layers, heads,
tokens, 128] in bfloat16) and on its post-projector array ([tokens, 3584]), first quantising
one row (a layer; a token of post-proj) per slice, then ``int4_slice_rows`` rows, alternating,
in one process; checks that both give the same bytes.

    python -m kvpipe.benchmarks.int4_slices --device cuda --tokens 8192 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import finish, parse_args, timed


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("device",))
    parser.add_argument("--tokens", type=int, default=8192, help="image tokens of the batch (default: %(default)s: "
                                                                 "32 images of Qwen2.5-VL-7B at 448)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=3584, help="post-projector width (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    import torch

    from kvpipe.pipeline.models import capture

    device = torch.device(args.device)
    arrays = {"keys/values": torch.randn(args.layers, args.heads, args.tokens, 128, device=device).bfloat16(),
              "post_proj": torch.randn(args.tokens, args.hidden, device=device).bfloat16()}
    results: dict[str, dict[str, float]] = {}
    for name, x in arrays.items():
        budget = capture.int4_slice_rows(x, device)
        rows = {"one row per slice": 1, "device budget": budget}
        codes = {label: capture.quantize_int4(x, rows=n) for label, n in rows.items()}  # warm-up, and the bytes
        if not torch.equal(*codes.values()):
            raise SystemExit(f"{name}: the slice size changed the bytes")
        times: dict[str, list[float]] = {label: [] for label in rows}
        for _ in range(args.repeats):
            for label, n in rows.items():
                times[label].append(timed(lambda: capture.quantize_int4(x, rows=n), device))
        med = {label: statistics.median(t) for label, t in times.items()}
        results[name] = {**{f"{label} ms": 1e3 * m for label, m in med.items()}, "rows per slice": budget,
                         "speedup": med["one row per slice"] / med["device budget"]}
        print(f"{name:12s} {tuple(x.shape)}: one row per slice {1e3 * med['one row per slice']:8.1f} ms, "
              f"{budget} rows per slice {1e3 * med['device budget']:8.1f} ms "
              f"({results[name]['speedup']:.1f} x)", flush=True)
    return finish(args, {"device": common.device_name(device), "tokens": args.tokens, "results": results})


if __name__ == "__main__":
    main()
