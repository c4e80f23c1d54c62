"""Small helpers shared by the adapters that read official dataset layouts.

Why one place: every adapter must turn a bad --data-root, a missing list file or a malformed
option into the same kind of one-line error that names the path or option and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.roots import existing_root  # noqa: F401  (the datasets' --data-root check)


def int_option(dataset: str, name: str, value: Any, minimum: int = 0, maximum: int | None = None) -> int:
    """An integer option (digit strings accepted, as a command line may pass them)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    ok = not isinstance(value, bool) and isinstance(value, (int, np.integer))
    if ok and (value < minimum or (maximum is not None and value > maximum)):
        ok = False
    if not ok:
        bound = f"between {minimum} and {maximum}" if maximum is not None else f">= {minimum}"
        raise UsageError(f"dataset {dataset!r} option {name}={value!r} must be an integer {bound}")
    return int(value)


def choice_option(dataset: str, name: str, value: Any, allowed: Iterable[str]) -> str | None:
    """None, or one of ``allowed`` (compared as given, so typos are caught, not silently empty)."""
    if value is None:
        return None
    allowed = tuple(allowed)
    if value not in allowed:
        raise UsageError(f"dataset {dataset!r} option {name}={value!r} is not one of: "
                         f"{', '.join(repr(a) for a in allowed)}")
    return str(value)




def first_dir(candidates: Iterable[Path]) -> Path | None:
    return next((p for p in candidates if p.is_dir()), None)


def read_id_list(path: Path, what: str, fix: str) -> list[str]:
    """Non-blank lines of a list file (first whitespace field), repeats dropped, file order kept."""
    if not path.is_file():
        raise DataError(f"{what} {path} does not exist; {fix}")
    ids = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    return list(dict.fromkeys(ids))


def visible_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Files of one folder with one of the extensions (any case), hidden ones skipped, sorted by name."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in extensions)
