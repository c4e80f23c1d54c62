"""The extraction workflow: run the MLM once per image and write its image K/V to the store.

Modules, in the order a job uses them: ``config`` (options, checks, selection, metadata; no
torch, so usage errors answer at once), ``prefix`` (per-image prefixes), ``loading`` (batches
prepared ahead of the GPU), ``transfer`` (host <-> device copies on side streams), ``parts``
(a part's rows and host pieces), ``worker`` (``PartWorker``: the per-process part code),
``executor`` (the contract and the ``EXECUTORS`` registry) with ``local`` and
``ray_executor``, and ``job`` (``extract``).
"""

from __future__ import annotations

from typing import Any

from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult

__all__ = ["ExtractConfig", "ExtractResult", "extract"]


def __getattr__(name: str) -> Any:  # PEP 562: the job (torch) is imported on first use
    if name == "extract":
        from kvpipe.pipeline.extraction.job import extract

        return extract
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
