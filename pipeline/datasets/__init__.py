"""Dataset adapters, looked up by name in ``DATASETS`` (each imported when first used).

``create_dataset`` is the one way the CLI and library build an adapter, so a missing
--data-root or a misspelt option gets the same one-line UsageError everywhere.
"""

from __future__ import annotations

from typing import Any

from kvpipe.errors import UsageError
from kvpipe.registry import create, keyword_options
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, load_palette_mask

HF_PREFIX = "hf:"  # --dataset hf:PATH_OR_ID

__all__ = ["DATASETS", "Annotation", "DatasetAdapter", "ImageRecord", "create_dataset", "dataset_options",
           "load_palette_mask"]


def dataset_options(cls: type[DatasetAdapter]) -> dict[str, Any]:
    """The adapter's keyword options and their defaults (beyond root, split and limit)."""
    return keyword_options(cls)


def create_dataset(name: str, root: str | None = None, split: str | None = None, limit: int | None = None,
                   **options: Any) -> DatasetAdapter:
    """Build the registered adapter ``name``; unknown names, options or a missing root are UsageErrors.

    ``hf:PATH_OR_ID`` is the ``hf`` adapter (any dataset the ``datasets`` library reads) with
    ``path=PATH_OR_ID``."""
    if name.startswith(HF_PREFIX):
        if "path" in options:
            raise UsageError(f"--dataset {name} already names the dataset; drop --option path")
        name, options = "hf", {**options, "path": name[len(HF_PREFIX):]}
    cls = DATASETS.get(name)
    if cls.needs_root and root is None:
        hint = getattr(cls, "root_hint", "the dataset's directory in its official layout")
        raise UsageError(f"--data-root is required for dataset {name!r}; point it at {hint}")
    return create(DATASETS, name, root=root, split=split, limit=limit, **options)
