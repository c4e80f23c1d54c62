"""Who scores a sweep's targets: ``kvpipe probe --executor local|ray``, and the per-target cache.

Why a registry: the sweep (runner.py) owns targets, tables and plots; an executor only turns
targets into scores, here (``local``: reads one target ahead in a thread) or on Ray actors
(``ray``: ``probes/ray_sweep.py``, one per GPU). Both score a target with the same code,
``compute_target``, so they give the same rows.

The per-target cache: every scored target's metrics are written, as soon as they exist, to
``STORE/probes/.cache/<task>-<key>.targets/<kind>_<layer>_<head>.json`` (temporary name, then
rename), and a line saying who computed it goes to ``journal.jsonl`` there. A sweep that is
killed, or whose Ray actor dies, redoes only the targets with no file: finished targets are
read back, never recomputed. ``--no-cache`` empties the folder first.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from kvpipe.errors import UsageError
from kvpipe.probes.base import Probe, Selection, Target
from kvpipe.probes.device import compute_threads
from kvpipe.registry import Registry

JOURNAL = "journal.jsonl"
ProgressFn = Callable[[int, int], None]


@dataclass(frozen=True)
class SweepJob:
    """What a worker needs to rebuild the probe on its own (picklable): the store it opens
    read-only, the task, its parameters, the device spec, the selection and the target cache."""

    store: str
    task: str
    params: dict[str, Any]
    device: str
    selection: Selection
    cache_dir: str


@dataclass(frozen=True)
class ExecutorOptions:
    """``--workers`` (Ray actors; default: the cluster's GPUs, or 2 on CPU), ``--ray-address``,
    and ``on_start(pids)``: called once the workers run, with their process ids (the benchmark's
    ``--kill-one-after`` and the tests kill one with it)."""

    workers: int | None = None
    address: str | None = None
    on_start: Callable[[list[int]], None] | None = field(default=None, compare=False)


class TargetCache:
    """Scores of finished targets, one small JSON file each, and the journal of computations."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    @staticmethod
    def file_name(target: Target) -> str:
        return f"{target.kind}_{target.layer}_{target.head}.json"

    def get(self, target: Target) -> dict[str, float] | None:
        try:
            return json.loads((self.root / self.file_name(target)).read_text())["scores"]
        except (FileNotFoundError, ValueError, KeyError):
            return None  # absent, or unreadable: computed again

    def put(self, target: Target, scores: dict[str, float], seconds: float) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / self.file_name(target)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
        tmp.write_text(json.dumps({"scores": {k: float(v) for k, v in scores.items()}}))
        tmp.rename(path)
        line = json.dumps({"kind": target.kind, "layer": target.layer, "head": target.head, "pid": os.getpid(),
                           "host": socket.gethostname(), "seconds": round(seconds, 6)}) + "\n"
        fd = os.open(self.root / JOURNAL, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            os.write(fd, line.encode())  # one write of one short line: appends do not interleave
        finally:
            os.close(fd)

    def journal(self) -> list[dict[str, Any]]:
        """Every computation recorded, oldest first (a target computed twice appears twice)."""
        try:
            text = (self.root / JOURNAL).read_text()
        except FileNotFoundError:
            return []
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class Scored:
    """One target's result as an executor hands it back."""

    target: Target
    scores: dict[str, float]
    read_s: float = 0.0
    compute_s: float = 0.0
    device: str = ""
    read_wait_s: float = 0.0  # the sweep waiting for this target's read (local executor)


def compute_target(probe: Probe, target: Target, data: Any, cache: TargetCache) -> tuple[dict[str, float], float]:
    """Scores of ``target`` from ``probe.read(target)``'s ``data`` (None for a probe that reads in
    ``score``), written to the cache; and the seconds computing took."""
    t = time.perf_counter()
    if is_split(probe):
        with compute_threads(probe.device):
            scores = probe.compute(target, data)
    else:
        scores = probe.score(target)  # (fg-seg's batched solver is not small: torch's own threads)
    seconds = time.perf_counter() - t
    cache.put(target, scores, seconds)
    return scores, seconds


def is_split(probe: Probe) -> bool:
    """Whether the probe splits its store reads (``read``) from its compute (``compute``)."""
    return type(probe).compute is not Probe.compute


class ProbeExecutor:
    """Registry entry: turns targets into scores."""

    def check(self, options: ExecutorOptions) -> None:
        """Validate the options before any work (one-line UsageError)."""

    def driver_device(self, device: str) -> str:
        """The device of the sweep's own probe (targets, summary rows, plots)."""
        raise NotImplementedError

    def score(self, probe: Probe, job: SweepJob, targets: list[Target], options: ExecutorOptions,
              prefetch: bool = True) -> Iterator[Scored]:
        """Scored targets in any order, each once."""
        raise NotImplementedError


class LocalProbeExecutor(ProbeExecutor):
    """This process, on ``--device``: the next target is read by one thread while the current
    one computes (two targets in memory at most)."""

    def check(self, options: ExecutorOptions) -> None:
        if options.workers is not None or options.address:
            raise UsageError("--workers and --ray-address go with --executor ray; the local executor "
                             "runs in this process")

    def driver_device(self, device: str) -> str:
        from kvpipe.probes.device import resolve_device

        return resolve_device(device)

    def score(self, probe: Probe, job: SweepJob, targets: list[Target], options: ExecutorOptions,
              prefetch: bool = True) -> Iterator[Scored]:
        cache = TargetCache(job.cache_dir)
        if options.on_start:
            options.on_start([os.getpid()])
        if not targets:
            return
        if not is_split(probe):
            for tgt in targets:
                scores, spent = compute_target(probe, tgt, None, cache)
                yield Scored(tgt, scores, 0.0, spent, probe.device)
            return

        def read(tgt: Target) -> tuple[Any, float]:
            t = time.perf_counter()
            data = probe.read(tgt)
            return data, time.perf_counter() - t

        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpipe-prefetch") if prefetch else None
        try:
            pending = pool.submit(read, targets[0]) if pool else None
            for i, tgt in enumerate(targets):
                t = time.perf_counter()
                data, spent = pending.result() if pool else read(tgt)
                waited = time.perf_counter() - t
                if pool and i + 1 < len(targets):
                    pending = pool.submit(read, targets[i + 1])
                scores, seconds = compute_target(probe, tgt, data, cache)
                del data
                yield Scored(tgt, scores, spent, seconds, probe.device, waited)
        finally:
            if pool:
                pool.shutdown(wait=True, cancel_futures=True)


PROBE_EXECUTORS: Registry[type[ProbeExecutor]] = Registry("executor", "--executor")
PROBE_EXECUTORS.add("local", LocalProbeExecutor)
PROBE_EXECUTORS.lazy("ray", "kvpipe.probes.ray_sweep:RayProbeExecutor")
