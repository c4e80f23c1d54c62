"""Executors run an extraction's parts: ``local`` (this process) or ``ray`` (a Ray cluster).

Why a registry: ``--executor NAME`` looks the executor up like models and datasets; adding
one (e.g. a batch scheduler) is one file and one ``EXECUTORS.add``. ``run_job`` is the part
every executor shares: open or resume the store, optionally repair it, run the pending parts,
commit the text queries, keep the failure log. ``extract()`` calls it.
"""

from __future__ import annotations

import time
from typing import Callable

from kvpipe.pipeline.executors.base import DatasetView, Executor, PartOutcome, PartWorker, Session
from kvpipe.pipeline.executors.local import LocalExecutor
from kvpipe.pipeline.executors.ray_executor import RayExecutor
from kvpipe.registry import Registry

EXECUTORS: Registry[type[Executor]] = Registry("executor", "--executor")
EXECUTORS.add("local", LocalExecutor)
EXECUTORS.add("ray", RayExecutor)


def run_job(cfg, progress: Callable[[int], None] | None = None,
            on_start: Callable[[int, int], None] | None = None, adapter=None):
    """The body of ``extract()``: everything but option validation."""
    from kvpipe.pipeline.extract import ExtractResult
    from kvpipe.store.fs import open_location
    from kvpipe.store.repair import drop_damaged_parts
    from kvpipe.store.status import FailureLog, require_store
    from kvpipe.store.writer import StoreWriter

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


__all__ = ["EXECUTORS", "DatasetView", "Executor", "PartOutcome", "PartWorker", "Session", "run_job"]
