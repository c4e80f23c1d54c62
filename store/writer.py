"""Create or resume a feature store and commit parts atomically.

Why this protocol: a part is written under .staging/, checksummed, then renamed into parts/;
its manifest file is written under .staging/ and renamed into manifest/ last. A rename is
atomic on a local filesystem, so a crash at any point leaves either a committed part or
garbage in .staging/ that the next run deletes; no worker ever writes another's files.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np
import zarr

from kvpipe.errors import StoreError
from kvpipe.store import layout
from kvpipe.store.checksum import tree_checksums
from kvpipe.store.encoding import DISK_DTYPE, compressor, encode
from kvpipe.store.manifest import ImageRow, write_part_record
from kvpipe.store.schema import META_ATTR, FeatureSetMeta
from kvpipe.store.reader import read_meta


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class StoreWriter:
    """Writes parts of one feature set; safe to reopen after a crash."""

    def __init__(self, root: Path, meta: FeatureSetMeta):
        self.root = root
        self.meta = meta

    # ---- opening -----------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, meta: FeatureSetMeta,
                         structure: dict | None = None) -> "StoreWriter":
        """Open the store at ``path`` for ``meta``, creating it (with ``structure``, the
        dataset-level annotations written to dataset.json) when it does not exist yet."""
        root = Path(path)
        if root.exists() and not root.is_dir():
            raise StoreError(f"--out {root} is a file; give a directory path for the store")
        if root.exists() and any(root.iterdir()):
            existing = read_meta(root, option="--out")
            if existing.identity() != meta.identity():
                diff = sorted(k for k, v in meta.identity().items() if existing.identity().get(k) != v)
                raise StoreError(f"--out {root} holds another feature set (differs in {', '.join(diff)}); "
                                 f"choose a new --out or rerun with the options it was made with")
            writer = cls(root, existing)
        else:
            cls._create(root, meta, structure or {})
            writer = cls(root, meta)
        writer._clean_staging()
        return writer

    @staticmethod
    def _create(root: Path, meta: FeatureSetMeta, structure: dict) -> None:
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}.creating-{uuid.uuid4().hex[:8]}"
        zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3,
                        attributes={META_ATTR: meta.to_dict()})
        for sub in (layout.PARTS, layout.MANIFEST, layout.STAGING):
            (tmp / sub).mkdir()
        (tmp / layout.STRUCTURE).write_text(json.dumps(structure, sort_keys=True))
        if root.exists():
            root.rmdir()  # an empty directory the user made for us
        os.rename(tmp, root)

    def _clean_staging(self) -> None:
        staging = self.root / layout.STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(exist_ok=True)

    # ---- state ---------------------------------------------------------------------
    def committed_parts(self) -> set[int]:
        return {layout.part_of_manifest(p) for p in (self.root / layout.MANIFEST).glob("p*.parquet")}

    def n_parts(self) -> int:
        return -(-self.meta.n_images // self.meta.part_size)

    def pending_parts(self) -> list[int]:
        done = self.committed_parts()
        return [p for p in range(self.n_parts()) if p not in done]

    # ---- writing ----------------------------------------------------------------------
    def write_part(self, part: int, rows: list[ImageRow], arrays: dict[str, np.ndarray]) -> None:
        """Commit one part: rows (one per image) and its arrays.

        arrays: "keys"/"values" as [layers, heads, tokens, head_dim] float32, "post_proj" as
        [tokens, hidden] float32, "masks" as a flat uint8 array (all of the part's masks).
        """
        stage = self.root / layout.STAGING / f"{layout.part_name(part)}-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(zarr.storage.LocalStore(stage), mode="w", zarr_format=3)
        for name, arr in arrays.items():
            self._write_array(group, name, arr)
        checksums = tree_checksums(stage)
        final = layout.part_dir(self.root, part)
        if final.exists():  # left by a run killed between the two renames
            shutil.rmtree(final)
        os.rename(stage, final)
        record_tmp = self.root / layout.STAGING / f"{layout.part_name(part)}-{uuid.uuid4().hex[:8]}.parquet"
        write_part_record(record_tmp, rows, checksums)
        with open(record_tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(record_tmp, layout.manifest_file(self.root, part))
        _fsync_dir(self.root / layout.MANIFEST)

    def _write_array(self, group: zarr.Group, name: str, arr: np.ndarray) -> None:
        if name == "masks":
            data, dtype, comp = arr.astype(np.uint8), "uint8", compressor("float16")
            comp = type(comp)(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)
        else:
            data = encode(arr, self.meta.store_dtype)
            dtype, comp = DISK_DTYPE[self.meta.store_dtype], compressor(self.meta.store_dtype)
        if data.size == 0:
            return  # a part whose images all failed has no tokens
        if data.ndim == 4:  # [layer, head, token, dim]: one chunk = one (layer, head) of the part
            chunks = (1, 1, *data.shape[2:])
            shards = data.shape
        else:
            chunks, shards = data.shape, None
        z = group.create_array(name, shape=data.shape, chunks=chunks, shards=shards, dtype=dtype,
                               compressors=comp, fill_value=0)
        z[...] = data

    def write_text(self, queries: list[str], token_ids: list[list[int]], arrays: dict[str, np.ndarray]) -> None:
        """Commit the text queries' final-token K/V ([layers, heads, queries, head_dim])."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        stage = self.root / layout.STAGING / f"text-{uuid.uuid4().hex[:8]}"
        group = zarr.open_group(zarr.storage.LocalStore(stage), mode="w", zarr_format=3)
        for name, arr in arrays.items():
            self._write_array(group, name, arr)
        final = self.root / layout.TEXT
        if final.exists():
            shutil.rmtree(final)
        os.rename(stage, final)
        table = pa.table({"query": queries, "token_ids": token_ids})
        table = table.replace_schema_metadata(
            {b"kvpipe.checksums": __import__("json").dumps(tree_checksums(final)).encode()})
        tmp = self.root / layout.STAGING / "text.parquet"
        pq.write_table(table, tmp)
        os.rename(tmp, self.root / layout.TEXT_RECORD)

    def text_committed(self) -> bool:
        return (self.root / layout.TEXT_RECORD).exists()
