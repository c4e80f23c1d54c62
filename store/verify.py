"""``kvpipe verify``: find any corruption in a store.

Checks the whole store: the metadata (every field typed and bounded, on open), every commit
record (fields, checksum paths, data directory), per committed part every file's CRC32C
against the one recorded at commit, every array decodes, shapes agree with the manifest
(token counts, masks), nothing is missing; the text queries' files and arrays against
text.parquet; dataset.json against the sha256 the metadata records. Returns the damaged
parts, and whether the text queries or dataset.json are damaged, so ``kvpipe extract
--repair`` can redo exactly those.
"""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import zarr

from kvpipe.store import layout
from kvpipe.store.checksum import THREADS
from kvpipe.store.encoding import stored_dim
from kvpipe.store.fs import Location
from kvpipe.store.manifest import check_checksums
from kvpipe.store.reader import FeatureStore
from kvpipe.store.encoding import stored_dim
from kvpipe.store.schema import Kind, structure_fingerprint


@dataclass
class VerifyReport:
    parts_checked: int = 0
    problems: dict[int, list[str]] = field(default_factory=dict)
    stray: list[str] = field(default_factory=list)  # uncommitted leftovers (harmless)
    text_problems: list[str] = field(default_factory=list)  # text/ and text.parquet
    structure_problems: list[str] = field(default_factory=list)  # dataset.json

    @property
    def ok(self) -> bool:
        return not (self.problems or self.text_problems or self.structure_problems)

    @property
    def store_problems(self) -> list[str]:
        """Problems outside the parts, each naming its file."""
        return [f"text queries: {p}" for p in self.text_problems] + \
               [f"{layout.STRUCTURE}: {p}" for p in self.structure_problems]

    def add(self, part: int, msg: str) -> None:
        self.problems.setdefault(part, []).append(msg)


def _check_files(loc: Location, root, pdir: str, sums: dict[str, str]) -> list[str]:
    """Files under ``pdir`` against the CRC32Cs of their commit record."""
    on_disk = set(loc.files(pdir))
    if not on_disk and sums:
        return [f"{root / pdir} is missing"]
    problems = [f"file {rel} is missing" for rel in sorted(set(sums) - on_disk)]
    problems += [f"file {rel} was not part of the commit" for rel in sorted(on_disk - set(sums))]
    for rel in sorted(set(sums) & on_disk):
        if loc.crc32c(f"{pdir}/{rel}") != sums[rel]:
            problems.append(f"file {rel} fails its checksum")
    return problems


def verify_store(path: str | Path | Location, decode: bool = True) -> VerifyReport:
    """Check a store directory or URL; files are checksummed in threads (CRC32C and, on
    object stores, the downloads release the GIL). Nothing outside the store is read: every
    path comes from a validated record and stays inside the store."""
    store = FeatureStore.open(path, strict=False)
    loc = store.loc
    report = VerifyReport()
    for part, why in sorted(store.bad_records.items()):
        report.parts_checked += 1
        report.add(part, why)

    def check_files(part: int) -> list[str]:
        return _check_files(loc, store.root, store.data_dir(part), store.checksums[part])

    parts = sorted(store.checksums)
    with ThreadPoolExecutor(THREADS) as pool:
        found = list(pool.map(check_files, parts))
    for part, problems in zip(parts, found):
        report.parts_checked += 1
        for msg in problems:
            report.add(part, msg)
        if decode and part not in report.problems:
            _check_arrays(store, part, report)
    used = {store.data_dir(p) for p in parts} | {layout.part_rel(p) for p in store.bad_records}
    for name in loc.listdir(layout.PARTS):
        if layout.part_of_dir_name(name) is not None and f"{layout.PARTS}/{name}" not in used:
            report.stray.append(str(store.root / layout.PARTS / name))
    report.text_problems = _check_text(store, decode)
    report.structure_problems = _check_structure(store)
    return report


def _check_arrays(store: FeatureStore, part: int, report: VerifyReport) -> None:
    rows = [r for r in store.rows if r.part == part]
    n_tokens = sum(r.n_tokens for r in rows if r.ok)
    end = max((r.token_offset + r.n_tokens for r in rows), default=0)
    try:
        group = store._part(part)
        for kind in store.meta.kinds:
            if n_tokens == 0:
                continue
            arr = group[kind]
            data = np.asarray(arr[...])
            dim = store.meta.hidden_size if kind == Kind.POST_PROJ else store.meta.head_dim
            header = store._header_rows(dim)  # pca's chunks: header rows before the tokens
            if data.shape[-2] - header != n_tokens:
                report.add(part, f"{kind} has {data.shape[-2] - header} tokens, the manifest says {n_tokens}")
            elif end > n_tokens:
                report.add(part, f"the manifest's token ranges end at {end}, past the {n_tokens} tokens of {kind}")
            width = stored_dim(dim, store.meta.store_dtype)
            if data.shape[-1] != width:
                report.add(part, f"{kind} tokens have {data.shape[-1]} columns on disk, the metadata says {dim} "
                                 f"numbers ({width} columns as {store.meta.store_dtype})")
        n_mask = sum(r.mask_h * r.mask_w for r in rows if r.mask_offset >= 0)
        if n_mask:
            size = group["masks"].shape[0]
            if size != n_mask or any(r.mask_offset + r.mask_h * r.mask_w > size for r in rows if r.mask_offset >= 0):
                report.add(part, "masks size disagrees with the manifest")
    except Exception as err:  # decoding errors of any kind mean damage
        report.add(part, f"cannot decode: {str(err).splitlines()[0]}")


def _check_text(store: FeatureStore, decode: bool) -> list[str]:
    """text.parquet (queries, checksums) and the files and arrays of text/."""
    loc, meta = store.loc, store.meta
    try:
        data = loc.read_bytes(layout.TEXT_RECORD)
    except FileNotFoundError:
        if loc.listdir(layout.TEXT):
            return []  # written but not committed (a run killed in its text pass): pending, not damage
        return []
    try:
        table = pq.read_table(io.BytesIO(data))
        queries = table.column("query").to_pylist()
        sums = json.loads((table.schema.metadata or {}).get(b"kvpipe.checksums", b"{}"))
        check_checksums(sums, layout.TEXT_RECORD)
    except Exception as err:
        return [f"{layout.TEXT_RECORD} is unreadable ({str(err).splitlines()[0]})"]
    problems = []
    if queries != list(meta.text_queries):
        problems.append(f"{layout.TEXT_RECORD} lists {len(queries)} queries, the metadata {len(meta.text_queries)}")
    problems += [f"{layout.TEXT}/{p[len('file '):]}" if p.startswith("file ") else p
                 for p in _check_files(loc, store.root, layout.TEXT, sums)]
    if decode and not problems:
        try:
            group = zarr.open_group(loc.zarr_store(layout.TEXT), mode="r")
            for kind in meta.kinds:
                if kind not in group:
                    continue
                shape = np.asarray(group[kind][...]).shape
                if kind == Kind.POST_PROJ:
                    width = stored_dim(meta.hidden_size, meta.text_store_dtype)
                    if shape != (len(queries), width):
                        problems.append(f"{layout.TEXT}/{kind} has shape {shape}, not [{len(queries)}, {width}]")
                elif shape[:3] != (len(meta.layers), len(meta.heads), len(queries)):
                    problems.append(f"{layout.TEXT}/{kind} has shape {shape}, not "
                                    f"[{len(meta.layers)}, {len(meta.heads)}, {len(queries)}, ...]")
        except Exception as err:
            problems.append(f"cannot decode {layout.TEXT}: {str(err).splitlines()[0]}")
    return problems


def _check_structure(store: FeatureStore) -> list[str]:
    """dataset.json against the sha256 recorded in the metadata (dataset.structure_sha256)."""
    recorded = store.meta.dataset.structure_sha256
    if recorded is None:
        return []  # stores made before the fingerprint was recorded
    try:
        structure = json.loads(store.loc.read_bytes(layout.STRUCTURE))
    except FileNotFoundError:
        return ["is missing"]
    except ValueError as err:
        return [f"is not valid JSON ({str(err).splitlines()[0]})"]
    if not isinstance(structure, dict):
        return ["is not a JSON object"]
    actual = structure_fingerprint(structure)
    if actual != recorded:
        return [f"sha256 {actual[:16]}... differs from the metadata's structure_sha256 {recorded[:16]}..."]
    return []
