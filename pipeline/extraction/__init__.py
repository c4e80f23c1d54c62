"""The extraction workflow: run the MLM once per image and write its image K/V to the store.

Modules, in the order a job uses them: ``config`` (options, checks, selection, metadata),
``prefix`` (per-image prefixes), ``loading`` (batches prepared ahead of the GPU), ``transfer``
(host <-> device copies on side streams), ``parts`` (a part's rows and host pieces),
``worker`` (``PartWorker``: the per-process part code), ``executor`` (the contract and the
``EXECUTORS`` registry) with ``local`` and ``ray_executor``, and ``job`` (``extract``).
"""

from kvpipe.pipeline.extraction.config import ExtractConfig, ExtractResult
from kvpipe.pipeline.extraction.job import extract

__all__ = ["ExtractConfig", "ExtractResult", "extract"]
