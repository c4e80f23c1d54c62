"""File checksums (CRC32C) recorded at commit time and checked by ``kvpipe verify``."""

from __future__ import annotations

from pathlib import Path

import google_crc32c


def file_crc32c(path: Path, block: int = 1 << 22) -> str:
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc.update(chunk)
    return crc.hexdigest().decode()


def tree_checksums(root: Path) -> dict[str, str]:
    """Checksum of every file under ``root``, keyed by posix path relative to it."""
    return {p.relative_to(root).as_posix(): file_crc32c(p)
            for p in sorted(root.rglob("*")) if p.is_file()}
