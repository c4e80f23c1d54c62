"""The local executor: one process, one model, writes overlapped with compute.

Why threads: the next part's forward passes run while up to two finished parts are being
compressed and committed by writer threads (zstd and file I/O release the GIL), and the next
batches are read and preprocessed ahead of the device (``PartWorker.run_parts``).
"""

from __future__ import annotations

from typing import Any, Callable

from kvpipe.errors import UsageError
from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult
from kvpipe.pipeline.extraction.executor import Executor, Session
from kvpipe.pipeline.extraction.worker import DatasetView, PartWorker, ProgressFn
from kvpipe.pipeline.models.base import ModelAdapter


class LocalSession(Session):
    def __init__(self, worker: PartWorker):
        self.worker = worker

    def meta(self):
        return self.worker.meta()

    def run(self, parts: list[int], writer: Any, result: ExtractResult, progress: ProgressFn | None,
            on_failure: Callable[[int, BaseException, int], None]) -> None:
        self.worker.run_parts(parts, writer, result, progress, on_failure)

    def text(self):
        return self.worker.text()


class LocalExecutor(Executor):
    def check(self, cfg: ExtractConfig) -> None:
        if cfg.ray_address or cfg.workers not in (None, 1):
            raise UsageError("--ray-address and --workers need --executor ray")

    def start(self, cfg: ExtractConfig, data: DatasetView, adapter: ModelAdapter | None) -> Session:
        return LocalSession(PartWorker(cfg, data, adapter))
