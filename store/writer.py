"""Create or resume a feature store and commit parts atomically.

Why this protocol: a part is written under .staging/, checksummed, then renamed into parts/;
its manifest file is written under .staging/ and renamed into manifest/ last. A rename is
atomic on a local filesystem, so a crash at any point leaves either a committed part or
garbage in .staging/ that the next run deletes; no worker ever writes another's files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zarr

from kvpipe.errors import StoreError
from kvpipe.store import layout
from kvpipe.store.checksum import file_crc32c
from kvpipe.store.chunks import TokenSegments, write_chunks
from kvpipe.store.encoding import DISK_DTYPE, compressor, compressor_for, encode, encoding_for
from kvpipe.store.fs import Location, ObjectLocation, fsync_dir, open_location, sync_tree
from kvpipe.store.lease import LEASE, WriterLease
from kvpipe.store.manifest import ImageRow, part_record_bytes, read_part_record_bytes, write_part_record
from kvpipe.store.schema import META_ATTR, FeatureSetMeta
from kvpipe.store.reader import read_meta


@dataclass
class StagedPart:
    """A part's files written where readers never look, with their CRC32Cs."""

    path: str  # relative to the store root
    checksums: dict[str, str]


class StoreWriter:
    """Writes parts of one feature set; safe to reopen after a crash."""

    def __init__(self, root: Path | str | Location, meta: FeatureSetMeta):
        self.loc = open_location(root)
        self.root = self.loc.root  # a Path, or an object store's URL
        self.remote = not self.loc.atomic_rename  # object store: unique prefixes, record PUT commits
        self.meta = meta
        self._committed_now: dict[int, str] = {}  # part -> data directory, committed by this writer
        self._lease: WriterLease | None = None  # held by create_or_resume's writers, not by staging workers

    # ---- opening -----------------------------------------------------------------
    @classmethod
    def create_or_resume(cls, path: str | os.PathLike, meta: FeatureSetMeta,
                         structure: dict | None = None, lease_timeout: float | None = None) -> "StoreWriter":
        """Open the store at ``path`` for ``meta``, creating it (with ``structure``, the
        dataset-level annotations written to dataset.json) when it does not exist yet.

        The writer holds the store's writer lease (``store.lease``) until ``close()``: a second
        run writing the same store is refused in one line naming this one."""
        loc = open_location(path, "--out")
        lease = None
        try:
            if not loc.atomic_rename:
                loc.check()
                names = set(loc.listdir(""))
                # objects without zarr.json are another run's store in creation when its lease is
                # there (the lease then names it), else something that is not a kvpipe store
                if not loc.isfile("zarr.json") and names and LEASE not in names:
                    raise StoreError(f"--out {loc.root} holds other objects but no kvpipe store (no zarr.json); "
                                     f"choose an empty prefix")
                lease = WriterLease.acquire(loc, lease_timeout, "--out")  # before anything is written
                writer = cls._open_object_store(loc, meta, structure or {})
            else:
                root = loc.root
                if root.exists() and not root.is_dir():
                    raise StoreError(f"--out {root} is a file; give a directory path for the store")
                remove_creation_leftovers(root)
                if root.exists() and any(root.iterdir()):
                    read_meta(root, option="--out")  # a kvpipe store, before a lease is written into it
                elif cls._create(root, meta, structure or {}):
                    lease = WriterLease.acquire(loc, lease_timeout, "--out")
                    writer = cls(root, meta)
                if lease is None:  # an existing store (or one another run created just now)
                    lease = WriterLease.acquire(loc, lease_timeout, "--out")
                    writer = cls(root, _same_feature_set(read_meta(root, option="--out"), meta, root))
            writer._lease, lease = lease, None
        finally:
            if lease is not None:
                lease.release()
        try:
            writer._clean_staging()
        except BaseException:
            writer.close()
            raise
        return writer

    def close(self) -> None:
        """Release the writer lease (idempotent). ``run_job`` calls it once the run is over."""
        lease, self._lease = self._lease, None
        if lease is not None:
            lease.release()

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_lease(self) -> None:
        if self._lease is not None:
            self._lease.check()

    @staticmethod
    def _create(root: Path, meta: FeatureSetMeta, structure: dict) -> bool:
        """Build the store under a hidden temporary name and rename it in; False when another
        run created the store first (the caller then resumes it)."""
        root.parent.mkdir(parents=True, exist_ok=True)
        tmp = root.parent / f".{root.name}{CREATING}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3,
                            attributes={META_ATTR: meta.to_dict()})
            for sub in (layout.PARTS, layout.MANIFEST, layout.STAGING):
                (tmp / sub).mkdir()
            (tmp / layout.STRUCTURE).write_text(json.dumps(structure, sort_keys=True))
            try:
                if root.exists():
                    root.rmdir()  # an empty directory the user made for us
                os.rename(tmp, root)
            except OSError as err:
                if root.is_dir() and (root / "zarr.json").exists():
                    return False  # another run's rename won
                raise StoreError(f"--out {root}: cannot create the store ({err})") from None
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return True

    @classmethod
    def _open_object_store(cls, loc: ObjectLocation, meta: FeatureSetMeta, structure: dict) -> "StoreWriter":
        """Object stores: dataset.json first, the root zarr.json last (it makes the store exist)."""
        if loc.isfile("zarr.json"):
            return cls(loc, _same_feature_set(read_meta(loc, option="--out"), meta, loc.root))
        with tempfile.TemporaryDirectory(prefix="kvpipe-create-") as tmp:
            zarr.open_group(zarr.storage.LocalStore(tmp), mode="w", zarr_format=3,
                            attributes={META_ATTR: meta.to_dict()})
            group_json = (Path(tmp) / "zarr.json").read_bytes()
        loc.write_atomic(layout.STRUCTURE, json.dumps(structure, sort_keys=True).encode())
        loc.write_atomic("zarr.json", group_json)
        return cls(loc, meta)

    @classmethod
    def open_for_staging(cls, path: str | os.PathLike | Location, meta: FeatureSetMeta) -> "StoreWriter":
        """A writer for a worker process: stages parts into an existing store, never cleans."""
        return cls(path, meta)

    @property
    def location(self) -> Location:
        return self.loc

    def clean_staging(self) -> None:
        """Delete leftovers of writes that never committed (the driver, at start and end)."""
        self._clean_staging()

    def _clean_staging(self) -> None:
        """Only the lease holder cleans (no other writer is alive), and never a directory that
        a commit record names: on an object store, prefixes no record points to (uploads that
        never got a record, older attempts of parts committed since)."""
        self._check_lease()
        if self.remote:
            names = [n for n in self.loc.listdir(layout.MANIFEST) if n.startswith("p") and n.endswith(".parquet")]
            records = self.loc.read_many([f"{layout.MANIFEST}/{n}" for n in names])
            keep, unsure = set(), set()
            for name in names:
                part = layout.part_of_manifest_name(name)
                try:
                    commit = read_part_record_bytes(records[f"{layout.MANIFEST}/{name}"], name)
                except StoreError:
                    unsure.add(part)  # an unreadable record: leave its part's files to --repair
                    continue
                keep.add(commit.data_dir or layout.part_rel(part))
            for d in self.loc.listdir(layout.PARTS):
                part = layout.part_of_dir_name(d)
                rel = f"{layout.PARTS}/{d}"
                if part is not None and part not in unsure and rel not in keep:
                    self.loc.rmtree(rel)
            return
        staging = self.root / layout.STAGING
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(exist_ok=True)

    # ---- state ---------------------------------------------------------------------
    def committed_parts(self) -> set[int]:
        return {layout.part_of_manifest_name(n) for n in self.loc.listdir(layout.MANIFEST)
                if n.startswith("p") and n.endswith(".parquet")}

    def n_parts(self) -> int:
        return -(-self.meta.n_images // self.meta.part_size)

    def pending_parts(self) -> list[int]:
        done = self.committed_parts()
        return [p for p in range(self.n_parts()) if p not in done]

    # ---- writing ----------------------------------------------------------------------
    def write_part(self, part: int, rows: list[ImageRow], arrays: dict[str, np.ndarray]) -> None:
        """Commit one part: rows (one per image) and its arrays.

        arrays: "keys"/"values" as [layers, heads, tokens, head_dim] float32, "post_proj" as
        [tokens, hidden] float32, "masks" as a flat uint8 array (all of the part's masks);
        feature arrays may also come as ``TokenSegments`` (one piece per batch).
        """
        self.commit_part(part, self.stage_part(part, arrays), rows)

    def stage_part(self, part: int, arrays: dict[str, np.ndarray]) -> "StagedPart":
        """Write a part's arrays under .staging/ and checksum them; any worker process may do
        this (the name is unique), only the committing process calls ``commit_part``.

        On an object store the part is encoded locally (the same bytes) and uploaded under a
        unique prefix, parts/pNNNNNN-<id>/, which only a commit record makes visible."""
        if self.remote:
            rel = f"{layout.PARTS}/{layout.part_name(part)}-{uuid.uuid4().hex[:8]}"
            return StagedPart(rel, self._upload(arrays, rel))
        stage = self.root / layout.STAGING / f"{layout.part_name(part)}-{uuid.uuid4().hex[:8]}"
        return StagedPart(stage.relative_to(self.root).as_posix(), self._write_group(stage, arrays, fsync=True))

    def _write_group(self, path: Path, arrays: dict[str, np.ndarray], fsync: bool = False,
                     store_dtype: str | None = None) -> dict[str, str]:
        """Encode ``arrays`` as a Zarr group at a local ``path``; returns every file's CRC32C
        (chunks from their bytes in memory, the small metadata files read back). ``fsync``:
        every file is on disk when this returns (a commit must not precede its data).
        ``store_dtype``: the encoding (default: the store's)."""
        group = zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3)
        sums: dict[str, str] = {}
        meta_files = ["zarr.json"]  # the group's, then each written array's (no walk of the chunk tree)
        for name, arr in arrays.items():
            chunk_sums = self._write_array(group, path, name, arr, store_dtype or self.meta.store_dtype)
            if chunk_sums:
                sums.update({f"{name}/{k}": v for k, v in chunk_sums.items()})
                meta_files.append(f"{name}/zarr.json")
        sums.update({rel: file_crc32c(path / rel) for rel in meta_files})
        if fsync:
            sync_tree(path)
        return dict(sorted(sums.items()))

    def _upload(self, arrays: dict[str, np.ndarray], rel: str, store_dtype: str | None = None) -> dict[str, str]:
        """Object stores: encode the group locally (the same bytes), checksum it, upload it to
        ``rel``; returns the files' checksums."""
        with tempfile.TemporaryDirectory(prefix="kvpipe-upload-") as tmp:
            checksums = self._write_group(Path(tmp), arrays, store_dtype=store_dtype)
            self.loc.put_dir(Path(tmp), rel)
        return checksums

    def commit_part(self, part: int, staged: "StagedPart", rows: list[ImageRow]) -> None:
        """Make a staged part visible: rename it into parts/, then write its manifest record.

        On an object store the record, one PUT naming the part's prefix, is the whole commit."""
        self._check_lease()
        if self.remote:
            self.loc.write_atomic(layout.manifest_rel(part),
                                  part_record_bytes(rows, staged.checksums, data_dir=staged.path))
            self._committed_now[part] = staged.path
            return
        stage, checksums = self.root / staged.path, staged.checksums
        final = layout.part_dir(self.root, part)
        if final.exists():  # left by a run killed between the two renames
            shutil.rmtree(final)
        os.rename(stage, final)
        record_tmp = self.root / layout.STAGING / f"{layout.part_name(part)}-{uuid.uuid4().hex[:8]}.parquet"
        write_part_record(record_tmp, rows, checksums)
        with open(record_tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.rename(record_tmp, layout.manifest_file(self.root, part))
        fsync_dir(self.root / layout.MANIFEST)

    def _write_array(self, group: zarr.Group, path: Path, name: str, arr: np.ndarray, sd: str) -> dict[str, str]:
        """Zarr writes the array's metadata, ``store.chunks`` its chunk files (same bytes), in
        the encoding ``sd``."""
        coder, header = None, 0  # pca: each chunk coded whole, as one record with header rows before its tokens
        if name == "masks":
            data, dtype, comp = arr.astype(np.uint8), "uint8", compressor("float16")
            comp = type(comp)(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)
        else:  # batches from the device come already in the disk dtype; encode() passes them through
            params = self.meta.compressor
            enc = encoding_for(sd, params)
            if enc.chunk_encode is not None:
                data, coder, header = arr, enc.chunk_encode, enc.header_rows(arr.shape[-1])  # coded in the chunk's task
            else:
                data = (arr.map(lambda piece: encode(piece, sd, params)) if isinstance(arr, TokenSegments)
                        else encode(arr, sd, params))
            dtype, comp = DISK_DTYPE[sd], compressor_for(params, sd)
        if data.size == 0:
            return {}  # a part whose images all failed has no tokens
        # [layer, head, token, dim]: one chunk file = one (layer, head) of the part, so reading a
        # head across the store reads one file per part, and chunks compress and write in parallel
        chunks = (1, 1, *data.shape[2:]) if data.ndim == 4 else data.shape
        shape = (*data.shape[:-2], data.shape[-2] + header, data.shape[-1]) if header else data.shape
        group.create_array(name, shape=shape, chunks=(1, 1, *shape[2:]) if len(shape) == 4 else shape, dtype=dtype,
                           compressors=comp, fill_value=0)
        return write_chunks(path / name, data, chunks, comp, coder)

    def write_text(self, queries: list[str], token_ids: list[list[int]], arrays: dict[str, np.ndarray]) -> None:
        """Commit the text queries' final-token K/V ([layers, heads, queries, head_dim])."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._check_lease()
        dtype = self.meta.text_store_dtype
        if self.remote:
            self.loc.rmtree(layout.TEXT)
            sums = self._upload(arrays, layout.TEXT, dtype)
            table = pa.table({"query": queries, "token_ids": token_ids})
            table = table.replace_schema_metadata({b"kvpipe.checksums": json.dumps(sums).encode()})
            buf = io.BytesIO()
            pq.write_table(table, buf)
            self.loc.write_atomic(layout.TEXT_RECORD, buf.getvalue())
            return
        stage = self.root / layout.STAGING / f"text-{uuid.uuid4().hex[:8]}"
        sums = self._write_group(stage, arrays, fsync=True, store_dtype=dtype)
        final = self.root / layout.TEXT
        if final.exists():
            shutil.rmtree(final)
        os.rename(stage, final)
        table = pa.table({"query": queries, "token_ids": token_ids})
        table = table.replace_schema_metadata(
            {b"kvpipe.checksums": json.dumps(sums).encode()})
        tmp = self.root / layout.STAGING / "text.parquet"
        pq.write_table(table, tmp)
        os.rename(tmp, self.root / layout.TEXT_RECORD)

    def text_committed(self) -> bool:
        return self.loc.isfile(layout.TEXT_RECORD)


CREATING = ".creating-"  # .STORE.creating-<host>-<pid>-<id>: a store being created beside STORE
LEFTOVER_AGE = 24 * 3600.0  # a creation folder of another host (or of no known process) this old is dead


def remove_creation_leftovers(root: Path) -> list[Path]:
    """Delete ``.STORE.creating-*`` folders beside ``root`` left by runs killed while creating
    the store: those of this host whose process is gone, and any older than a day."""
    from kvpipe.store.lease import pid_alive

    removed = []
    parent, prefix = root.parent, f".{root.name}{CREATING}"
    if not parent.is_dir():
        return removed
    host = socket.gethostname()
    for p in parent.iterdir():
        if not p.name.startswith(prefix) or not p.is_dir():
            continue
        fields = p.name[len(prefix):].rsplit("-", 2)
        try:
            dead = len(fields) == 3 and fields[0] == host and not pid_alive(int(fields[1]))
            old = time.time() - p.stat().st_mtime > LEFTOVER_AGE
        except (ValueError, OSError):
            continue
        if dead or old:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _same_feature_set(existing: FeatureSetMeta, meta: FeatureSetMeta, root) -> FeatureSetMeta:
    if existing.identity() != meta.identity():
        old, new = existing.identity(), meta.identity()
        diff = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
        raise StoreError(f"--out {root} holds another feature set (differs in {', '.join(diff)}); "
                         f"choose a new --out or rerun with the options it was made with")
    return existing
