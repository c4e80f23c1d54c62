"""The --data-root check shared by image datasets and question-answering benchmarks.

Why here: both kvpipe.pipeline.datasets and kvpipe.pipeline.vqa need it, and each package's
__init__ imports the other's modules, so it lives below both.
"""

from __future__ import annotations

from pathlib import Path

from kvpipe.errors import DataError, UsageError


def existing_root(root: str | None, dataset: str, hint: str, what: str = "dataset") -> Path:
    """--data-root as an absolute directory, or a DataError that says what it should hold."""
    if root is None:
        raise UsageError(f"--data-root is required for {what} {dataset!r}; point it at {hint}")
    path = Path(str(root)).expanduser()
    if not path.exists():
        raise DataError(f"--data-root {path} does not exist; point it at {hint}")
    if not path.is_dir():
        raise DataError(f"--data-root {path} is a file; point it at {hint}")
    return path.resolve()
