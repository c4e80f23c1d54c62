"""Name -> entry registries (models, datasets, benchmarks, probes, executors, ...).

Why: every unknown name must produce the same helpful error listing what exists (timm's
``register_model`` / ``list_models`` style), and listing names must not import the code behind
them (a model family imports transformers). So entries are data that import their code on use:

- ``Registry(..., package=P, modules=(...))``: one entry per module of package ``P``, named
  after the module (``fg_seg.py`` -> ``fg-seg``). The module marks its entry class with a bare
  ``@REGISTRY.register``, which sets the class's ``name`` from the module: the name is said
  once, by the file name. Adding one = one new file + its module name in the catalog tuple.
- ``lazy(name, "module:attr")``: an entry imported on first ``get`` (model adapters, executors).
- ``register("name")`` / ``add(name, entry)``: entries that are plain objects (head sets,
  prefix controls, model entries that are themselves data).
"""

from __future__ import annotations

import fnmatch
import importlib
import inspect
from typing import Any, Generic, Iterator, TypeVar

from kvpipe.errors import UsageError

T = TypeVar("T")


def module_entry_name(module: str) -> str:
    """The registry name of the entry defined in ``module``: its last part, ``_`` -> ``-``."""
    return module.rsplit(".", 1)[-1].replace("_", "-")


def import_target(target: str) -> Any:
    """``"package.module:attr"`` -> the attribute (imported now)."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class _Pending:
    """A registered name whose code has not been imported yet."""

    def __init__(self, target: str):
        self.target = target  # "module:attr", or "module" for a module that registers itself


class Registry(Generic[T]):
    """A named collection of entries, declared as data and imported on use."""

    def __init__(self, kind: str, option: str, package: str | None = None, modules: tuple[str, ...] = ()) -> None:
        self.kind = kind  # e.g. "model"
        self.option = option  # the CLI option that takes these names, e.g. "--model"
        self._entries: dict[str, Any] = {}
        for m in modules:
            self._entries[module_entry_name(m)] = _Pending(f"{package}.{m}")

    # -- declaring entries ----------------------------------------------------------------
    def register(self, entry: Any = None) -> Any:
        """``@REG.register`` on a class: its name comes from its module (and is set as its
        ``name``). ``@REG.register("name")``: an explicitly named object (e.g. a function)."""
        if isinstance(entry, str):
            name = entry

            def decorator(obj: T) -> T:
                self._put(name, obj)
                return obj
            return decorator
        name = module_entry_name(entry.__module__)
        entry.name = name
        self._put(name, entry)
        return entry

    def add(self, name: str, entry: T) -> None:
        self._put(name, entry)

    def lazy(self, name: str, target: str) -> None:
        """Register ``name`` as ``"module:attr"``, imported on first use."""
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} registered twice")
        self._entries[name] = _Pending(target)

    def _put(self, name: str, entry: Any) -> None:
        old = self._entries.get(name)
        if old is not None and not isinstance(old, _Pending):
            if old is entry:
                return
            raise ValueError(f"{self.kind} {name!r} registered twice")
        if isinstance(old, _Pending) and old.target.partition(":")[0] != getattr(entry, "__module__", None) \
                and ":" not in old.target:
            raise ValueError(f"{self.kind} {name!r} is declared in {old.target}, not in {entry.__module__}")
        self._entries[name] = entry

    # -- looking up -----------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def get(self, name: str) -> T:
        try:
            entry = self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r} for {self.option}; known: {', '.join(self.names())}"
            ) from None
        if isinstance(entry, _Pending):
            entry = self._load(name, entry)
        return entry

    def _load(self, name: str, pending: _Pending) -> Any:
        if ":" in pending.target:
            obj = import_target(pending.target)
            if inspect.isclass(obj) and "name" in _class_attrs(obj):
                obj.name = name
            self._entries[name] = obj
            return obj
        importlib.import_module(pending.target)  # the module registers itself
        entry = self._entries[name]
        if isinstance(entry, _Pending):
            raise RuntimeError(f"{pending.target} defines no @{self.kind} entry (expected one named {name!r})")
        return entry

    def names(self, pattern: str = "*") -> list[str]:
        """Registered names matching a shell-style wildcard, sorted (imports nothing)."""
        return sorted(n for n in self._entries if fnmatch.fnmatch(n, pattern))

    def items(self, pattern: str = "*") -> list[tuple[str, T]]:
        """(name, entry) for matching names; imports their code."""
        return [(n, self.get(n)) for n in self.names(pattern)]


def _class_attrs(cls: type) -> set[str]:
    return {a for c in cls.__mro__ for a in vars(c)}


BASE_ARGS = ("self", "root", "split", "limit")


def keyword_options(cls: type) -> dict[str, Any]:
    """A registered class's keyword options and their defaults (beyond root, split and limit):
    what ``--option KEY=VALUE`` may set for a dataset or a benchmark."""
    params = inspect.signature(cls.__init__).parameters
    return {n: p.default for n, p in params.items()
            if n not in BASE_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def create(registry: Registry[Any], name: str, *args: Any, **options: Any) -> Any:
    """Build the class registered as ``name`` with keyword ``options``; an option it does not
    take is a one-line UsageError listing the ones it does (datasets and benchmarks alike)."""
    cls = registry.get(name)
    known = keyword_options(cls)
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.__init__).parameters.values())
    unknown = sorted(set(options) - set(known) - set(BASE_ARGS))
    if unknown and not takes_any:
        listed = ", ".join(known) if known else "none"
        raise UsageError(f"{registry.kind} {name!r} has no option {unknown[0]!r}; its options: {listed}")
    return cls(*args, **options)
