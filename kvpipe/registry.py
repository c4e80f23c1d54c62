"""Name -> factory registries (models, datasets, probes).

Why: adding a model, dataset or probe must be one new file plus one decorator, and every
unknown name must produce the same helpful error listing what exists (timm's
``register_model`` / ``list_models`` style).
"""

from __future__ import annotations

import fnmatch
import inspect
from typing import Any, Callable, Generic, Iterator, TypeVar

from kvpipe.errors import UsageError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named collection of entries filled by a decorator at import time."""

    def __init__(self, kind: str, option: str) -> None:
        self.kind = kind  # e.g. "model"
        self.option = option  # the CLI option that takes these names, e.g. "--model"
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def decorator(entry: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._entries[name] = entry
            return entry

        return decorator

    def add(self, name: str, entry: T) -> None:
        self.register(name)(entry)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r} for {self.option}; known: {', '.join(self.names())}"
            ) from None

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def items(self, pattern: str = "*") -> list[tuple[str, T]]:
        return [(n, self._entries[n]) for n in self.names(pattern)]


BASE_ARGS = ("self", "root", "split", "limit")


def keyword_options(cls: type) -> dict[str, Any]:
    """A registered class's keyword options and their defaults (beyond root, split and limit):
    what ``--option KEY=VALUE`` may set for a dataset or a benchmark."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items()
            if n not in BASE_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
