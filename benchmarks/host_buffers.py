"""Host memory for device-to-host copies: what fresh and reused buffers cost (1 GiB each).

Prints GB/s for: a copy into fresh pageable memory (page faults) and into the same memory
again; the same with transparent huge pages; torch's pinned allocator (cudaHostAlloc); a
huge-page mapping faulted in by torch's threads, then registered with CUDA
(``cudaHostRegister``, what ``pipeline.transfer.pinned_host_buffer`` does); copies into
registered memory; registering memory that was never touched, and plain malloc'd memory.

    python -m kvpipe.benchmarks.host_buffers [--mib 1024]

CUDA only: on any other device it stops with a one-line message.
"""

from __future__ import annotations

import argparse
import mmap
import os
import time

from kvpipe.benchmarks import common
from kvpipe.benchmarks.common import finish, parse_args, require_cuda


def get_args_parser(description: str | None = __doc__, parents=(), add_help: bool = True) -> argparse.ArgumentParser:
    parser = common.get_args_parser(description, parents, add_help, groups=("device",))
    parser.add_argument("--mib", type=int, default=1024, help="MiB per buffer (default: %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(get_args_parser(), argv)
    require_cuda(args.device, "host_buffers (page-locked host memory and device-to-host copies)")
    import torch

    nbytes = args.mib << 20
    results: dict[str, float] = {}
    thp = "/sys/kernel/mm/transparent_hugepage/enabled"
    print("transparent huge pages:", open(thp).read().strip() if os.path.exists(thp) else "n/a",
          "| cores:", os.cpu_count())
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=args.device).normal_()
    cudart = torch.cuda.cudart()

    def rate(label: str, fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        results[label] = nbytes / (time.perf_counter() - t0) / 1e9
        print(f"{label:48s} {results[label]:6.2f} GB/s", flush=True)
        return out

    def huge_pages() -> torch.Tensor:
        region = mmap.mmap(-1, nbytes)
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
        assert int(cudart.cudaHostRegister(buf.data_ptr(), nbytes, 0)) == 0

    pageable = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    rate("pageable, fresh: copy (page faults)", lambda: copy_into(pageable))
    rate("pageable, reused: copy", lambda: copy_into(pageable))
    thp_pageable = huge_pages()
    rate("huge pages, fresh: copy (page faults)", lambda: copy_into(thp_pageable))
    rate("huge pages, reused: copy", lambda: copy_into(thp_pageable))
    pinned = rate("pin_memory=True: allocate", lambda: torch.empty(nbytes // 2, dtype=torch.bfloat16, pin_memory=True))
    rate("pin_memory=True: copy", lambda: dma_into(pinned))
    registered = huge_pages()
    rate("huge pages: fault in (torch's threads)", lambda: registered.view(torch.int16).fill_(0))
    rate("huge pages, faulted in: cudaHostRegister", lambda: register(registered))
    rate("huge pages, registered: copy", lambda: dma_into(registered))
    untouched = huge_pages()
    rate("huge pages, untouched: cudaHostRegister", lambda: register(untouched))
    plain = torch.empty(nbytes // 2, dtype=torch.bfloat16)
    rate("malloc'd, untouched: cudaHostRegister", lambda: register(plain))
    for buf in (registered, untouched, plain):
        cudart.cudaHostUnregister(buf.data_ptr())
    return finish(args, {"bytes": nbytes, "gb_s": results})


if __name__ == "__main__":
    main()
