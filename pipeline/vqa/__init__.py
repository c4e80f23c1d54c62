"""Question-answering benchmarks: readers of each benchmark's own files plus its scoring.

Benchmarks are looked up by name in ``BENCHMARKS`` (each imported when first used);
``create_benchmark`` is the one way to build one, so an unknown name or option gets the same
one-line UsageError everywhere. Nothing here imports torch: the model's answering loop lives
in ``pipeline.evaluation`` and calls ``items()``, ``parse()`` and ``score()``.
"""

from __future__ import annotations

from typing import Any

from kvpipe.registry import create, keyword_options
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem
from kvpipe.pipeline.vqa.scoring import paired_rows, paired_table

__all__ = ["BENCHMARKS", "Benchmark", "VQAItem", "benchmark_options", "create_benchmark", "paired_rows",
           "paired_table"]


def benchmark_options(cls: type[Benchmark]) -> dict[str, Any]:
    """The benchmark's keyword options and their defaults (beyond root, split and limit)."""
    return keyword_options(cls)


def create_benchmark(name: str, root: str | None = None, split: str | None = None, limit: int | None = None,
                     **options: Any) -> Benchmark:
    """Build the registered benchmark ``name``; unknown names or options are UsageErrors."""
    bench = create(BENCHMARKS, name, root, split=split, limit=limit, **options)
    bench.options = dict(options)
    return bench
