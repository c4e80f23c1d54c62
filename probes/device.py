"""Where a probe's compute runs: ``--device auto|cpu|cuda[:N]`` (and ``numpy``, the reference).

Why: the numpy float64 code of each probe is the reference the paper's protocols are checked
against; the same computation in torch runs batched on a GPU (or on the CPU's cores) and is
tested against it (tests/probes/test_device_paths.py). ``auto`` takes a GPU when torch sees
one, else the CPU through torch; ``numpy`` runs the reference code (no torch at all), which is
also what ``auto`` and ``cpu`` fall back to where torch is not installed. torch is imported
inside the functions only, so importing the probes does not load it.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar

from kvpipe import device as core_device
from kvpipe.errors import KvpipeError

DEVICES = f"{core_device.DEVICES}, {core_device.REFERENCE}"
T = TypeVar("T")


def resolve_device(device: str | None = "auto") -> str:
    """``kvpipe.device.resolve_device`` with the reference code: ``numpy`` is a device, and
    ``auto`` / ``cpu`` fall back to it where torch is not installed."""
    return core_device.resolve_device(device, reference=True)


def uses_torch(device: str) -> bool:
    return device != "numpy"


@contextmanager
def compute_threads(device: str) -> Iterator[None]:
    """torch on one intra-op thread while a probe computes on the CPU, as before afterwards.

    The device path's operations are small (a block of target tokens against a band of memory
    tokens, one image's scores); on a loaded two-core machine two intra-op threads made them
    about ten times slower than one (threads waiting for each other while other processes hold
    the cores). ``KVPIPE_PROBE_THREADS=N`` sets another number."""
    if device != "cpu":
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(os.environ.get("KVPIPE_PROBE_THREADS", "1"))))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def host_workers(n_tasks: int, device: str = "cpu") -> int:
    """Threads for ``n_tasks`` independent pieces of work (videos, image sets) whose inner loops
    release the GIL (numpy, torch, faiss): one per core, at most 16, where they compute on the
    host; one where they queue on a GPU (one stream: threads would only interleave its queue)."""
    if device.startswith("cuda"):
        return 1
    return max(1, min(int(n_tasks), os.cpu_count() or 1, 16))


class DeviceMemoryError(KvpipeError):
    """A target that does not fit on the device even in the smallest batches."""


def with_smaller_batches(fn: Callable[[int], T], budget: int, device: str, what: str,
                         smallest: int = 16 * 2**20) -> T:
    """``fn(budget_bytes)``, retried with a quarter of the budget each time the device runs
    out of memory; below ``smallest`` bytes a one-line DeviceMemoryError (nothing is written:
    the runner writes the results table only after every target is scored)."""
    import torch

    while True:
        try:
            return fn(budget)
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            if budget // 4 < smallest:
                raise DeviceMemoryError(f"{what} does not fit in the memory of {device} even in batches of "
                                        f"{budget / 2**20:.0f} MiB; free the GPU or use --device cpu") from None
            budget //= 4


def batch_budget(device: str) -> int:
    """Bytes of intermediate arrays per batch: large on a GPU, cache-sized on the CPU."""
    return 2 * 2**30 if device.startswith("cuda") else 64 * 2**20


def reference_budget(device: str) -> int:
    """Bytes of data a probe may keep on the device for a whole sweep (prepared once and reused by
    every target, e.g. temporal-corr's ground-truth masks and contour dilations): a quarter of
    the GPU's memory, or of the machine's on the CPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_properties(torch.device(device)).total_memory // 4
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError, AttributeError):
        return 2**30


def to_device(array: Any, device: str, dtype: Any = None) -> Any:
    """A numpy array as a torch tensor on ``device`` (pinned-free: these are small)."""
    import torch

    t = torch.as_tensor(array)
    return t.to(device=device, dtype=dtype) if dtype is not None else t.to(device)
