"""Host memory for device-to-host copies: what fresh and reused buffers cost (1 GiB each).

Prints GB/s for: a copy into fresh pageable memory (page faults) and into the same memory
again; the same with transparent huge pages; torch's pinned allocator (cudaHostAlloc); a
huge-page mapping faulted in by torch's threads, then registered with CUDA
(``cudaHostRegister``, what ``pipeline.transfer.pinned_host_buffer`` does); copies into
registered memory; registering memory that was never touched, and plain malloc'd memory.

    python benchmarks/host_buffers.py
"""

from __future__ import annotations

import mmap
import os
import time

import torch

N = 1 << 30


def main() -> None:
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    print("transparent huge pages:", open(thp).read().strip() if os.path.exists(thp) else "n/a",
          "| cores:", os.cpu_count())
    src = torch.empty(N // 2, dtype=torch.bfloat16, device="cuda").normal_()
    cudart = torch.cuda.cudart()

    def rate(label: str, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        print(f"{label:48s} {N / (time.perf_counter() - t0) / 1e9:6.2f} GB/s", flush=True)
        return out

    def huge_pages() -> torch.Tensor:
        region = mmap.mmap(-1, N)
        region.madvise(mmap.MADV_HUGEPAGE)
        return torch.frombuffer(region, dtype=torch.bfloat16)

    def copy_into(buf: torch.Tensor) -> None:  # pageable: the driver stages it, returns when done
        buf.copy_(src)

    def dma_into(buf: torch.Tensor) -> None:  # page-locked: an asynchronous copy on a side stream
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            buf.copy_(src, non_blocking=True)
        stream.synchronize()

    def register(buf: torch.Tensor) -> None:
        assert int(cudart.cudaHostRegister(buf.data_ptr(), N, 0)) == 0

    pageable = torch.empty(N // 2, dtype=torch.bfloat16)
    rate("pageable, fresh: copy (page faults)", lambda: copy_into(pageable))
    rate("pageable, reused: copy", lambda: copy_into(pageable))
    thp_pageable = huge_pages()
    rate("huge pages, fresh: copy (page faults)", lambda: copy_into(thp_pageable))
    rate("huge pages, reused: copy", lambda: copy_into(thp_pageable))
    pinned = rate("pin_memory=True: allocate", lambda: torch.empty(N // 2, dtype=torch.bfloat16, pin_memory=True))
    rate("pin_memory=True: copy", lambda: dma_into(pinned))
    registered = huge_pages()
    rate("huge pages: fault in (torch's threads)", lambda: registered.view(torch.int16).fill_(0))
    rate("huge pages, faulted in: cudaHostRegister", lambda: register(registered))
    rate("huge pages, registered: copy", lambda: dma_into(registered))
    untouched = huge_pages()
    rate("huge pages, untouched: cudaHostRegister", lambda: register(untouched))
    plain = torch.empty(N // 2, dtype=torch.bfloat16)
    rate("malloc'd, untouched: cudaHostRegister", lambda: register(plain))
    for buf in (registered, untouched, plain):
        cudart.cudaHostUnregister(buf.data_ptr())


if __name__ == "__main__":
    main()
