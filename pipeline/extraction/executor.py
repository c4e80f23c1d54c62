"""The executor contract: where an extraction's parts run (``local``: this process; ``ray``: a
Ray cluster) and who commits them.

Why a registry: ``--executor NAME`` looks the executor up like models and datasets; adding one
(e.g. a batch scheduler) is one file and one ``EXECUTORS.lazy`` line here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult
from kvpipe.pipeline.extraction.worker import DatasetView, FailureFn, ProgressFn
from kvpipe.registry import Registry
from kvpipe.store.schema import FeatureSetMeta

if TYPE_CHECKING:
    from kvpipe.pipeline.models.base import ModelAdapter
    from kvpipe.store.writer import StoreWriter


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

    def run(self, parts: list[int], writer: "StoreWriter", result: ExtractResult, progress: ProgressFn | None,
            on_failure: FailureFn) -> None:
        raise NotImplementedError

    def text(self) -> tuple[list[list[int]], dict[str, np.ndarray]]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class Executor:
    """Registry entry: ``start(cfg, data, adapter)`` -> a Session."""

    def check(self, cfg: ExtractConfig) -> None:
        """Validate executor options before any work (one-line UsageError)."""

    def start(self, cfg: ExtractConfig, data: DatasetView, adapter: "ModelAdapter | None") -> Session:
        raise NotImplementedError


EXECUTORS: Registry[type[Executor]] = Registry("executor", "--executor")
EXECUTORS.lazy("local", "kvpipe.pipeline.extraction.local:LocalExecutor")
EXECUTORS.lazy("ray", "kvpipe.pipeline.extraction.ray_executor:RayExecutor")
