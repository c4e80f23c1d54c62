"""Is writing never-written disk blocks slower than rewriting freed ones?

Three rounds of 6 GiB in 64 MiB writes, each fsync'd, the file deleted between rounds (the
first round lands on fresh blocks of a new disk; later rounds may reuse the freed ones).

    python -m kvpipe.benchmarks.disk_rewrite --dir /tmp
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import finish, parse_args


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("out",))
    parser.add_argument("--rounds", type=int, default=3, help="rounds of writes (default: %(default)s)")
    parser.add_argument("--round-mib", type=int, default=6 << 10, help="MiB written per round (default: %(default)s)")
    parser.add_argument("--block-mib", type=int, default=64, help="MiB per write call (default: %(default)s)")
    parser.set_defaults(out=Path("."))
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    block, count = os.urandom(args.block_mib << 20), max(1, args.round_mib // args.block_mib)
    rates = []
    for r in range(args.rounds):
        path = Path(args.out) / f"kvpipe-disk-rewrite-{r}.bin"
        t0 = time.perf_counter()
        with open(path, "wb") as fh:
            for _ in range(count):
                fh.write(block)
            fh.flush()
            os.fsync(fh.fileno())
        seconds = time.perf_counter() - t0
        rates.append(count * len(block) / seconds / 1e6)
        print(f"round {r + 1}: {count * args.block_mib / 1024:.2f} GiB at {rates[-1]:.0f} MB/s", flush=True)
        path.unlink()
        os.sync()
    return finish(args, {"folder": str(args.out), "bytes_per_round": count * len(block), "mb_s": rates})


if __name__ == "__main__":
    main()
