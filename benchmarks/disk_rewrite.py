"""Is writing never-written disk blocks slower than rewriting freed ones?

Three rounds of 6 GiB in 64 MiB writes, each fsync'd, the file deleted between rounds (the
first round lands on fresh blocks of a new disk; later rounds may reuse the freed ones).

    python benchmarks/disk_rewrite.py DIR
"""

import os
import sys
import time

folder = sys.argv[1] if len(sys.argv) > 1 else "."
block, count = os.urandom(64 << 20), 96
for r in range(3):
    path = os.path.join(folder, f"kvpipe-disk-rewrite-{r}.bin")
    t0 = time.perf_counter()
    with open(path, "wb") as fh:
        for _ in range(count):
            fh.write(block)
        fh.flush()
        os.fsync(fh.fileno())
    seconds = time.perf_counter() - t0
    print(f"round {r + 1}: {count * 64 / 1024:.0f} GiB at {count * len(block) / seconds / 1e6:.0f} MB/s", flush=True)
    os.unlink(path)
    os.sync()
