"""The per-process part worker: a loaded model over the dataset's records, capturing parts.

Why one worker class: the local executor and each Ray actor run exactly the same code per part
(``PartWorker.extract_part``), so a store made by either executor is the same bit for bit;
executors differ only in where this code runs and who commits. The worker owns its state
(model, records, options, selection, host copier, input uploader) instead of passing it along.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import numpy as np

from kvpipe.errors import DataError
from kvpipe.pipeline.datasets import ImageRecord, create_dataset
from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult, build_meta, resolve
from kvpipe.pipeline.extraction.loading import (LOADER_PROCESSES, LOADERS, LoadedBatch, iterate_batches,
                                                on_device_ahead, pieces_of)
from kvpipe.pipeline.extraction.parts import PartBuilder
from kvpipe.pipeline.extraction.prefix import apply_prefixes
from kvpipe.pipeline.extraction.sequences import with_sequences
from kvpipe.pipeline.extraction.transfer import HostCopier, InputUploader
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.device import resolve_device
from kvpipe.pipeline.models.loading import load_model, resolve_dtype
from kvpipe.store.schema import FeatureSetMeta, ids_fingerprint, structure_fingerprint
from kvpipe.store.writer import StoreWriter

ProgressFn = Callable[[int], None]
FailureFn = Callable[[int, BaseException, int], None]  # (part, error, attempts)


@dataclass
class DatasetView:
    """The dataset as an extraction sees it: ordered records plus what goes into the store."""

    records: list[ImageRecord]
    structure: dict[str, Any]
    desc: dict[str, Any]
    queries: list[str]

    @classmethod
    def load(cls, cfg: ExtractConfig) -> "DatasetView":
        ds = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, limit=cfg.limit,
                            **cfg.dataset_options)
        records = ds.records()
        if not records:
            raise DataError(f"dataset {cfg.dataset} at {cfg.data_root} has no images")
        records = apply_prefixes(records, cfg)  # --prefix-from / --prefix-control: each image's text
        if cfg.multi_image:  # each image with the images before it in its prompt
            records = with_sequences(records)
        structure = ds.structure()
        desc = {**ds.describe(), "tasks": list(ds.tasks), "structure_sha256": structure_fingerprint(structure)}
        if cfg.image_size is not None:  # --image-size: part of the feature set's identity
            desc["image_size"] = list(cfg.image_size)
        if cfg.multi_image:  # --multi-image: so is storing a question's images from one prompt
            desc["multi_image"] = True
        return cls(records, structure, desc, ds.text_queries())

    @property
    def ids_sha256(self) -> str:
        return ids_fingerprint([r.image_id for r in self.records])

    def images_in(self, parts: list[int], part_size: int) -> int:
        return sum(len(self.records[p * part_size:(p + 1) * part_size]) for p in parts)


class PartWorker:
    """A loaded model over the dataset's records: runs a list of parts (``run_parts``, the
    local executor) or one part at a time (``extract_part``, a Ray actor), with the same code."""

    def __init__(self, cfg: ExtractConfig, data: DatasetView | None = None,
                 adapter: ModelAdapter | None = None):
        self.data = data or DatasetView.load(cfg)
        cfg = resolve_runtime(cfg, adapter)  # here, on the machine that runs the model
        if adapter is None:
            adapter = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, init=cfg.init,
                                 revision=cfg.revision, seed=cfg.seed)
        self.cfg, self.sel = resolve(adapter, cfg)  # the model's default kinds; options it cannot honour
        if cfg.fast_kernels:
            adapter.accelerate()
        self.adapter = adapter
        self.store_dtype = self.cfg.store_dtype or self.cfg.dtype
        self._copier: HostCopier | None = None
        self._uploader: InputUploader | None = None  # one per worker: its page-locked buffers serve every part

    @property
    def records(self) -> list[ImageRecord]:
        return self.data.records

    def meta(self) -> FeatureSetMeta:
        d = self.data
        return build_meta(self.adapter, d.records, d.desc, d.queries, self.cfg, self.sel)

    def pieces(self, part: int) -> list[list[tuple[int, ImageRecord]]]:
        """The part's batches: lists of (dataset index, record)."""
        return pieces_of(self.records, part, self.cfg)

    @property
    def copier(self) -> HostCopier:
        if self._copier is None:
            self._copier = HostCopier(self.adapter.device)
        return self._copier

    def _on_device(self, batches: Iterator[LoadedBatch]) -> Iterator[LoadedBatch]:
        if self._uploader is None and self.adapter.device.type == "cuda":
            self._uploader = InputUploader(self.adapter.device, self.adapter.host_inputs)
        return on_device_ahead(self.adapter, batches, self._uploader)

    def run_parts(self, parts: list[int], writer: StoreWriter, result: ExtractResult, progress: ProgressFn | None,
                  on_failure: FailureFn | None = None) -> None:
        """The local executor's loop: capture part after part while writer threads commit up to
        two finished parts (bounded memory); batches are loaded ahead of the GPU across parts."""

        def settle(part: int, fut: Future) -> None:
            try:
                fut.result()
            except BaseException as err:
                if on_failure:
                    on_failure(part, err, 1)
                raise

        cfg = self.cfg
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="kvpipe-write") as pool, \
                ThreadPoolExecutor(max_workers=LOADERS, thread_name_prefix="kvpipe-load") as loader:
            inflight: list[tuple[int, Future]] = []
            processes = cfg.loader_processes
            if processes is None:
                processes = LOADER_PROCESSES if self.adapter.device.type == "cuda" else 0
            stream = self._on_device(iterate_batches(
                self.adapter, [p for part in parts for p in self.pieces(part)], cfg, loader, processes))
            try:
                for part in parts:
                    try:
                        builder = self.extract_part(part, result, progress, stream)
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
                self.close()

    def extract_part(self, part: int, result: ExtractResult, progress: ProgressFn | None,
                     batches: Iterator[LoadedBatch]) -> PartBuilder:
        """Capture one part. Its batches come, in order, from ``batches`` (which may go on to the
        next parts' batches; their inputs are sent to the device ahead here unless already
        sent); each batch's features travel to the host while the next one runs. Call
        ``builder.release()`` once its arrays are written so the next part reuses the host buffers."""
        builder = PartBuilder(part, sequences=self.cfg.multi_image)
        records = self.records
        copier = self.copier
        for _ in range(len(self.pieces(part))):
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
                batch = batch.views(self.sel.views)  # --views base: the base view's tokens only
                device_arrays, counts = self.adapter.gather(batch, self.sel, self.store_dtype)
                builder.reserve([(index, records[index], size, lay, ann)
                                 for (index, size, ann), lay in zip(loaded.items, batch.layouts)], counts)
                builder.add(copier.submit(device_arrays))
                result.timed("capture", t1)
                result.images_ok += len(loaded.items)
            if progress:
                progress(loaded.n)
        # The part's last host copies are still running: ``builder.arrays()`` (the writer) waits
        # for them, so the next part's first batch goes to the device right away.
        builder.rows.sort(key=lambda r: r.index)
        return builder

    def load_part(self, part: int, loader: ThreadPoolExecutor) -> Iterator[LoadedBatch]:
        """The part's batches loaded on ``loader`` threads, inputs sent to the device ahead."""
        return self.stream_for(iterate_batches(self.adapter, self.pieces(part), self.cfg, loader))

    def stream_for(self, batches: Iterator[LoadedBatch]) -> Iterator[LoadedBatch]:
        """``batches`` (loaded elsewhere, in order) with their inputs sent to the device ahead."""
        return self._on_device(batches)

    def close(self) -> None:
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        self._uploader = None  # its page-locked buffers go with it

    def text(self) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        """Token ids and final-token features of the dataset's text queries."""
        feats, ids = self.adapter.text_features(self.data.queries, self.sel, self.cfg.template)
        return ids, {k: v.numpy() for k, v in feats.items()}


def resolve_runtime(cfg: ExtractConfig, adapter: ModelAdapter | None = None) -> ExtractConfig:
    """``--device auto`` / ``--dtype auto`` made concrete where the model runs, so the store records
    what ran (an already loaded ``adapter`` decides the device)."""
    device = str(adapter.device) if adapter is not None else resolve_device(cfg.device)
    return replace(cfg, device=device, dtype=resolve_dtype(cfg.dtype, device))


def _write_and_release(writer: StoreWriter, builder: PartBuilder) -> None:
    writer.write_part(builder.part, builder.rows, builder.arrays())
    builder.release()
