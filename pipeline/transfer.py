"""Device-to-host transfer of captured batches, overlapped with the next forward pass.

Why: a 7B model's K/V for one batch of 8 images is ~120 MB. Copying it synchronously into
freshly allocated pageable memory idles the GPU for about as long as the prefill itself.
Here each batch is copied on a side CUDA stream into one of two reused pinned buffers while
the GPU runs the next batch, and a host thread then moves it into the part's buffer.
On a CPU device the copy is a plain synchronous one.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

import numpy as np
import torch

Sink = Callable[[dict[str, np.ndarray]], None]


def host_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy; bfloat16 as its uint16 bit pattern (the store's encoding)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


class HostStager:
    """Two pinned slots on a copy stream; ``submit`` returns a future done when ``sink`` ran."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.slots: list[dict[str, torch.Tensor]] = [{}, {}]
        self.pending: list[Future | None] = [None, None]
        self.turn = 0
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kvpipe-d2h")

    def _pinned(self, slot: int, kind: str, t: torch.Tensor) -> torch.Tensor:
        buf = self.slots[slot].get(kind)
        if buf is None or buf.dtype != t.dtype or buf.numel() < t.numel():
            buf = torch.empty(int(t.numel() * 1.25) + 1, dtype=t.dtype, pin_memory=True)
            self.slots[slot][kind] = buf
        return buf[: t.numel()].view(t.shape)

    def submit(self, arrays: dict[str, torch.Tensor], sink: Sink) -> Future:
        if not self.cuda:
            done: Future = Future()
            sink({k: host_view(v.cpu()) for k, v in arrays.items()})
            done.set_result(None)
            return done
        slot, self.turn = self.turn, self.turn ^ 1
        if self.pending[slot] is not None:
            self.pending[slot].result()  # the slot's previous batch has left the pinned buffer
        ready = torch.cuda.Event()
        ready.record()
        views = {}
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for kind, t in arrays.items():
                views[kind] = self._pinned(slot, kind, t)
                views[kind].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # keep the device memory until the copy has run
            copied = torch.cuda.Event()
            copied.record(self.stream)

        def finish() -> None:
            copied.synchronize()
            sink({k: host_view(v) for k, v in views.items()})

        self.pending[slot] = self.pool.submit(finish)
        return self.pending[slot]

    def close(self) -> None:
        for f in self.pending:
            if f is not None:
                f.result()
        self.pool.shutdown()
