"""File checksums (CRC32C) recorded at commit time and checked by ``kvpipe verify``."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import google_crc32c

THREADS = min(16, os.cpu_count() or 1)


def file_crc32c(path: Path, block: int = 1 << 22, fsync: bool = False) -> str:
    """CRC32C of a file; with ``fsync`` also force it to disk (a commit must not precede its data)."""
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc.update(chunk)
        if fsync:
            os.fsync(fh.fileno())
    return crc.hexdigest().decode()


def tree_checksums(root: Path, fsync: bool = False) -> dict[str, str]:
    """Checksum of every file under ``root``, keyed by posix path relative to it.

    Files are hashed in a thread pool (CRC32C and fsync release the GIL), since a part holds
    hundreds of chunk files and this runs on the commit path."""
    files = sorted(p for p in root.rglob("*") if p.is_file())
    with ThreadPoolExecutor(THREADS) as pool:
        sums = list(pool.map(lambda p: file_crc32c(p, fsync=fsync), files))
    return {p.relative_to(root).as_posix(): c for p, c in zip(files, sums)}
