"""The manifest: one parquet row per image, one parquet file per committed part.

Why parquet: typed, columnar, readable by every data tool, and it never executes code when
read (unlike pickles), so a store from someone else is safe to open.
"""

from __future__ import annotations

import io
import json
import re
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
    # --multi-image: the prompt (sequence) the image was run in, its index there and the sequence
    # position of its first token ("", -1, -1: the image was run alone)
    ("sequence", pa.string()),
    ("sequence_index", pa.int64()),
    ("sequence_offset", pa.int64()),
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
    sequence: str = ""
    sequence_index: int = -1
    sequence_offset: int = -1

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


def text_of(value: Any) -> Any:
    """A string parquet can hold: names from non-UTF-8 file names carry surrogate escapes
    (``os.fsdecode``), which are written as backslash escapes of their bytes ("caf\\xe9.png")."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return value


def _record_table(rows: list[ImageRow], checksums: dict[str, str], data_dir: str | None) -> pa.Table:
    table = pa.Table.from_pylist([{k: text_of(v) for k, v in asdict(r).items()} for r in rows], schema=SCHEMA)
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


def _parse(table: pa.Table, where: str = "manifest", part: int | None = None) -> PartCommit:
    """The record's rows, checksums and data directory, every field checked (``check_record``)."""
    for name in ("index", "image_id", "part"):
        if name not in table.schema.names:
            raise bad_field(where, name, "is missing")
    for fld in table.schema:
        if fld.name in SCHEMA.names and not fld.type.equals(SCHEMA.field(fld.name).type):
            raise bad_field(where, fld.name, f"has type {fld.type}, not {SCHEMA.field(fld.name).type}")
    if table.num_rows > MAX_ROWS:
        raise bad_field(where, "rows", f"number {table.num_rows}, more than {MAX_ROWS}")
    meta = table.schema.metadata or {}
    try:
        checksums = json.loads(meta.get(b"kvpipe.checksums", b"{}"))
        data_dir = meta[b"kvpipe.data"].decode() if meta.get(b"kvpipe.data") else None
    except (ValueError, UnicodeDecodeError) as err:
        raise bad_field(where, "kvpipe.checksums", f"is not JSON ({err})") from None
    names = set(SCHEMA.names)
    rows = [ImageRow(**{k: v for k, v in r.items() if k in names}) for r in table.to_pylist()]
    commit = PartCommit(rows, checksums, data_dir)
    check_record(commit, where, part)
    return commit


def read_part_record(path: Path) -> tuple[list[ImageRow], dict[str, str]]:
    try:
        table = pq.read_table(path)
    except Exception as err:
        raise StoreError(f"manifest file {path} is unreadable ({err}); run kvpipe verify") from None
    commit = _parse(table, str(path), _part_of(Path(path).name))
    return commit.rows, commit.checksums


def read_part_record_bytes(data: bytes, where: str) -> PartCommit:
    try:
        table = pq.read_table(io.BytesIO(data))
    except Exception as err:
        raise StoreError(f"manifest file {where} is unreadable ({str(err).splitlines()[0]}); "
                         f"run kvpipe verify") from None
    return _parse(table, where, _part_of(where.rsplit("/", 1)[-1]))


# ---- validation -----------------------------------------------------------------------------
# Bounds of a row's fields: far above any real image (a 7B any-res model gives a few thousand
# tokens per image), far below what would make a reader allocate gigabytes from one bad row.
MAX_ROWS = 1 << 20
MAX_INDEX = 1 << 40
MAX_TOKENS = 1 << 20  # per image
MAX_GRID = 1 << 14  # token rows / columns
MAX_PIXELS = 1 << 17  # image / mask side
_HEX8 = re.compile(r"[0-9a-f]{8}")
_DATA_DIR = re.compile(r"parts/p(\d{6})(-[0-9A-Za-z]{1,64})?")


def _part_of(name: str) -> int | None:
    m = re.fullmatch(r"p(\d{6})\.parquet", name)
    return int(m.group(1)) if m else None


def bad_field(where: str, name: str, problem: str) -> StoreError:
    """The one-line error for a manifest field out of bounds (the reader checks records with it too)."""
    return StoreError(f"manifest file {where}: {name} {problem}; the record is damaged "
                      f"(run kvpipe verify, then kvpipe extract --repair)")


def safe_relpath(rel: Any) -> bool:
    """A '/'-separated path that stays inside its directory (no '..', not absolute, no '\\')."""
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel or "\0" in rel:
        return False
    return all(p not in ("", ".", "..") for p in rel.split("/"))


def check_checksums(checksums: Any, where: str) -> None:
    if not isinstance(checksums, dict):
        raise bad_field(where, "kvpipe.checksums", "is not a JSON object")
    for rel, crc in checksums.items():
        if not safe_relpath(rel):
            raise bad_field(where, "kvpipe.checksums", f"names {rel!r}, a path outside the part")
        if not isinstance(crc, str) or not _HEX8.fullmatch(crc):
            raise bad_field(where, "kvpipe.checksums", f"of {rel} is {crc!r}, not a CRC32C")


def check_record(commit: PartCommit, where: str, part: int | None = None) -> None:
    """Type and bound of every field of a part's record (one-line StoreError naming it).

    Token ranges of a part's rows may not overlap and start at 0 or later; that the part's
    arrays hold exactly the tokens the rows claim is checked where they are read."""
    check_checksums(commit.checksums, where)
    if commit.data_dir is not None:
        m = _DATA_DIR.fullmatch(commit.data_dir)
        if not m or (part is not None and int(m.group(1)) != part):
            raise bad_field(where, "kvpipe.data", f"is {commit.data_dir[:60]!r}, not this part's directory under parts/")
    ends: list[tuple[int, int, str]] = []
    for i, r in enumerate(commit.rows):
        at = f"row {i}"
        for name, lo, hi in (("index", 0, MAX_INDEX), ("part", 0, 10**6 - 1), ("token_offset", 0, MAX_INDEX),
                             ("n_tokens", 0, MAX_TOKENS), ("grid_h", 0, MAX_GRID), ("grid_w", 0, MAX_GRID),
                             ("image_h", 0, MAX_PIXELS), ("image_w", 0, MAX_PIXELS), ("frame", -1, MAX_INDEX),
                             ("mask_offset", -1, MAX_INDEX * MAX_PIXELS), ("mask_h", 0, MAX_PIXELS),
                             ("mask_w", 0, MAX_PIXELS), ("sequence_index", -1, MAX_INDEX),
                             ("sequence_offset", -1, MAX_INDEX)):
            v = getattr(r, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise bad_field(where, f"{at} {name}", f"is {v!r}, outside {lo}..{hi}")
        for name in ("image_id", "status", "error", "segments", "source", "group", "meta", "sequence"):
            if not isinstance(getattr(r, name), str):
                raise bad_field(where, f"{at} {name}", f"is {getattr(r, name)!r}, not a string")
        if part is not None and r.part != part:
            raise bad_field(where, f"{at} part", f"is {r.part}, but the file is part {part}")
        if r.status not in (OK, FAILED):
            raise bad_field(where, f"{at} status", f"is {r.status!r}, not {OK} or {FAILED}")
        _check_segments(r, where, at)
        try:
            if not isinstance(json.loads(r.meta), dict):
                raise ValueError("not an object")
        except ValueError as err:
            raise bad_field(where, f"{at} meta", f"is not a JSON object ({err})") from None
        if r.n_tokens:
            ends.append((r.token_offset, r.token_offset + r.n_tokens, r.image_id))
    ends.sort()
    for (a0, a1, a), (b0, _, b) in zip(ends, ends[1:]):
        if b0 < a1:
            raise bad_field(where, "token_offset", f"of {b} ({b0}) overlaps the tokens of {a} ({a0}..{a1})")


def _check_segments(r: ImageRow, where: str, at: str) -> None:
    try:
        segs = json.loads(r.segments)
    except ValueError as err:
        raise bad_field(where, f"{at} segments", f"is not JSON ({err})") from None
    if not isinstance(segs, list):
        raise bad_field(where, f"{at} segments", "is not a JSON list")
    for seg in segs:
        ok = isinstance(seg, dict) and isinstance(seg.get("name"), str) and isinstance(seg.get("newline"), bool) \
            and all(isinstance(seg.get(k), int) and not isinstance(seg.get(k), bool) and 0 <= seg[k] <= MAX_TOKENS
                    for k in ("offset", "rows", "cols"))
        if not ok:
            raise bad_field(where, f"{at} segments", f"has a malformed entry {json.dumps(seg)[:60]}")
        if seg["offset"] + seg["rows"] * (seg["cols"] + int(seg["newline"])) > r.n_tokens:
            raise bad_field(where, f"{at} segments", f"entry {seg['name']!r} runs past the image's {r.n_tokens} tokens")
