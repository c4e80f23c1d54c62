"""Re-encode a lossless store into a lossy encoding without running the model again.

Why: a lossless store in the compute dtype holds exactly the numbers the device would send, so
coding its chunks gives the lossy store that extraction writes, byte for byte (pca and int4
code on the host what the device would send; tested against extraction): one extraction, then
as many encodings of it as a size or fidelity comparison needs. Parts, manifests, masks and
the dataset's structure carry over; the text queries stay as they are (lossless, as a lossy
store keeps them). A killed run resumes: parts already committed are kept.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from kvpipe.errors import UsageError
from kvpipe.store import layout
from kvpipe.store.encoding import check_store_dtype, decode, lossy_meta
from kvpipe.store.reader import FeatureStore
from kvpipe.store.schema import Encoding, FeatureSetMeta, Kind
from kvpipe.store.writer import StoreWriter

LOSSY_KEYS = ("quant", "scale", "rotation", "rotation_seed", "step")


def recoded_meta(meta: FeatureSetMeta, store_dtype: str, pca_step: float | None = None) -> FeatureSetMeta:
    """``meta`` with the new encoding: its codec kept, the lossy parameters replaced; text
    queries recorded in the compute dtype they are stored in."""
    codec = {k: v for k, v in meta.compressor.to_dict().items() if k not in LOSSY_KEYS}
    return dataclasses.replace(
        meta, store_dtype=store_dtype, compressor=Encoding.from_dict({**codec, **lossy_meta(store_dtype, pca_step)}),
        text_dtype=meta.compute_dtype if meta.text_queries else "",
        command=f"{meta.command} | recoded to {store_dtype}".strip(" |"))


def _part_arrays(src: FeatureStore, part: int) -> dict[str, np.ndarray]:
    """One part's arrays as float32 (decoded losslessly, so the values the device sent)."""
    arrays: dict[str, np.ndarray] = {}
    meta = src.meta

    def raw(kind: str, li: int | None, hi: int | None) -> np.ndarray:
        return decode(src._raw(part, kind, li, hi), meta.store_dtype, meta.compressor)

    for kind in meta.kinds:
        if kind == Kind.POST_PROJ:
            arrays[kind] = raw(kind, None, None)
        else:
            arrays[kind] = np.stack([np.stack([raw(kind, li, hi) for hi in range(len(meta.heads))])
                                     for li in range(len(meta.layers))])
    rows = [r for r in src.rows if r.part == part]
    if any(r.mask_offset >= 0 for r in rows):
        arrays["masks"] = src._part_masks(part)
    return arrays


def recodable(source: str | Path, out: str | Path, store_dtype: str,
              pca_step: float | None = None) -> FeatureStore:
    """The store at ``source``, opened, when it can be recoded to ``store_dtype`` at ``out``;
    otherwise a one-line error saying why (before any work)."""
    check_store_dtype(store_dtype, pca_step)
    src = FeatureStore.open(source)
    meta = src.meta
    if meta.store_dtype != meta.compute_dtype:
        raise UsageError(f"{source} is stored as {meta.store_dtype}, not in its compute dtype "
                         f"{meta.compute_dtype}: only a lossless store in the compute dtype holds what the "
                         f"device sends; re-extract with --store-dtype {store_dtype}")
    if not src.complete:
        raise UsageError(f"{source} is not complete; finish its extraction (kvpipe extract) first")
    if not isinstance(src.root, Path) or "://" in str(out):
        raise UsageError("recoding reads and writes stores on a local filesystem; copy the store there first")
    return src


def recode(source: str | Path | FeatureStore, out: str | Path, store_dtype: str, pca_step: float | None = None,
           progress=lambda part, total: None) -> Path:
    """Write ``out``: the store at ``source`` (lossless, in its compute dtype, complete) in
    ``store_dtype``; ``progress(parts done, parts)`` after each part. ``source`` may be the store
    ``recodable`` returned (checked and opened once)."""
    src = source if isinstance(source, FeatureStore) else recodable(source, out, store_dtype, pca_step)
    meta = src.meta
    dst = Path(out)
    writer = StoreWriter.create_or_resume(dst, recoded_meta(meta, store_dtype, pca_step), src.structure())
    try:
        pending = set(writer.pending_parts())
        parts = src.committed_parts
        for i, part in enumerate(parts):
            if part in pending:
                writer.write_part(part, [r for r in src.rows if r.part == part], _part_arrays(src, part))
            progress(i + 1, len(parts))
        if meta.text_queries and not writer.text_committed():
            # lossless in the compute dtype in both stores: the same files, then the record (the commit)
            shutil.rmtree(dst / layout.TEXT, ignore_errors=True)
            shutil.copytree(src.root / layout.TEXT, dst / layout.STAGING / "text-copy")
            (dst / layout.STAGING / "text-copy").rename(dst / layout.TEXT)
            shutil.copyfile(src.root / layout.TEXT_RECORD, dst / layout.STAGING / "text.parquet")
            (dst / layout.STAGING / "text.parquet").rename(dst / layout.TEXT_RECORD)
    finally:
        writer.close()
    return dst
