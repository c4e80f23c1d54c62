"""Wall time of the commands a researcher types first: listings, store inspection, a usage error.

Each command runs as a fresh process (as a user starts it), alternating between the kvpipe
executables given, ``--repeat`` times; the table shows the median seconds of each. Give two
executables (an older install and this one) to compare them on the same machine state.

    python -m kvpipe.benchmarks.cli_latency --kvpipe OLD/.venv/bin/kvpipe --kvpipe .venv/bin/kvpipe \\
        --store STORE --repeat 5 --json cli.json
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from kvpipe.benchmarks.common import finish, get_args_parser


def commands(store: str, scratch: str) -> dict[str, list[str]]:
    """name -> arguments; the store is given positionally (what every version accepts)."""
    return {
        "--help": ["--help"],
        "models": ["models"],
        "datasets": ["datasets"],
        "tasks": ["tasks"],
        "info": ["info", store],
        "status": ["status", store],
        "verify": ["verify", store],
        "extract: misspelt --model": ["extract", "--model", "qwen25-vl", "--dataset", "synthetic", "--out", scratch],
        "extract: misspelt --dataset": ["extract", "--model", "tiny-qwen25vl", "--dataset", "davsi", "--out", scratch],
    }


def time_once(exe: str, args: list[str]) -> tuple[float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([exe, *args], capture_output=True, text=True, timeout=600)
    return time.perf_counter() - t0, proc.returncode


def main(argv: Sequence[str] | None = None) -> dict:
    parser = get_args_parser(__doc__, groups=())
    parser.add_argument("--kvpipe", action="append", default=None,
                        help="a kvpipe executable (repeatable; default: the one beside this Python)")
    parser.add_argument("--store", required=True, help="a store for info, status and verify")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each command per executable")
    parser.add_argument("--only", default=None, help="comma list of command names to run (default: all)")
    args = parser.parse_args(argv)
    exes = args.kvpipe or [str(Path(sys.executable).with_name("kvpipe"))]
    scratch = tempfile.mkdtemp(prefix="kvpipe-cli-")
    todo = commands(args.store, str(Path(scratch) / "never"))
    if args.only:
        todo = {k: v for k, v in todo.items() if k in args.only.split(",")}
    times: dict[str, dict[str, list[float]]] = {name: {e: [] for e in exes} for name in todo}
    codes: dict[str, dict[str, int]] = {name: {} for name in todo}
    try:
        for _ in range(args.repeat):
            for name, cmd in todo.items():
                for exe in exes:  # alternate, so both see the same machine state
                    seconds, code = time_once(exe, cmd)
                    times[name][exe].append(seconds)
                    codes[name][exe] = code
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    median = {name: {e: statistics.median(v) for e, v in per.items()} for name, per in times.items()}
    print(f"{'command':30s} " + " ".join(f"{Path(e).parent.parent.parent.name[:18]:>18s}" for e in exes))
    for name in todo:
        print(f"{name:30s} " + " ".join(f"{median[name][e]:17.2f}s" for e in exes))
    return finish(args, {"executables": exes, "repeat": args.repeat, "median_s": median, "exit_codes": codes})


if __name__ == "__main__":
    main()
