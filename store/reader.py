"""Read a feature store: ``FeatureStore.open(path).read("values", layer=14, head=2)``.

Why: probes need one (layer, head, kind) across many images at close to raw disk speed. Each
part keeps one (layer, head) as one compressed chunk, so a read touches only those bytes. The
reader lists committed parts from the manifest only, so it never sees a part being written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow.parquet as pq
import zarr

from kvpipe.errors import StoreError
from kvpipe.store import layout
from kvpipe.store.encoding import decode
from kvpipe.store.manifest import ImageRow, read_part_record
from kvpipe.store.schema import ALL_KINDS, META_ATTR, POST_PROJ, FeatureSetMeta


def read_meta(root: Path, option: str = "store") -> FeatureSetMeta:
    """The metadata of the store at ``root``; one-line StoreError for anything else."""
    if not (root / "zarr.json").is_file():
        if not root.exists():
            raise StoreError(f"{option} {root} does not exist; run kvpipe extract first")
        raise StoreError(f"{option} {root} is not a kvpipe store (no zarr.json); choose another path")
    try:
        group = zarr.open_group(zarr.storage.LocalStore(root, read_only=True), mode="r")
        attrs = dict(group.attrs)
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


@dataclass
class Features:
    """Token features of several images, concatenated along the token axis."""

    data: np.ndarray  # [total_tokens, dim] float32
    offsets: np.ndarray  # [n_images + 1]; image i is data[offsets[i]:offsets[i+1]]
    rows: list[ImageRow]

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
                 checksums: dict[int, dict[str, str]]):
        self.root = root
        self.meta = meta
        self.rows = rows  # every committed image row (ok and failed), by dataset index
        self.checksums = checksums
        self._groups: dict[int, zarr.Group] = {}

    @classmethod
    def open(cls, path: str | Path) -> "FeatureStore":
        root = Path(path)
        meta = read_meta(root)
        rows: list[ImageRow] = []
        checksums: dict[int, dict[str, str]] = {}
        for mf in sorted((root / layout.MANIFEST).glob("p*.parquet")):
            part_rows, sums = read_part_record(mf)
            rows.extend(part_rows)
            checksums[layout.part_of_manifest(mf)] = sums
        rows.sort(key=lambda r: r.index)
        return cls(root, meta, rows, checksums)

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
                self._groups[part] = zarr.open_group(
                    zarr.storage.LocalStore(layout.part_dir(self.root, part), read_only=True), mode="r")
            except Exception as err:
                raise StoreError(f"part {layout.part_name(part)} of {self.root} is unreadable ({err}); "
                                 f"run kvpipe verify {self.root}") from None
        return self._groups[part]

    def _chunk(self, part: int, kind: str, li: int | None, hi: int | None) -> np.ndarray:
        try:
            arr = self._part(part)[kind]
            raw = arr[...] if kind == POST_PROJ else arr[li, hi]
        except KeyError:
            raise StoreError(f"part {layout.part_name(part)} has no {kind!r} array; the store is damaged "
                             f"(run kvpipe verify {self.root})") from None
        except Exception as err:
            raise StoreError(f"cannot decode {kind} of part {layout.part_name(part)} ({err}); "
                             f"run kvpipe verify {self.root}") from None
        return decode(np.asarray(raw), self.meta.store_dtype)

    def read(self, kind: str, layer: int | None = None, head: int | None = None,
             images: Sequence[ImageRow] | None = None) -> Features:
        """One (layer, head, kind) for the given images (default: every ok image)."""
        if kind not in ALL_KINDS:
            raise StoreError(f"kind must be one of {', '.join(ALL_KINDS)}, not {kind!r}")
        if kind not in self.meta.kinds:
            raise StoreError(f"this store has no {kind!r} (stored kinds: {', '.join(self.meta.kinds)}); "
                             f"re-extract with --kinds including {kind}")
        li = hi = None
        if kind != POST_PROJ:
            if layer is None or head is None:
                raise StoreError(f"reading {kind} needs a layer and a head")
            li, hi = self.meta.layer_index(layer), self.meta.head_index(head)
        rows = [r for r in (images if images is not None else self.images()) if r.ok]
        by_part: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_part.setdefault(r.part, []).append(i)
        pieces: list[np.ndarray | None] = [None] * len(rows)
        for part, idx in by_part.items():
            chunk = self._chunk(part, kind, li, hi)
            for i in idx:
                r = rows[i]
                pieces[i] = chunk[r.token_offset: r.token_offset + r.n_tokens]
        lengths = np.array([0] + [r.n_tokens for r in rows])
        offsets = np.cumsum(lengths)
        dim = pieces[0].shape[1] if pieces else (self.meta.hidden_size if kind == POST_PROJ else self.meta.head_dim)
        data = np.concatenate(pieces, axis=0) if pieces else np.zeros((0, dim), np.float32)
        return Features(data, offsets, rows)

    def annotation(self, row: ImageRow) -> Annotation:
        mask = None
        if row.mask_offset >= 0:
            try:
                flat = self._part(row.part)["masks"]
                mask = np.asarray(flat[row.mask_offset: row.mask_offset + row.mask_h * row.mask_w])
            except Exception as err:
                raise StoreError(f"cannot read the mask of {row.image_id} ({err}); run kvpipe verify") from None
            mask = mask.reshape(row.mask_h, row.mask_w)
        return Annotation(mask, row.meta_dict())

    def structure(self) -> dict[str, Any]:
        """Dataset-level annotations (pairs, episodes, image sets, class names); {} when none."""
        path = self.root / layout.STRUCTURE
        if not path.exists():
            return {}
        try:
            return json.loads(path.read_text())
        except ValueError as err:
            raise StoreError(f"{path} is not valid JSON ({err}); re-extract the store") from None

    # ---- text queries -------------------------------------------------------------------
    def text_queries(self) -> list[str]:
        rec = self.root / layout.TEXT_RECORD
        if not rec.exists():
            return []
        return pq.read_table(rec).column("query").to_pylist()

    def text(self, kind: str, layer: int, head: int) -> np.ndarray:
        """Final-token features [n_queries, head_dim] of the dataset's text queries."""
        if not (self.root / layout.TEXT_RECORD).exists():
            raise StoreError(f"store {self.root} has no text queries; its dataset supplies none")
        group = zarr.open_group(zarr.storage.LocalStore(self.root / layout.TEXT, read_only=True), mode="r")
        raw = group[kind][self.meta.layer_index(layer), self.meta.head_index(head)]
        return decode(np.asarray(raw), self.meta.store_dtype)

    def describe(self) -> dict[str, Any]:
        ok = self.images()
        return {
            "path": str(self.root),
            "model": self.meta.model.get("name"),
            "family": self.meta.model.get("family"),
            "dataset": self.meta.dataset.get("name"),
            "images": f"{len(ok)} ok, {len(self.rows) - len(ok)} failed, {self.meta.n_images} planned",
            "parts": f"{len(self.checksums)}/{self.n_parts} committed",
            "layers": _ranges(self.meta.layers),
            "kv heads": _ranges(self.meta.heads),
            "kinds": ", ".join(self.meta.kinds),
            "keys": self.meta.keys_rope,
            "dtype": f"{self.meta.store_dtype} on disk (computed in {self.meta.compute_dtype})",
            "head_dim": self.meta.head_dim,
            "template": self.meta.template + (f" + prefix {self.meta.prefix!r}" if self.meta.prefix else ""),
            "tokens before image": len(self.meta.prefix_token_ids),
            "text queries": len(self.meta.text_queries),
            "tokens": int(sum(r.n_tokens for r in ok)),
            "bytes on disk": _disk_bytes(self.root),
            "command": self.meta.command,
        }


def _ranges(values: Iterable[int]) -> str:
    v = list(values)
    if v and v == list(range(v[0], v[-1] + 1)):
        return f"{v[0]}-{v[-1]} ({len(v)})"
    return json.dumps(v)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
