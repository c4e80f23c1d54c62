"""Model adapters: one file per MLM family, looked up by name in ``MODELS`` (the catalog).

The package imports nothing heavy by itself: ``MODELS`` (catalog) lists names without torch or
transformers; the adapter contract and ``load_model`` import torch when first touched.
"""

from __future__ import annotations

from typing import Any

from kvpipe.pipeline.models.catalog import MODELS, ModelEntry

__all__ = ["MODELS", "Batch", "ModelAdapter", "ModelEntry", "Segment", "TokenLayout", "load_model"]

_LAZY = {"Batch": "base", "ModelAdapter": "base", "Segment": "base", "TokenLayout": "base", "load_model": "loading"}


def __getattr__(name: str) -> Any:  # PEP 562: torch is imported on first use, not by `import`
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
