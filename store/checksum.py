"""File checksums (CRC32C) recorded at commit time and checked by ``kvpipe verify``."""

from __future__ import annotations

import os
from pathlib import Path

import google_crc32c

THREADS = min(16, os.cpu_count() or 1)


def bytes_crc32c(data: bytes) -> str:
    """CRC32C of bytes in memory, as the hex string the manifest records."""
    return f"{google_crc32c.value(data):08x}"


def file_crc32c(path: Path, block: int = 1 << 22) -> str:
    """CRC32C of a file, read in blocks (the same string as ``bytes_crc32c`` of its bytes)."""
    crc = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(block):
            crc.update(chunk)
    return crc.hexdigest().decode()
