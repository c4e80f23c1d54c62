"""Device-to-host transfer of captured batches, overlapped with the next forward pass.

Why: a 7B model's K/V for one batch is 0.1-0.7 GB. Each batch is copied on a side CUDA stream
straight into pinned host buffers that then belong to the part until it is written: no second
copy on the host (the writer's encoder threads read the buffers in place and join a chunk's
batches themselves, in parallel; ``store.chunks.TokenSegments``). The buffers come from a pool
and go back to it once the part is written, since pinning fresh memory costs more than the
copy. On a CPU device the copy is a plain synchronous one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch


def host_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy; bfloat16 as its uint16 bit pattern (the store's encoding)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


class PinnedPool:
    """Host buffers reused across batches: the smallest free one that fits, else a new one."""

    def __init__(self, pin: bool = True, keep: int = 32):
        self.pin, self.keep = pin, keep
        self.free: list[torch.Tensor] = []
        self.lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype) -> torch.Tensor:
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.dtype == dtype and b.numel() >= numel]
            if fits:
                return self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        # some slack, so the next batch (other image sizes, other token counts) fits too
        return torch.empty(int(numel * 1.25) + 1, dtype=dtype, pin_memory=self.pin)

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.lock:
            self.free.extend(buffers)
            del self.free[:-self.keep]  # bound what is kept


@dataclass
class Copied:
    """One batch's arrays on their way to the host: ``host`` holds valid data once ``wait``
    returns; ``release`` hands the buffers back to the pool (after the part is written)."""

    host: dict[str, np.ndarray]
    done: torch.cuda.Event | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)
    pool: PinnedPool | None = None

    def wait(self) -> None:
        if self.done is not None:
            self.done.synchronize()

    def release(self) -> None:
        if self.pool is not None and self.buffers:
            self.pool.give(self.buffers)
        self.buffers = []


class HostCopier:
    """Copies batches to pinned host memory on a side stream; ``submit`` returns at once."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = PinnedPool(pin=self.cuda)

    def submit(self, arrays: dict[str, torch.Tensor]) -> Copied:
        if not self.cuda:
            return Copied({k: host_view(v.cpu()) for k, v in arrays.items()})
        ready = torch.cuda.Event()
        ready.record()
        views, buffers = {}, []
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for kind, t in arrays.items():
                buf = self.pool.take(t.numel(), t.dtype)
                buffers.append(buf)
                views[kind] = buf[: t.numel()].view(t.shape)
                views[kind].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # keep the device memory until the copy has run
            done = torch.cuda.Event()
            done.record(self.stream)
        return Copied({k: host_view(v) for k, v in views.items()}, done, buffers, self.pool)

    def close(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()
