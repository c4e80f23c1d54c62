"""Read a feature store: ``FeatureStore.open(path).read("values", layer=14, head=2)``.

Why: probes need one (layer, head, kind) across many images at close to raw disk speed. Each
part keeps one (layer, head) as one compressed chunk, so a read touches only those bytes. The
reader lists committed parts from the manifest only, so it never sees a part being written.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import threading
from collections import OrderedDict, deque
from contextlib import nullcontext
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import zarr
from numcodecs import Blosc

from kvpipe.errors import StoreError
from kvpipe.store import layout
from kvpipe.store.blas import one_blas_thread
from kvpipe.store.encoding import DISK_DTYPE, decode, encoding_for, stored_dim, to_stored_basis
from kvpipe.store.fs import Location, open_location
from kvpipe.store.checksum import bytes_crc32c
from kvpipe.store.manifest import ImageRow, check_checksums, read_part_record_bytes
from kvpipe.store.schema import ALL_KINDS, META_ATTR, FeatureSetMeta, Kind


def read_meta(root: Path | str | Location, option: str = "store") -> FeatureSetMeta:
    """The metadata of the store at ``root`` (a path, an fsspec URL or a Location); one-line
    StoreError for anything else."""
    loc = open_location(root, option)
    root = loc.root
    if not loc.isfile("zarr.json"):
        if not loc.exists():
            raise StoreError(f"{option} {root} does not exist; run kvpipe extract first")
        raise StoreError(f"{option} {root} is not a kvpipe store (no zarr.json); choose another path")
    try:
        attrs = json.loads(loc.read_bytes("zarr.json")).get("attributes") or {}
    except StoreError:
        raise
    except Exception as err:
        raise StoreError(f"{option} {root}: unreadable zarr.json ({err})") from None
    if META_ATTR not in attrs:
        raise StoreError(f"{option} {root} is a Zarr group but not a kvpipe feature store; choose another path")
    return FeatureSetMeta.from_dict(attrs[META_ATTR], where=f"{option} {root}")


@dataclass
class Annotation:
    """An image's ground truth as stored: label mask (or None) and JSON metadata."""

    mask: np.ndarray | None
    meta: dict[str, Any]


READ_THREADS = min(16, os.cpu_count() or 1)
# Reads decode in tasks of DECODE_TASK tokens over every read thread, queued as each part's bytes
# arrive, so that decoding overlaps the other parts' reads. A decoder that undoes a rotation (int4
# in the model's basis: a BLAS product per block of tokens) holds BLAS to one thread per task:
# read threads times OpenBLAS's own threads oversubscribe the cores (on 16 cores, int4 reads were
# 3 x slower than on 2; docs/BENCHMARKS.md "Lossy encodings").
DECODE_TASK = 8192
READ_AHEAD = 2  # parts per read thread read ahead of their decoding
_BLOSC = Blosc()  # decoding reads the codec parameters from each chunk's own header


@dataclass
class Features:
    """Token features of several images, concatenated along the token axis."""

    data: np.ndarray  # [total_tokens, dim] float32 (a float32 torch tensor when read to a device)
    offsets: np.ndarray  # [n_images + 1]; image i is data[offsets[i]:offsets[i+1]]
    rows: list[ImageRow]
    basis: str = "model"  # encoding.BASES: "stored" is int4's rotated basis

    def __len__(self) -> int:
        return len(self.rows)

    def image(self, i: int) -> np.ndarray:
        return self.data[self.offsets[i]: self.offsets[i + 1]]

    def grid(self, i: int, segment: str = "base") -> np.ndarray:
        """Image i's tokens of one segment as a [rows, cols, dim] grid (newline tokens dropped)."""
        seg = next((s for s in self.rows[i].segment_list() if s["name"] == segment), None)
        if seg is None:
            raise StoreError(f"image {self.rows[i].image_id} has no {segment!r} token segment")
        width = seg["cols"] + int(seg["newline"])
        tok = self.image(i)[seg["offset"]: seg["offset"] + seg["rows"] * width]
        return tok.reshape(seg["rows"], width, -1)[:, : seg["cols"]]


class FeatureStore:
    """Read-only view of the committed parts of a feature store."""

    def __init__(self, root: Path, meta: FeatureSetMeta, rows: list[ImageRow],
                 checksums: dict[int, dict[str, str]], loc: Location | None = None,
                 data_dirs: dict[int, str] | None = None):
        self.loc = loc or open_location(root)
        self.root = self.loc.root  # a Path, or for object stores the URL (joins with /)
        self.data_dirs = data_dirs or {}  # part -> its directory, when not parts/pNNNNNN
        self.meta = meta
        self.rows = rows  # every committed image row (ok and failed), by dataset index
        self.checksums = checksums
        self._groups: dict[int, zarr.Group] = {}
        self._arrays: dict[tuple[int, str], zarr.Array] = {}
        self._tokens: dict[int, int] | None = None
        self._open_lock = threading.RLock()
        self._masks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.bad_records: dict[int, str] = {}  # part -> why its record was left out (open(strict=False))

    @classmethod
    def open(cls, path: str | Path | Location, strict: bool = True) -> "FeatureStore":
        """Open a store directory or URL (s3://, gs://, memory://, ... through fsspec).

        Every commit record is checked (``manifest.check_record``); a damaged one is a
        StoreError, or with ``strict=False`` (``kvpipe verify``) its part is left out and
        named in ``bad_records``."""
        loc = open_location(path)
        meta = read_meta(loc)
        rows: list[ImageRow] = []
        checksums: dict[int, dict[str, str]] = {}
        data_dirs: dict[int, str] = {}
        names = [n for n in loc.listdir(layout.MANIFEST) if n.startswith("p") and n.endswith(".parquet")]
        records = loc.read_many([f"{layout.MANIFEST}/{n}" for n in names])
        bad: dict[int, str] = {}
        for name in names:
            rel = f"{layout.MANIFEST}/{name}"
            part = layout.part_of_manifest_name(name)
            try:
                commit = read_part_record_bytes(records[rel], f"{loc.root}/{rel}")
                check_rows_fit(commit.rows, meta, f"{loc.root}/{rel}")
            except StoreError as err:
                if strict:
                    raise
                bad[part] = str(err)
                continue
            rows.extend(commit.rows)
            checksums[part] = commit.checksums
            if commit.data_dir:
                data_dirs[part] = commit.data_dir
        rows.sort(key=lambda r: r.index)
        store = cls(loc.root, meta, rows, checksums, loc, data_dirs)
        store.bad_records = bad
        return store

    def data_dir(self, part: int) -> str:
        """The part's directory relative to the store root."""
        return self.data_dirs.get(part, layout.part_rel(part))

    # ---- catalogue ------------------------------------------------------------------
    def images(self, ok_only: bool = True) -> list[ImageRow]:
        return [r for r in self.rows if r.ok or not ok_only]

    @property
    def committed_parts(self) -> list[int]:
        return sorted(self.checksums)

    @property
    def n_parts(self) -> int:
        return -(-self.meta.n_images // self.meta.part_size)

    @property
    def complete(self) -> bool:
        return len(self.checksums) == self.n_parts

    def groups(self) -> dict[str, list[ImageRow]]:
        """Images by group (video / image set), each ordered by frame."""
        out: dict[str, list[ImageRow]] = {}
        for r in self.images():
            out.setdefault(r.group, []).append(r)
        for rows in out.values():
            rows.sort(key=lambda r: r.frame)
        return out

    # ---- arrays ---------------------------------------------------------------------
    def _part(self, part: int) -> zarr.Group:
        if part not in self._groups:
            try:
                self._groups[part] = zarr.open_group(self.loc.zarr_store(self.data_dir(part)), mode="r")
            except Exception as err:
                raise StoreError(f"part {layout.part_name(part)} of {self.root} is unreadable ({err}); "
                                 f"run kvpipe verify {self.root}") from None
        return self._groups[part]

    def _array(self, part: int, kind: str) -> zarr.Array:
        key = (part, kind)
        with self._open_lock:  # zarr metadata reads must not race
            return self._array_locked(part, kind, key)

    def _array_locked(self, part: int, kind: str, key: tuple[int, str]) -> zarr.Array:
        if key not in self._arrays:
            try:
                self._arrays[key] = self._part(part)[kind]
            except KeyError:
                raise StoreError(f"part {layout.part_name(part)} has no {kind!r} array; the store is damaged "
                                 f"(run kvpipe verify {self.root})") from None
        return self._arrays[key]

    def _part_tokens(self, part: int) -> int:
        if self._tokens is None:
            self._tokens = {}
            for r in self.rows:
                self._tokens[r.part] = max(self._tokens.get(r.part, 0), r.token_offset + r.n_tokens)
        return self._tokens.get(part, 0)

    def _chunk_bytes(self, part: int, key: str) -> bytes:
        """One chunk file of a committed part, checked against the CRC32C its commit record
        holds: a damaged or missing file is a StoreError, never wrong numbers or fill zeros.

        Why the check costs little: the CRC32C (hardware instructions, >10 GB/s) runs over the
        compressed bytes already in memory, beside a decompression several times slower."""
        rel = f"{self.data_dir(part)}/{key}"
        expected = self.checksums.get(part, {}).get(key)
        if expected is None:
            raise StoreError(f"part {layout.part_name(part)} of {self.root}: its commit record lists no file {key}; "
                             f"run kvpipe verify {self.root}, then kvpipe extract --repair")
        try:
            payload = self.loc.read_bytes(rel)
        except FileNotFoundError:
            raise StoreError(f"part {layout.part_name(part)} of {self.root}: file {rel} is missing; "
                             f"run kvpipe verify {self.root}, then kvpipe extract --repair") from None
        check_crc(payload, expected, f"part {layout.part_name(part)} of {self.root}: file {rel}", self.root)
        return payload

    def _chunk_file(self, part: int, kind: str, li: int, hi: int) -> np.ndarray:
        """One (layer, head) chunk file (the Zarr v3 default chunk key), checked and decoded
        without opening the part's Zarr array.

        Why: everything needed to decode it is already known (the store's disk dtype and token
        width, the part's token count from the manifest; Blosc reads its own parameters from
        the chunk header), and a cold open of each part's array metadata costs more than
        reading a small chunk. A chunk whose size disagrees with the manifest is damage."""
        n_tokens = self._part_tokens(part)
        dim = stored_dim(self.meta.head_dim, self.meta.store_dtype)
        dtype = np.dtype(DISK_DTYPE[self.meta.store_dtype])
        if n_tokens == 0:
            return np.empty((0, dim), dtype)
        payload = self._chunk_bytes(part, f"{kind}/c/{li}/{hi}/0/0")
        return decode_chunk(payload, dtype, n_tokens, dim, f"{kind} of part {layout.part_name(part)}", self.root,
                            self._header_rows(self.meta.head_dim))

    def _header_rows(self, dim: int) -> int:
        """Rows a chunk holds before its tokens (pca's header; 0 for the other encodings)."""
        return encoding_for(self.meta.store_dtype, self.meta.compressor).header_rows(dim)

    def _raw(self, part: int, kind: str, li: int | None, hi: int | None) -> np.ndarray:
        """One part's on-disk array for (layer, head), or all of post_proj: [tokens, dim]."""
        if kind != Kind.POST_PROJ:
            return self._chunk_file(part, kind, li, hi)
        n_tokens = self._part_tokens(part)
        if n_tokens == 0:
            return np.empty((0, self.meta.hidden_size), np.dtype(DISK_DTYPE[self.meta.store_dtype]))
        dtype = np.dtype(DISK_DTYPE[self.meta.store_dtype])
        dim = stored_dim(self.meta.hidden_size, self.meta.store_dtype)
        return decode_chunk(self._chunk_bytes(part, f"{Kind.POST_PROJ}/c/0/0"), dtype, n_tokens, dim,
                            f"{Kind.POST_PROJ} of part {layout.part_name(part)}", self.root,
                            self._header_rows(self.meta.hidden_size))

    def _chunk(self, part: int, kind: str, li: int | None, hi: int | None) -> np.ndarray:
        return decode(self._raw(part, kind, li, hi), self.meta.store_dtype, self.meta.compressor)

    def read(self, kind: str, layer: int | None = None, head: int | None = None,
             images: Sequence[ImageRow] | None = None, device: str | None = None,
             basis: str = "model") -> Features:
        """One (layer, head, kind) for the given images (default: every ok image).

        Parts are read in parallel threads (decompression releases the GIL) and decoded
        straight into one preallocated float32 array: reading a head costs about its bytes.
        With a torch ``device`` the parts are gathered as stored, sent there and decoded
        there (``store.device_decode``); ``data`` is then a float32 tensor on that device.
        ``basis="stored"`` leaves int4's vectors rotated (``encoding.BASES``): the same inner
        products for a quarter of the host's decoding time.
        """
        # the decoder, resolved once per read (a one-line error for a bad basis)
        encoding = encoding_for(self.meta.store_dtype, self.meta.compressor, basis)
        if kind not in ALL_KINDS:
            raise StoreError(f"kind must be one of {', '.join(ALL_KINDS)}, not {kind!r}")
        kind = Kind(kind).value
        if kind not in self.meta.kinds:
            raise StoreError(f"this store has no {kind!r} (stored kinds: {', '.join(self.meta.kinds)}); "
                             f"re-extract with --kinds including {kind}")
        li = hi = None
        if kind != Kind.POST_PROJ:
            if layer is None or head is None:
                raise StoreError(f"reading {kind} needs a layer and a head")
            li, hi = self.meta.layer_index(layer), self.meta.head_index(head)
        rows = [r for r in (images if images is not None else self.images()) if r.ok]
        lengths = np.array([0] + [r.n_tokens for r in rows])
        offsets = np.cumsum(lengths)
        dim = self.meta.hidden_size if kind == Kind.POST_PROJ else self.meta.head_dim
        # pca's chunks each carry their own header: sent as stored part by part, decoded on the device
        per_chunk = device is not None and encoding.chunk_encode is not None
        held: dict[int, tuple[Any, list[tuple[int, int, int]]]] = {}
        as_stored = device is not None and not per_chunk
        if per_chunk:
            data = None
        elif as_stored:  # the disk dtype and width, decoded on the device below
            data = np.empty((int(offsets[-1]), stored_dim(dim, self.meta.store_dtype)),
                            np.dtype(DISK_DTYPE[self.meta.store_dtype]))
        else:
            data = np.empty((int(offsets[-1]), dim), np.float32)
        by_part: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_part.setdefault(r.part, []).append(i)

        # decoding runs in tasks of DECODE_TASK tokens on every thread, queued as each part's bytes
        # arrive (not one per part: a read of few parts would leave cores idle), beside other reads
        threads = min(READ_THREADS, len(by_part) + (0 if device is not None else int(offsets[-1]) // DECODE_TASK))
        pool = ThreadPoolExecutor(threads) if threads > 1 else None

        def decode_task(raw: np.ndarray, dst: int, n: int) -> None:
            encoding.decode_into(raw, data[dst: dst + n])

        def fill(part: int) -> list[Future]:
            """Read one part and copy or decode its runs; on a pool, queue the decoding and return it."""
            raw = encoding.open_chunk(self._raw(part, kind, li, hi))
            queued: list[Future] = []
            runs = contiguous_runs([(rows[i].token_offset, int(offsets[i]), rows[i].n_tokens) for i in by_part[part]])
            if per_chunk:
                held[part] = (raw, runs)
                return queued
            for (src, dst, n) in runs:
                if as_stored:
                    data[dst: dst + n] = raw[src: src + n]
                elif pool is not None:
                    queued.extend(pool.submit(decode_task, raw[src + a: src + min(n, a + DECODE_TASK)], dst + a,
                                              min(n - a, DECODE_TASK)) for a in range(0, n, DECODE_TASK))
                else:
                    encoding.decode_into(raw[src: src + n], data[dst: dst + n])
            return queued

        if pool is None:
            for part in by_part:
                fill(part)
        else:
            # at most READ_AHEAD parts per thread read ahead of their decoding: the raw bytes held
            # stay a few parts' worth, not the whole read's (which could be half the float32 output
            # again); one per thread left the disk idle while the threads decoded (5% slower)
            blas = (one_blas_thread() if encoding.rotation == "hadamard" or encoding.chunk_encode is not None
                    else nullcontext())
            parts = iter(by_part)
            with blas, pool:
                ahead = deque(pool.submit(fill, part) for part in itertools.islice(parts, READ_AHEAD * threads))
                while ahead:
                    for done in ahead.popleft().result():
                        done.result()
                    ahead.extend(pool.submit(fill, part) for part in itertools.islice(parts, 1))
        if as_stored:
            from kvpipe.store.device_decode import decoder, to_device

            data = decoder(self.meta.store_dtype, self.meta.compressor, basis)(to_device(data, device), dim)
        elif per_chunk:
            from kvpipe.store.device_decode import decode_chunks

            data = decode_chunks([held[p] for p in by_part], int(offsets[-1]), dim, device)
        return Features(data, offsets, rows, basis)

    def annotation(self, row: ImageRow) -> Annotation:
        mask = None
        if row.mask_offset >= 0:
            try:
                flat = self._part_masks(row.part)
            except StoreError:
                raise
            except Exception as err:
                raise StoreError(f"cannot read the mask of {row.image_id} ({err}); run kvpipe verify") from None
            end = row.mask_offset + row.mask_h * row.mask_w
            if end > flat.size:
                raise StoreError(f"the mask of {row.image_id} ends at {end}, past the {flat.size} mask pixels of "
                                 f"part {layout.part_name(row.part)}; run kvpipe verify {self.root}")
            mask = flat[row.mask_offset: end].reshape(row.mask_h, row.mask_w).copy()
        return Annotation(mask, row.meta_dict())

    def _part_masks(self, part: int) -> np.ndarray:
        """A part's masks, decoded once: probes read the masks of a part's images one after the
        other, and the part's masks are one compressed chunk (the last two parts are kept)."""
        with self._open_lock:
            if part not in self._masks:
                payload = self._chunk_bytes(part, "masks/c/0")
                try:
                    self._masks[part] = np.frombuffer(_BLOSC.decode(payload), np.uint8)
                except Exception as err:
                    raise StoreError(f"cannot decode the masks of part {layout.part_name(part)} ({err}); "
                                     f"run kvpipe verify {self.root}") from None
                while len(self._masks) > 2:
                    self._masks.popitem(last=False)
            return self._masks[part]

    def structure(self) -> dict[str, Any]:
        """Dataset-level annotations (pairs, episodes, image sets, class names); {} when none."""
        path = self.root / layout.STRUCTURE
        try:
            return json.loads(self.loc.read_bytes(layout.STRUCTURE))
        except FileNotFoundError:
            return {}
        except ValueError as err:
            raise StoreError(f"{path} is not valid JSON ({err}); re-extract the store") from None

    # ---- text queries -------------------------------------------------------------------
    def _text_record(self) -> tuple[list[str], dict[str, str]] | None:
        """The text queries and their files' CRC32Cs (text.parquet); None when there are none."""
        try:
            data = self.loc.read_bytes(layout.TEXT_RECORD)
        except FileNotFoundError:
            return None
        where = f"{self.root}/{layout.TEXT_RECORD}"
        try:
            table = pq.read_table(io.BytesIO(data))
            queries = table.column("query").to_pylist()
            sums = json.loads((table.schema.metadata or {}).get(b"kvpipe.checksums", b"{}"))
        except Exception as err:
            raise StoreError(f"{where} is unreadable ({str(err).splitlines()[0]}); run kvpipe verify, "
                             f"then kvpipe extract --repair") from None
        check_checksums(sums, where)
        if not all(isinstance(q, str) for q in queries):
            raise StoreError(f"{where}: a query is not a string; run kvpipe extract --repair")
        return queries, sums

    def text_queries(self) -> list[str]:
        record = self._text_record()
        return record[0] if record else []

    def text_kinds(self) -> tuple[str, ...]:
        """The kinds the text queries have features of (text.parquet's files): keys/values of an
        MLM, post_proj of stores made since text queries got one; () without text queries."""
        record = self._text_record()
        names = {key.split("/", 1)[0] for key in record[1]} if record else set()
        return tuple(k for k in ALL_KINDS if k in names)

    def text(self, kind: str, layer: int = -1, head: int = -1, basis: str = "model") -> np.ndarray:
        """Final-token features of the dataset's text queries (checked reads): [n_queries, head_dim]
        for a (layer, head) of keys/values, [n_queries, hidden_size] for post_proj (no layer, head);
        in ``basis``, that of image features read with the same ``basis`` (stored losslessly, so
        "stored" rotates them as the image encoding did)."""
        encoding_for(self.meta.store_dtype, self.meta.compressor, basis)  # a one-line error for a bad basis
        record = self._text_record()
        if record is None:
            raise StoreError(f"store {self.root} has no text queries; its dataset supplies none")
        queries, sums = record
        if kind == Kind.POST_PROJ:
            key, width = f"{Kind.POST_PROJ}/c/0/0", self.meta.hidden_size
        else:
            li, hi = self.meta.layer_index(layer), self.meta.head_index(head)
            key, width = f"{kind}/c/{li}/{hi}/0/0", self.meta.head_dim
        rel = f"{layout.TEXT}/{key}"
        fix = f"run kvpipe verify {self.root}, then kvpipe extract --repair"
        if kind == Kind.POST_PROJ and key not in sums:
            raise StoreError(f"the text queries of {self.root} have no post_proj (the store predates it); "
                             f"re-extract the store to score post_proj against text")
        if key not in sums:
            raise StoreError(f"{self.root}/{layout.TEXT_RECORD} lists no file {key}; {fix}")
        try:
            payload = self.loc.read_bytes(rel)
        except FileNotFoundError:
            raise StoreError(f"text queries of {self.root}: file {rel} is missing; {fix}") from None
        check_crc(payload, sums[key], f"text queries of {self.root}: file {rel}", self.root)
        encoding = self.meta.text_store_dtype
        dim = stored_dim(width, encoding)
        raw = decode_chunk(payload, np.dtype(DISK_DTYPE[encoding]), len(queries), dim, f"{kind} of the text queries",
                           self.root)
        text = decode(raw, encoding, self.meta.compressor, width)
        return to_stored_basis(text, self.meta.store_dtype, self.meta.compressor) if basis == "stored" else text

    def describe(self) -> dict[str, Any]:
        ok = self.images()
        return {
            "path": str(self.root),
            "model": self.meta.model.name,
            "family": self.meta.model.family,
            "dataset": self.meta.dataset.name,
            "images": f"{len(ok)} ok, {len(self.rows) - len(ok)} failed, {self.meta.n_images} planned",
            "parts": f"{len(self.checksums)}/{self.n_parts} committed",
            "layers": _ranges(self.meta.layers),
            "kv heads": _ranges(self.meta.heads),
            "kinds": ", ".join(self.meta.kinds),
            "keys": self.meta.keys_rope,
            "dtype": f"{self.meta.store_dtype} on disk (computed in {self.meta.compute_dtype})",
            **({"encoding": ", ".join(f"{k} {v}" for k, v in self.meta.compressor.items()
                                      if k in ("quant", "scale", "rotation", "rotation_seed", "step"))}
               if self.meta.compressor.get("quant") else {}),
            "views": self.meta.stored_views + (" (base view only: crops not stored)"
                                               if self.meta.stored_views == "base" else ""),
            "head_dim": self.meta.head_dim,
            "template": self.meta.template + (f" + prefix {self.meta.prefix!r}" if self.meta.prefix else ""),
            **({"prefix per image": ", ".join(f"{k} {v}" for k, v in self.meta.prefix_choice.to_dict().items())}
               if self.meta.prefix_choice else {}),
            "tokens before image": len(self.meta.prefix_token_ids),
            "text queries": len(self.meta.text_queries),
            **({"text queries dtype": f"{self.meta.text_dtype} on disk (lossless)"} if self.meta.text_dtype else {}),
            "tokens": int(sum(r.n_tokens for r in ok)),
            "bytes on disk": self.loc.size(),
            "command": self.meta.command,
        }


def check_rows_fit(rows: list[ImageRow], meta: FeatureSetMeta, where: str) -> None:
    """A record's rows against the store metadata: its part exists, its image indices fall in
    that part's range (so no record can make a reader allocate more than the store holds)."""
    from kvpipe.store.manifest import bad_field

    for i, r in enumerate(rows):
        if r.part >= meta.n_parts:
            raise bad_field(where, f"row {i} part", f"is {r.part}, past the store's {meta.n_parts} parts")
        first = r.part * meta.part_size
        if not first <= r.index < min(first + meta.part_size, meta.n_images):
            raise bad_field(where, f"row {i} index", f"is {r.index}, outside its part's images {first}.."
                                                f"{min(first + meta.part_size, meta.n_images) - 1}")


def check_crc(payload: bytes, expected: str, what: str, root: Any) -> None:
    """A StoreError naming the file when ``payload`` is not what was committed."""
    got = bytes_crc32c(payload)
    if got != expected:
        raise StoreError(f"{what} fails its CRC32C check (recorded {expected}, read {got}); "
                         f"run kvpipe verify {root}, then kvpipe extract --repair")


def contiguous_runs(spans: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
    """(source offset, destination offset, tokens) spans merged where both sides continue each
    other: a whole part read for every image decodes in one call, not one per image."""
    runs: list[list[int]] = []
    for src, dst, n in spans:
        if runs and runs[-1][0] + runs[-1][2] == src and runs[-1][1] + runs[-1][2] == dst:
            runs[-1][2] += n
        else:
            runs.append([src, dst, n])
    return [(a, b, c) for a, b, c in runs]


def decode_chunk(payload: bytes, dtype: np.dtype, n_tokens: int, dim: int, what: str, root: Any,
                 header_rows: int = 0) -> np.ndarray:
    """A Blosc chunk -> [header_rows + n_tokens, dim] of ``dtype``; a StoreError when it holds
    another size."""
    try:
        raw = _BLOSC.decode(payload)
    except Exception as err:
        raise StoreError(f"cannot decode {what} ({err}); run kvpipe verify {root}") from None
    rows = n_tokens + header_rows
    if len(raw) != rows * dim * dtype.itemsize:
        raise StoreError(f"{what} holds {len(raw) // max(1, dim * dtype.itemsize) - header_rows} tokens, the "
                         f"manifest says {n_tokens}; run kvpipe verify {root}, then kvpipe extract --repair")
    return np.frombuffer(raw, dtype=dtype).reshape(rows, dim)


def _ranges(values: Iterable[int]) -> str:
    v = list(values)
    if v and v == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}-{v[-1]} ({len(v)})"
    return json.dumps(v)

