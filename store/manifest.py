"""The manifest: one parquet row per image, one parquet file per committed part.

Why parquet: typed, columnar, readable by every data tool, and it never executes code when
read (unlike pickles), so a store from someone else is safe to open.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from kvpipe.errors import StoreError

OK, FAILED = "ok", "failed"

SCHEMA = pa.schema([
    ("index", pa.int64()),  # position in the dataset's order
    ("image_id", pa.string()),
    ("part", pa.int64()),
    ("status", pa.string()),  # "ok" or "failed"
    ("error", pa.string()),
    ("token_offset", pa.int64()),  # first token of this image in the part's token axis
    ("n_tokens", pa.int64()),
    ("grid_h", pa.int64()),  # base-view token grid
    ("grid_w", pa.int64()),
    ("segments", pa.string()),  # JSON list of token-grid segments (base, crops, newlines)
    ("image_h", pa.int64()),  # original image size in pixels
    ("image_w", pa.int64()),
    ("source", pa.string()),
    ("group", pa.string()),  # video / image set
    ("frame", pa.int64()),
    ("mask_offset", pa.int64()),  # annotation mask, flattened in the part's masks array
    ("mask_h", pa.int64()),
    ("mask_w", pa.int64()),
    ("meta", pa.string()),  # JSON annotation metadata
])


@dataclass
class ImageRow:
    index: int
    image_id: str
    part: int
    status: str = OK
    error: str = ""
    token_offset: int = 0
    n_tokens: int = 0
    grid_h: int = 0
    grid_w: int = 0
    segments: str = "[]"
    image_h: int = 0
    image_w: int = 0
    source: str = ""
    group: str = ""
    frame: int = -1
    mask_offset: int = -1
    mask_h: int = 0
    mask_w: int = 0
    meta: str = "{}"

    @property
    def ok(self) -> bool:
        return self.status == OK

    @property
    def grid(self) -> tuple[int, int]:
        return (self.grid_h, self.grid_w)

    def segment_list(self) -> list[dict[str, Any]]:
        return json.loads(self.segments)

    def meta_dict(self) -> dict[str, Any]:
        return json.loads(self.meta)


def _record_table(rows: list[ImageRow], checksums: dict[str, str], data_dir: str | None) -> pa.Table:
    table = pa.Table.from_pylist([asdict(r) for r in rows], schema=SCHEMA)
    meta = {b"kvpipe.checksums": json.dumps(checksums).encode()}
    if data_dir:  # object stores: the part's files live under a unique directory
        meta[b"kvpipe.data"] = data_dir.encode()
    return table.replace_schema_metadata(meta)


def write_part_record(path: Path, rows: list[ImageRow], checksums: dict[str, str],
                      data_dir: str | None = None) -> None:
    """Write a part's rows + file checksums as one parquet file (the caller renames it in)."""
    pq.write_table(_record_table(rows, checksums, data_dir), path)


def part_record_bytes(rows: list[ImageRow], checksums: dict[str, str], data_dir: str | None = None) -> bytes:
    """The same record as bytes, for a single-object PUT."""
    buf = io.BytesIO()
    pq.write_table(_record_table(rows, checksums, data_dir), buf)
    return buf.getvalue()


@dataclass
class PartCommit:
    """A part's commit record: its image rows, file checksums and data directory."""

    rows: list[ImageRow]
    checksums: dict[str, str]
    data_dir: str | None  # relative to the store root; None: parts/pNNNNNN


def _parse(table: pa.Table) -> PartCommit:
    meta = table.schema.metadata or {}
    checksums = json.loads(meta.get(b"kvpipe.checksums", b"{}"))
    data_dir = meta.get(b"kvpipe.data")
    names = set(SCHEMA.names)
    rows = [ImageRow(**{k: v for k, v in r.items() if k in names}) for r in table.to_pylist()]
    return PartCommit(rows, checksums, data_dir.decode() if data_dir else None)


def read_part_record(path: Path) -> tuple[list[ImageRow], dict[str, str]]:
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise StoreError(f"manifest file {path} is unreadable ({err}); run kvpipe verify") from None
    commit = _parse(table)
    return commit.rows, commit.checksums


def read_part_record_bytes(data: bytes, where: str) -> PartCommit:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:
        raise StoreError(f"manifest file {where} is unreadable ({str(err).splitlines()[0]}); "
                         f"run kvpipe verify") from None
    return _parse(table)
