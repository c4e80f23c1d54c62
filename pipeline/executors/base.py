"""What every executor shares: the dataset view, the per-process part worker, the contract.

Why one worker class: the local executor and each Ray actor run exactly the same code per
part (``PartWorker.extract_part`` -> ``_extract_part``), so a store made by either executor is
the same bit for bit; executors differ only in where that code runs and who commits.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np

from kvpipe.errors import DataError
from kvpipe.pipeline.capture import run_text_capture
from kvpipe.pipeline.datasets import ImageRecord, create_dataset
from kvpipe.pipeline.extract import (ExtractConfig, ExtractResult, LoadedBatch, PartBuilder, _extract_part,
                                     _pieces_of, build_meta, iterate_batches, on_device_ahead, resolve, run_parts)
from kvpipe.pipeline.transfer import HostCopier, InputUploader
from kvpipe.pipeline.models import ModelAdapter, load_model
from kvpipe.pipeline.prefix import apply_prefixes
from kvpipe.store.schema import FeatureSetMeta, ids_fingerprint, structure_fingerprint

ProgressFn = Callable[[int], None]


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
        structure = ds.structure()
        desc = {**ds.describe(), "tasks": list(ds.tasks), "structure_sha256": structure_fingerprint(structure)}
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
        self.cfg = cfg
        self.data = data or DatasetView.load(cfg)
        if adapter is None:
            adapter = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, init=cfg.init,
                                 revision=cfg.revision, seed=cfg.seed)
        self.cfg, self.sel = resolve(adapter, cfg)  # the model's default kinds; options it cannot honour
        if cfg.fast_kernels:
            adapter.accelerate()
        self.adapter = adapter
        self._copier: HostCopier | None = None
        self._uploader: InputUploader | None = None  # one per worker: its page-locked buffers serve every part

    def meta(self) -> FeatureSetMeta:
        d = self.data
        return build_meta(self.adapter, d.records, d.desc, d.queries, self.cfg, self.sel)

    def run_parts(self, parts: list[int], writer: Any, result: ExtractResult, progress: ProgressFn | None,
                  on_failure: Callable[[int, BaseException, int], None] | None = None) -> None:
        run_parts(self.adapter, self.data.records, parts, self.cfg, self.sel, writer, result, progress, on_failure)

    def extract_part(self, part: int, result: ExtractResult, progress: ProgressFn | None,
                     loader: ThreadPoolExecutor | None, batches: Iterator[LoadedBatch] | None = None) -> PartBuilder:
        """One part, its batches from ``batches`` (loaded elsewhere, in order) or loaded on
        ``loader`` threads; call ``builder.release()`` once its arrays are written so the next
        part reuses the host buffers."""
        if self._copier is None:
            self._copier = HostCopier(self.adapter.device)
        if self._uploader is None and self.adapter.device.type == "cuda":
            self._uploader = InputUploader(self.adapter.device, self.adapter.host_inputs)
        if batches is None:
            batches = iterate_batches(self.adapter, _pieces_of(self.data.records, part, self.cfg), self.cfg, loader)
        return _extract_part(self.adapter, self.data.records, part, self.cfg, self.sel, result, progress,
                             self._copier, on_device_ahead(self.adapter, batches, self._uploader))

    def close(self) -> None:
        if self._copier is not None:
            self._copier.close()
            self._copier = None
        self._uploader = None  # its page-locked buffers go with it

    def text(self) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        """Token ids and final-token K/V of the dataset's text queries."""
        feats, ids = run_text_capture(self.adapter, self.data.queries, self.sel, self.cfg.template)
        return ids, {k: v.numpy() for k, v in feats.items()}


@dataclass
class PartOutcome:
    """What a worker reports for one part it staged (the driver commits it)."""

    part: int
    staged: Any  # store.writer.StagedPart
    rows: list
    images_ok: int
    images_failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # worker seconds by phase (summed by the driver)


class Session:
    """An executor started for one job: gives the feature-set metadata, runs parts, text."""

    def meta(self) -> FeatureSetMeta:
        raise NotImplementedError

    def run(self, parts: list[int], writer: Any, result: ExtractResult, progress: ProgressFn | None,
            on_failure: Callable[[int, BaseException, int], None]) -> None:
        raise NotImplementedError

    def text(self) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Executor:
    """Registry entry: ``start(cfg, data, adapter)`` -> a Session."""

    name = ""

    def check(self, cfg: ExtractConfig) -> None:
        """Validate executor options before any work (one-line UsageError)."""

    def start(self, cfg: ExtractConfig, data: DatasetView, adapter: ModelAdapter | None) -> Session:
        raise NotImplementedError
