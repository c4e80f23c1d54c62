"""The extraction job: dataset -> model -> feature store, resumable part by part.

Why parts: a part (a fixed slice of the dataset's order) is the unit of work and of commit.
A rerun of the same command opens the same store, skips committed parts and redoes the rest;
Ray workers (or one local process) can each own parts without ever sharing a file.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np
import torch

import kvpipe
from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline import prefix as prefixes
from kvpipe.pipeline.capture import CapturedBatch, Selection
from kvpipe.pipeline.transfer import Copied, HostCopier, InputUploader, upload_ahead
from kvpipe.pipeline.datasets import ImageRecord
from kvpipe.pipeline.models import ModelAdapter
from kvpipe.store.encoding import CODECS, compressor_meta
from kvpipe.store.manifest import FAILED, ImageRow
from kvpipe.store.schema import ALL_KINDS, KEY_ROPE, STORE_DTYPES, FeatureSetMeta, ids_fingerprint
from kvpipe.store.chunks import TokenSegments
from kvpipe.store.writer import StoreWriter


@dataclass
class ExtractConfig:
    """Every option of ``kvpipe extract`` (CLI flags map one to one)."""

    model: str
    dataset: str
    out: str
    data_root: str | None = None
    split: str | None = None
    limit: int | None = None
    init: str = "pretrained"
    revision: str | None = None
    dtype: str = "float32"
    device: str = "cpu"
    prefix: str = ""
    prefix_from: str | None = None  # per-image prefixes: pipeline.prefix.PREFIX_SOURCES (caption | class | domain)
    prefix_control: str = "none"  # none | random | incorrect (pipeline.prefix.PREFIX_CONTROLS)
    template: str = "chat"
    keys: str | None = None  # None: post-rope (an MLM's default; a vision encoder stores no keys)
    layers: str = "all"
    heads: str = "all"
    kinds: str | None = None  # None: the model's own kinds (MLM: keys,values,post_proj; encoder: hidden)
    store_dtype: str | None = None  # default: the compute dtype
    batch_size: int = 4
    part_size: int = 32
    codec: str = "zstd"  # store.encoding.CODECS
    loader_processes: int | None = None  # None: LOADER_PROCESSES on a GPU, threads on a CPU
    fast_kernels: bool = True  # numerically equivalent faster kernels (ModelAdapter.accelerate)
    strict: bool = False
    seed: int = 0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    executor: str = "local"  # pipeline.executors.EXECUTORS: local | ray
    ray_address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS / ray start's)
    workers: int | None = None  # Ray actors; default: one per GPU of the cluster (1 on CPU)
    repair: bool = False  # redo the parts kvpipe verify finds damaged


@dataclass
class ExtractResult:
    store: str
    parts_done: int
    parts_skipped: int
    images_ok: int
    images_failed: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    parts_repaired: list[int] = field(default_factory=list)  # damaged parts redone by --repair
    # where the driver's time went: waiting for loaded batches, capturing, waiting for writes
    timings: dict[str, float] = field(default_factory=lambda: {"load_wait": 0.0, "capture": 0.0,
                                                                "write_wait": 0.0})

    def timed(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def parse_index_spec(spec: str, n: int, option: str) -> tuple[int, ...]:
    """ "all" | "0-3,7" | "-4:" style -> sorted unique indices below n."""
    if spec.strip() == "all":
        return tuple(range(n))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.update(range(int(a), int(b) + 1))
            else:
                i = int(part)
                out.add(i if i >= 0 else n + i)
    except ValueError:
        raise UsageError(f"{option} {spec!r} is not a list like 'all', '0-3,7' or '-1'") from None
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        raise UsageError(f"{option} {spec!r} names {bad}, but the model has {n} (0-{n - 1})")
    return tuple(sorted(out))


def parse_kinds(spec: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().replace("-", "_") for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise UsageError(f"--kinds {spec!r}: use a comma list of {', '.join(ALL_KINDS)}")
    return tuple(k for k in ALL_KINDS if k in kinds)


def validate(cfg: ExtractConfig) -> None:
    """Option combinations that make no sense, caught before any work."""
    if cfg.keys is not None and cfg.keys not in KEY_ROPE:
        raise UsageError(f"--keys must be one of {', '.join(KEY_ROPE)}, not {cfg.keys!r}")
    if cfg.store_dtype is not None and cfg.store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}")
    if cfg.codec not in CODECS:
        raise UsageError(f"--codec must be one of {', '.join(CODECS)}, not {cfg.codec!r}")
    if cfg.batch_size < 1 or cfg.part_size < 1:
        raise UsageError("--batch-size and --part-size must be at least 1")
    if cfg.part_size % cfg.batch_size:
        raise UsageError(f"--part-size {cfg.part_size} must be a multiple of --batch-size {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError("--limit must be at least 1")
    prefixes.check_options(cfg)


def resolve(adapter: ModelAdapter, cfg: ExtractConfig) -> tuple[ExtractConfig, Selection]:
    """``cfg`` with the model's defaults filled in (kinds, keys) and what to capture; a
    one-line UsageError for an option the model cannot honour (e.g. --prefix on an encoder)."""
    kinds = parse_kinds(cfg.kinds) if cfg.kinds is not None else adapter.kinds
    adapter.check_options(kinds, prefix=cfg.prefix, keys=cfg.keys)
    if prefixes.per_image(cfg) and not adapter.encodes_text:
        raise UsageError(f"--prefix-from / --prefix-control need an MLM: {adapter.source.get('name')} is a "
                         f"vision encoder and reads no text")
    cfg = replace(cfg, kinds=",".join(kinds), keys=cfg.keys or KEY_ROPE[0])
    sel = Selection(parse_index_spec(cfg.layers, adapter.n_layers, "--layers"),
                    parse_index_spec(cfg.heads, adapter.n_kv_heads, "--heads"), kinds, cfg.keys)
    return cfg, sel


def build_meta(adapter: ModelAdapter, records: list[ImageRecord], dataset_desc: dict[str, Any],
               queries: list[str], cfg: ExtractConfig, sel: Selection) -> FeatureSetMeta:
    store_dtype = cfg.store_dtype or cfg.dtype
    return FeatureSetMeta(
        model=adapter.source, dataset=dataset_desc, layers=sel.layers, heads=sel.heads,
        kinds=sel.kinds, n_layers=adapter.n_layers,
        n_kv_heads=adapter.n_kv_heads, head_dim=adapter.head_dim, hidden_size=adapter.hidden_size,
        compute_dtype=cfg.dtype, store_dtype=store_dtype,
        **adapter.input_meta(prefixes.shared_prefix(cfg), cfg.template, sel.keys_rope),
        prefix_choice=prefixes.prefix_choice(cfg),
        part_size=cfg.part_size, n_images=len(records),
        image_ids_sha256=ids_fingerprint([r.image_id for r in records]),
        text_queries=tuple(queries) if adapter.encodes_text else (),
        compressor=compressor_meta(store_dtype, codec=cfg.codec),
        command=cfg.command or " ".join(shlex.quote(a) for a in sys.argv),
        kvpipe_version=kvpipe.__version__)


class PartBuilder:
    """Accumulates one part's images: rows, masks, and its batches' features as they reach the
    host (one piece per batch and kind, in token order; ``transfer.Copied``).

    The pieces are not joined here: the writer reads them in place (``TokenSegments``) once
    ``arrays`` has waited for their copies, then ``release`` hands the host buffers back.
    """

    def __init__(self, part: int):
        self.part = part
        self.rows: list[ImageRow] = []
        self.copies: list[Copied] = []
        self.masks: list[np.ndarray] = []
        self.n_tokens = 0
        self.n_mask = 0

    def add_failed(self, index: int, rec: ImageRecord, error: str) -> None:
        self.rows.append(ImageRow(index=index, image_id=rec.image_id, part=self.part, status=FAILED,
                                  error=error, token_offset=self.n_tokens, source=rec.source,
                                  group=rec.group, frame=rec.frame))

    def reserve(self, items: list[tuple[int, ImageRecord, tuple[int, int], Any, Any]],
                counts: list[int]) -> tuple[int, int]:
        """Rows for a batch (index, record, image size, token layout, annotation per image);
        returns the batch's token range in the part."""
        start = self.n_tokens
        for (index, rec, size, lay, annotation), n in zip(items, counts):
            row = ImageRow(index=index, image_id=rec.image_id, part=self.part, token_offset=self.n_tokens,
                           n_tokens=n, grid_h=lay.base.rows, grid_w=lay.base.cols,
                           segments=lay.segments_json(), image_h=size[1], image_w=size[0], source=rec.source,
                           group=rec.group, frame=rec.frame,
                           meta=json.dumps(annotation.meta if rec.prefix is None
                                           else {**annotation.meta, "prefix": rec.prefix}))
            mask = annotation.mask
            if mask is not None:
                row.mask_offset, row.mask_h, row.mask_w = self.n_mask, int(mask.shape[0]), int(mask.shape[1])
                self.masks.append(np.ascontiguousarray(mask, dtype=np.uint8).ravel())
                self.n_mask += mask.size
            self.rows.append(row)
            self.n_tokens += n
        return start, self.n_tokens

    def add(self, copied: Copied) -> None:
        """The features of the batch reserved last ([..., tokens, dim] per kind)."""
        self.copies.append(copied)

    def add_batch(self, items: list[tuple[int, ImageRecord, tuple[int, int], Any, Any]],
                  captured: CapturedBatch) -> None:
        """A batch already on the host (synchronous path)."""
        self.reserve(items, captured.counts)
        self.add(Copied(captured.arrays))

    def arrays(self) -> dict[str, Any]:
        """kind -> ``TokenSegments`` of the batches' pieces (waits for their copies); "masks"."""
        for c in self.copies:
            c.wait()
        out: dict[str, Any] = {}
        for kind in (self.copies[0].host if self.copies else {}):
            pieces = [c.host[kind] for c in self.copies]
            out[kind] = TokenSegments(pieces, axis=pieces[0].ndim - 2)
        if self.masks:
            out["masks"] = np.concatenate(self.masks)
        return out

    def release(self) -> None:
        """Hand the host buffers back once the part is written."""
        for c in self.copies:
            c.release()
        self.copies = []


# Batches are decoded and preprocessed (PIL, numpy, the HF image processor) by a few threads
# ahead of the GPU; one thread cannot keep up with a 7B model's prefill on an H100.
LOADERS = max(2, min(8, (os.cpu_count() or 2) // 2))
# On a GPU host, loading runs in this many DataLoader processes instead (see iterate_batches).
LOADER_PROCESSES = max(0, min(8, (os.cpu_count() or 1) // 2))

ProgressFn = Callable[[int], None]


def extract(cfg: ExtractConfig, progress: ProgressFn | None = None,
            on_start: Callable[[int, int], None] | None = None, adapter: ModelAdapter | None = None) -> ExtractResult:
    """Run (or resume) an extraction. ``progress(n)`` is told of every n images done.

    ``adapter``: an already loaded model (benchmarks reuse one across runs); it must be the
    model ``cfg.model`` names.
    """
    validate(cfg)
    from kvpipe.pipeline.executors import run_job  # executors import this module

    return run_job(cfg, progress, on_start, adapter)


def run_parts(adapter: ModelAdapter, records: list[ImageRecord], pending: list[int], cfg: ExtractConfig,
              sel: Selection, writer: StoreWriter, result: ExtractResult, progress: ProgressFn | None,
              on_failure: Callable[[int, BaseException, int], None] | None = None) -> None:
    """The local executor's loop: capture part after part while writer threads commit up to
    two finished parts (bounded memory); batches are loaded ahead of the GPU across parts.
    ``on_failure(part, error, attempts)`` hears of a part that could not be captured or written."""

    def settle(part: int, fut: Future) -> None:
        try:
            fut.result()
        except BaseException as err:
            if on_failure:
                on_failure(part, err, 1)
            raise

    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvpipe-write") as pool, \
            ThreadPoolExecutor(max_workers=LOADERS, thread_name_prefix="kvpipe-load") as loader:
        inflight: list[tuple[int, Future]] = []
        copier = HostCopier(adapter.device)
        processes = cfg.loader_processes
        if processes is None:
            processes = LOADER_PROCESSES if adapter.device.type == "cuda" else 0
        stream = on_device_ahead(adapter, iterate_batches(
            adapter, [p for part in pending for p in _pieces_of(records, part, cfg)], cfg, loader, processes))
        try:
            for part in pending:
                try:
                    builder = _extract_part(adapter, records, part, cfg, sel, result, progress, copier, stream)
                except BaseException as err:
                    if on_failure:
                        on_failure(part, err, 1)
                    raise  # parts already handed to the writer threads still commit
                t1 = time.perf_counter()
                while len(inflight) >= 2:  # bound memory: at most two parts waiting for the disk
                    settle(*inflight.pop(0))
                result.timed("write_wait", t1)
                inflight.append((part, pool.submit(_write_and_release, writer, builder)))
                result.parts_done += 1
            t1 = time.perf_counter()
            for part, f in inflight:
                settle(part, f)
            result.timed("write_wait", t1)
        finally:
            copier.close()


def _write_and_release(writer: StoreWriter, builder: PartBuilder) -> None:
    writer.write_part(builder.part, builder.rows, builder.arrays())
    builder.release()


@dataclass
class LoadedBatch:
    """A batch read from the dataset and run through the processor, ready for the GPU.

    Holds dataset indices, not records, so it can come back from a loader process."""

    items: list[tuple[int, tuple[int, int], Any]]  # (index, image size, annotation)
    failed: list[tuple[int, str]]  # (index, error)
    batch: Any  # models.base.Batch, or None when every image failed
    n: int
    fatal: str = ""  # an unreadable image under --strict
    uploaded: Any = None  # transfer.Uploaded: the batch's inputs already sent to the device


def on_device_ahead(adapter: ModelAdapter, batches: Iterator[LoadedBatch],
                    uploader: InputUploader | None = None) -> Iterator[LoadedBatch]:
    """``batches`` with their inputs sent to a CUDA device ahead of their forward pass by
    ``uploader`` (a new ``transfer.InputUploader`` if None); on other devices, ``batches`` as
    they are."""
    if adapter.device.type != "cuda":
        return batches
    uploader = uploader or InputUploader(adapter.device, adapter.host_inputs)

    def upload(loaded: LoadedBatch) -> LoadedBatch:
        if loaded.batch is None:
            return loaded
        return replace(loaded, uploaded=uploader.upload(loaded.batch.inputs))
    return upload_ahead(batches, upload)


def _load_batch(adapter: ModelAdapter, chunk: list[tuple[int, ImageRecord]], cfg: ExtractConfig) -> LoadedBatch:
    items, failed = [], []
    images, texts = [], []
    for index, rec in chunk:
        try:
            img, ann = rec.image(), rec.annotation()
        except DataError as err:
            if cfg.strict:
                return LoadedBatch([], [], None, len(chunk), fatal=f"{err} (--strict)")
            failed.append((index, str(err)))
            continue
        items.append((index, img.size, ann))
        images.append(img)
        texts.append(cfg.prefix if rec.prefix is None else rec.prefix)
    batch = adapter.preprocess(images, texts, cfg.template) if images else None
    return LoadedBatch(items, failed, batch, len(chunk))


class _Pieces(torch.utils.data.Dataset):
    """Batches of (index, record) as a torch Dataset, so DataLoader processes can load them."""

    def __init__(self, adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig):
        self.adapter, self.pieces, self.cfg = adapter, pieces, cfg

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> LoadedBatch:
        return _load_batch(self.adapter, self.pieces[i], self.cfg)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # loader processes share the cores; no nested thread pools


def iterate_batches(adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig,
                    loader: ThreadPoolExecutor | None, processes: int = 0) -> Iterator[LoadedBatch]:
    """Loaded batches in order, prepared ahead of the GPU.

    With ``processes`` > 0, a torch DataLoader with that many forked worker processes (image
    decoding and the HF image processor are Python-heavy: threads contend for the GIL and
    cannot keep a 7B model's prefill busy); otherwise the ``loader`` thread pool.
    """
    if processes > 0:
        dl = torch.utils.data.DataLoader(
            _Pieces(adapter, pieces, cfg), batch_size=None, shuffle=False, num_workers=processes,
            collate_fn=_identity, worker_init_fn=_one_thread, prefetch_factor=2,
            multiprocessing_context="fork")
        return iter(dl)  # the workers fork here, from the calling thread
    assert loader is not None
    return _on_threads(adapter, pieces, cfg, loader)


def _on_threads(adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig,
                loader: ThreadPoolExecutor) -> Iterator[LoadedBatch]:
    ahead = [loader.submit(_load_batch, adapter, p, cfg) for p in pieces[:LOADERS + 1]]
    for i in range(len(pieces)):
        loaded = ahead.pop(0).result()
        if i + LOADERS + 1 < len(pieces):
            ahead.append(loader.submit(_load_batch, adapter, pieces[i + LOADERS + 1], cfg))
        yield loaded


def _identity(x: Any) -> Any:
    return x


def _pieces_of(records: list[ImageRecord], part: int, cfg: ExtractConfig) -> list[list[tuple[int, ImageRecord]]]:
    start = part * cfg.part_size
    chunk = list(enumerate(records[start:start + cfg.part_size], start))
    return [chunk[b:b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]


def _extract_part(adapter: ModelAdapter, records: list[ImageRecord], part: int, cfg: ExtractConfig,
                  sel: Selection, result: ExtractResult, progress: ProgressFn | None, copier: HostCopier,
                  batches: Iterator[LoadedBatch]) -> PartBuilder:
    """Capture one part. Its batches come, in order, from ``batches`` (which may go on to the
    next parts' batches); each batch's features travel to the host (``copier``) while the
    next one runs."""
    builder = PartBuilder(part)
    pieces = _pieces_of(records, part, cfg)
    store_dtype = cfg.store_dtype or cfg.dtype
    for _ in range(len(pieces)):
        t1 = time.perf_counter()
        loaded = next(batches)
        result.timed("load_wait", t1)
        if loaded.fatal:
            raise DataError(loaded.fatal)
        for index, err in loaded.failed:
            rec = records[index]
            builder.add_failed(index, rec, err)
            result.images_failed += 1
            result.failures.append((rec.image_id, err))
        if loaded.batch is not None:
            t1 = time.perf_counter()
            batch = loaded.batch if loaded.uploaded is None else replace(loaded.batch, inputs=loaded.uploaded.use())
            device_arrays, counts = adapter.gather(batch, sel, store_dtype)
            builder.reserve([(index, records[index], size, lay, ann)
                             for (index, size, ann), lay in zip(loaded.items, loaded.batch.layouts)], counts)
            builder.add(copier.submit(device_arrays))
            result.timed("capture", t1)
            result.images_ok += len(loaded.items)
        if progress:
            progress(loaded.n)
    # The part's last host copies are still running: ``builder.arrays()`` (the writer) waits
    # for them, so the next part's first batch goes to the device right away.
    builder.rows.sort(key=lambda r: r.index)
    return builder
