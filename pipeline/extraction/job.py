"""The extraction job: dataset -> model -> feature store, resumable part by part.

Why parts: a part (a fixed slice of the dataset's order) is the unit of work and of commit.
A rerun of the same command opens the same store, skips committed parts and redoes the rest;
Ray workers (or one local process) can each own parts without ever sharing a file. ``run_job``
is what every executor shares: open or resume the store, optionally repair it, run the pending
parts, commit the text queries, keep the failure log.
"""

from __future__ import annotations

import time
from typing import Callable

from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult, validate, with_defaults
from kvpipe.pipeline.extraction.executor import EXECUTORS
from kvpipe.pipeline.extraction.worker import DatasetView, ProgressFn
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.store.fs import open_location
from kvpipe.store.repair import drop_damaged_parts
from kvpipe.store.status import FailureLog, require_store
from kvpipe.store.writer import StoreWriter


def extract(cfg: ExtractConfig, progress: ProgressFn | None = None,
            on_start: Callable[[int, int], None] | None = None, adapter: ModelAdapter | None = None) -> ExtractResult:
    """Run (or resume) an extraction. ``progress(n)`` is told of every n images done;
    ``on_start(images to do, images in all)`` once the store is open.

    ``adapter``: an already loaded model (benchmarks reuse one across runs); it must be the
    model ``cfg.model`` names.
    """
    validate(cfg)
    return run_job(with_defaults(cfg), progress, on_start, adapter)


def run_job(cfg: ExtractConfig, progress: ProgressFn | None = None,
            on_start: Callable[[int, int], None] | None = None, adapter: ModelAdapter | None = None) -> ExtractResult:
    """The body of ``extract()``: everything but option validation."""
    t0 = time.perf_counter()
    executor = EXECUTORS.get(cfg.executor)()
    executor.check(cfg)
    loc = require_store(cfg.out, "--out") if cfg.repair else open_location(cfg.out, "--out")
    loc.check()  # unreachable storage, missing bucket or credentials: fail before loading a model
    data = DatasetView.load(cfg)
    session = executor.start(cfg, data, adapter)
    writer = None
    try:
        meta = session.meta()
        writer = StoreWriter.create_or_resume(loc, meta, data.structure)
        repaired = drop_damaged_parts(writer.location, data.structure) if cfg.repair else {}
        pending = writer.pending_parts()
        if on_start:
            on_start(data.images_in(pending, cfg.part_size), len(data.records))
        result = ExtractResult(cfg.out, 0, writer.n_parts() - len(pending), 0, 0, 0.0)
        result.parts_repaired = sorted(repaired)
        log = FailureLog(writer.location)
        try:
            session.run(pending, writer, result, progress, log.record)
        finally:
            log.settle(writer.committed_parts())
        t1 = time.perf_counter()
        if meta.text_queries and not writer.text_committed():  # none for a vision encoder
            writer.write_text(data.queries, *session.text())
        result.timed("text", t1)
    finally:
        session.close()  # workers stop before their leftovers are deleted
        if writer is not None:
            try:
                writer.clean_staging()
            finally:
                writer.close()  # the writer lease
    result.seconds = time.perf_counter() - t0
    result.timings["other"] = result.seconds - sum(result.timings.values())
    return result
