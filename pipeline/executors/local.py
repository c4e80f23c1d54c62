"""The local executor: one process, one model, writes overlapped with compute.

Why threads: the next part's forward passes run while up to two finished parts are being
compressed and committed by writer threads (zstd and file I/O release the GIL), and the next
batches are read and preprocessed ahead of the device (``extract.run_parts``).
"""

from __future__ import annotations

from typing import Any, Callable

from kvpipe.errors import UsageError
from kvpipe.pipeline.executors.base import DatasetView, Executor, PartWorker, ProgressFn, Session
from kvpipe.pipeline.extract import ExtractConfig, ExtractResult
from kvpipe.pipeline.models import ModelAdapter


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
    name = "local"

    def check(self, cfg: ExtractConfig) -> None:
        if cfg.ray_address or cfg.workers not in (None, 1):
            raise UsageError("--ray-address and --workers need --executor ray")

    def start(self, cfg: ExtractConfig, data: DatasetView, adapter: ModelAdapter | None) -> Session:
        return LocalSession(PartWorker(cfg, data, adapter))
