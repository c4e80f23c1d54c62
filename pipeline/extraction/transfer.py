"""Device-to-host transfer of captured batches, overlapped with the next forward pass.

Why: a 7B model's K/V for one batch is 0.1-0.7 GB. Each batch is copied on a side CUDA stream
straight into page-locked host buffers that then belong to the part until it is written: the
copy is the GPU's DMA, with no CPU memcpy, and no second copy on the host (the writer's
encoder threads read the buffers in place and join a chunk's batches themselves, in
parallel; ``store.chunks.TokenSegments``). The buffers come from a pool and go back to it
once the part is written; new ones are page-locked the fast way (``pinned_host_buffer``).
On a CPU device the copy is a plain synchronous one.
"""

from __future__ import annotations

import mmap
import os
import threading
import weakref
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

FAULT_THREADS = max(1, min(8, os.cpu_count() or 1))


def host_view(t: torch.Tensor) -> np.ndarray:
    """A CPU tensor as numpy; bfloat16 as its uint16 bit pattern (the store's encoding)."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _fault_in(t: torch.Tensor) -> None:
    """Touch every page of ``t`` now, on several threads (the kernel zeroes pages in parallel)."""
    flat = t.view(torch.uint8)
    step = -(-flat.numel() // FAULT_THREADS)
    with ThreadPoolExecutor(FAULT_THREADS) as pool:
        list(pool.map(lambda i: flat[i:i + step].fill_(0), range(0, flat.numel(), step)))


_pin_thread: ThreadPoolExecutor | None = None
_pin_lock = threading.Lock()


def on_pin_thread(call: str, *args: int) -> int:
    """A CUDA host (un)registration (``torch.cuda.cudart()`` function name), run on a thread
    of its own; returns the CUDA error code (0: success). Why: a failed runtime call is also
    kept as its thread's "last error", which torch then reports at the next kernel launch of
    that thread as if the launch had failed. No kernel is ever launched from this thread."""
    global _pin_thread
    with _pin_lock:
        if _pin_thread is None:
            _pin_thread = ThreadPoolExecutor(1, thread_name_prefix="kvpipe-pin")
    return _pin_thread.submit(lambda: int(getattr(torch.cuda.cudart(), call)(*args))).result()


def _unregister(address: int) -> None:
    on_pin_thread("cudaHostUnregister", address)


def pinned_host_buffer(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """Page-locked host memory; the flag says whether kvpipe registered it itself.

    Why not ``torch.empty(pin_memory=True)``: cudaHostAlloc locks 4 KiB pages one by one, at
    2.2 GB/s on an H100 host and 0.6 GB/s on an H200 host, slower than the K/V it is meant to
    receive. An anonymous mapping with transparent huge pages, faulted in by several threads
    and then registered with CUDA, took 1 GiB at 17 GB/s (faults) + 33 GB/s (registration)
    on the H100 host. The registration is undone when the returned tensor is freed (a
    mapping freed while registered would leave the driver a stale range that a later
    allocation at the same address trips over). Falls back to torch's pinned allocator
    where that path is missing."""
    with torch.inference_mode(False):  # a buffer that outlives any caller's inference mode
        return _pinned_host_buffer(numel, dtype)


def _pinned_host_buffer(numel: int, dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    nbytes = numel * dtype.itemsize
    if nbytes and hasattr(mmap, "MADV_HUGEPAGE"):
        region = mmap.mmap(-1, nbytes)
        region.madvise(mmap.MADV_HUGEPAGE)
        t = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive
        _fault_in(t)
        if on_pin_thread("cudaHostRegister", t.data_ptr(), nbytes, 0) == 0:
            out = t.view(dtype)
            # before the mapping goes (views keep the storage, not ``out``, alive: they only
            # lose the page-locking); not at interpreter exit, when CUDA may be gone
            weakref.finalize(out, _unregister, out.data_ptr()).atexit = False
            return out, True
    return torch.empty(numel, dtype=dtype, pin_memory=True), False


class HostBufferPool:
    """Host buffers (pinned or pageable) reused across batches: the smallest free one that
    fits, else a new one; at most ``keep`` free ones are kept."""

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
        size = int(numel * 1.25) + 1
        if not self.pin:
            return torch.empty(size, dtype=dtype)
        return pinned_host_buffer(size, dtype)[0]

    def give(self, buffers: list[torch.Tensor]) -> None:
        with self.lock:
            self.free.extend(buffers)
            del self.free[:max(0, len(self.free) - self.keep)]  # bound what is kept


@dataclass
class Copied:
    """One batch's arrays on their way to the host: ``host`` holds valid data once ``wait``
    returns; ``release`` hands the buffers back to the pool (after the part is written)."""

    host: dict[str, np.ndarray]
    done: torch.cuda.Event | Future | None = None
    buffers: list[torch.Tensor] = field(default_factory=list)
    pool: HostBufferPool | None = None

    def wait(self) -> None:
        if isinstance(self.done, Future):
            self.done.result()
        elif self.done is not None:
            self.done.synchronize()

    def release(self) -> None:
        if self.pool is not None and self.buffers:
            self.pool.give(self.buffers)
        self.buffers = []


class HostCopier:
    """Copies batches to host memory on a side stream; ``submit`` returns at once.

    ``pinned=True`` (the default): asynchronous copies into pooled page-locked buffers, issued
    from the calling thread; the GPU's copy engine does the work. ``pinned=False``: a copier
    thread copies into reused pageable buffers (the driver stages the transfer through its
    own pinned memory with a CPU memcpy: 13.5 GB/s into warm pages, 1.2 GB/s into fresh ones
    on an H100 host).
    """

    def __init__(self, device: torch.device, pinned: bool = True):
        self.cuda = device.type == "cuda"
        self.pinned = pinned
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.pool = HostBufferPool(pin=self.cuda and pinned)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="kvpipe-d2h") if self.cuda and not pinned else None

    def submit(self, arrays: dict[str, torch.Tensor]) -> Copied:
        if not self.cuda:
            return Copied({k: host_view(v.cpu()) for k, v in arrays.items()})
        ready = torch.cuda.Event()
        ready.record()
        buffers = [self.pool.take(t.numel(), t.dtype) for t in arrays.values()]
        views = {k: b[: t.numel()].view(t.shape) for (k, t), b in zip(arrays.items(), buffers)}
        if self.thread is not None:  # the job holds ``arrays`` until copied: no record_stream needed
            job = self.thread.submit(self._copy_pageable, arrays, views, ready)
            return Copied({k: host_view(v) for k, v in views.items()}, job, buffers, self.pool)
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for kind, t in arrays.items():
                views[kind].copy_(t, non_blocking=True)
                t.record_stream(self.stream)  # keep the device memory until the copy has run
            done = torch.cuda.Event()
            done.record(self.stream)
        return Copied({k: host_view(v) for k, v in views.items()}, done, buffers, self.pool)

    def _copy_pageable(self, arrays: dict[str, torch.Tensor], views: dict[str, torch.Tensor],
                       ready: torch.cuda.Event) -> None:
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            for kind, t in arrays.items():
                views[kind].copy_(t)  # pageable destination: returns once copied
        self.stream.synchronize()

    def close(self) -> None:
        if self.thread is not None:
            self.thread.shutdown(wait=True)
            self.thread = None
        if self.stream is not None:
            self.stream.synchronize()


@dataclass
class Uploaded:
    """A batch's model inputs already on the device, copied on a side stream; ``use`` makes
    them safe to read on the calling thread's current stream."""

    inputs: dict[str, Any]
    done: torch.cuda.Event | None = None

    def use(self) -> dict[str, Any]:
        if self.done is not None:
            on_device = [v for v in self.inputs.values() if isinstance(v, torch.Tensor) and v.is_cuda]
            if on_device:
                stream = torch.cuda.current_stream(on_device[0].device)
                stream.wait_event(self.done)
                for v in on_device:
                    v.record_stream(stream)  # freed after the forward's kernels, not before
            self.done = None
        return self.inputs


class InputUploader:
    """Copies a batch's model inputs to the device through a reused page-locked buffer.

    Why: the loader hands over pageable memory (a loader process's shared memory). Copying
    pageable memory to the device is a synchronous cudaMemcpy that first waits for all
    queued GPU work, so at every batch start the GPU ran dry while the host staged the
    pixels: the GPU idled 102 ms per LLaVA-OV batch of 8 during an extraction on an H100
    host, 31 ms with this, 1 ms in the bare prefill (``benchmarks/extract_timeline.py``).
    ``upload`` runs on a thread of its own ahead of the forward pass (``upload_ahead``);
    inputs named in ``keep`` stay on the host (``ModelAdapter.host_inputs``)."""

    def __init__(self, device: torch.device, keep: tuple[str, ...] = ()):
        self.device, self.keep = device, keep
        self.stream = torch.cuda.Stream(device)
        self.pool = HostBufferPool(pin=True, keep=8)

    def upload(self, inputs: dict[str, Any]) -> Uploaded:
        tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor) and k not in self.keep}
        buffers = [self.pool.take(t.numel(), t.dtype) for t in tensors.values()]
        out = dict(inputs)
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            for (k, t), buf in zip(tensors.items(), buffers):
                staged = buf[: t.numel()].view(t.shape)
                staged.copy_(t)  # a CPU copy, on this thread: off the forward's path
                out[k] = staged.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        done.synchronize()  # the page-locked buffers can take the next batch
        self.pool.give(buffers)
        return Uploaded(out, done)


T = TypeVar("T")


def upload_ahead(items: Iterator[T], upload: Callable[[T], T], ahead: int = 2) -> Iterator[T]:
    """``items`` in order, each passed through ``upload`` on a thread of its own, up to
    ``ahead`` of them before the consumer asks. Errors come out where the item would."""
    with ThreadPoolExecutor(1, thread_name_prefix="kvpipe-upload") as thread:
        end = object()

        def fetch() -> Any:
            item = next(items, end)
            return item if item is end else upload(item)

        queue = deque(thread.submit(fetch) for _ in range(ahead))
        while True:
            item = queue.popleft().result()
            if item is end:
                return
            queue.append(thread.submit(fetch))
            yield item
