"""The probe contract and registry.

Why: a probe is a small declarative unit (lm-evaluation-harness style): it says which
annotations it needs, scores one (layer, head, kind) of a store, and may add summary rows
and plots after the sweep. The runner owns the sweep, caching, tables and plots, so a new
probe is one file with one decorator. Probes read the store only, never a model.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvpipe.errors import UsageError
from kvpipe.probes.device import resolve_device
from kvpipe.registry import Registry
from kvpipe.store import FeatureStore
from kvpipe.store.schema import FeatureSetMeta


@dataclass(frozen=True)
class Target:
    """One representation to score: (kind, layer, head); post_proj has layer = head = -1."""

    kind: str
    layer: int = -1
    head: int = -1


@dataclass(frozen=True)
class Selection:
    """Which targets a sweep scores (``kvpipe probe --layers 0-13,20 --heads 0,2 --kinds values``):
    None = every stored one. post_proj (no layer, no head) is swept unless ``kinds`` leaves it out."""

    layers: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    kinds: tuple[str, ...] | None = None

    def has_layer(self, layer: int) -> bool:
        return self.layers is None or layer in self.layers

    def has_head(self, head: int) -> bool:
        return self.heads is None or head in self.heads

    def has_kind(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def to_dict(self) -> dict[str, list | None]:
        """For the cache key and run.json (None: all)."""
        return {k: (list(v) if v is not None else None)
                for k, v in (("layers", self.layers), ("heads", self.heads), ("kinds", self.kinds))}

    @classmethod
    def parse(cls, meta: FeatureSetMeta, layers: str | None = None, heads: str | None = None,
              kinds: str | None = None) -> "Selection":
        """From the command line's texts (``0-13,20``, ``0,2``, ``keys,values``; None or "" = all),
        checked against what the store holds: one line naming the stored ones otherwise."""
        stored_kinds = tuple(meta.kinds)
        sel_kinds = None
        if kinds:
            sel_kinds = tuple(k.strip().replace("-", "_") for k in kinds.split(",") if k.strip())
            missing = [k for k in sel_kinds if k not in stored_kinds]
            if missing:
                raise UsageError(f"--kinds {kinds}: the store holds no {', '.join(missing)} "
                                 f"(stored kinds: {', '.join(stored_kinds)})")
        return cls(_indices(layers, tuple(meta.layers), "--layers", "layers"),
                   _indices(heads, tuple(meta.heads), "--heads", "KV heads"), sel_kinds)


def _indices(text: str | None, stored: tuple[int, ...], flag: str, what: str) -> tuple[int, ...] | None:
    """``0-13,20`` -> (0, ..., 13, 20), each one of ``stored``; None when ``text`` is empty."""
    if not text:
        return None
    out: list[int] = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item)
        if not m:
            raise UsageError(f"{flag} {text}: {item!r} is not an index or a range like 0-13")
        lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
        if hi < lo:
            raise UsageError(f"{flag} {text}: the range {item} is empty")
        out.extend(range(lo, hi + 1))
    outside = sorted({i for i in out if i not in stored})
    if outside:
        raise UsageError(f"{flag} {text}: {_ranges(tuple(outside))} not in the store, whose {what} are "
                         f"{_ranges(stored)}")
    return tuple(sorted(set(out)))


def _ranges(values: tuple[int, ...]) -> str:
    """(0, 1, 2, 5) -> "0-2, 5"."""
    out, vals = [], sorted(values)
    i = 0
    while i < len(vals):
        j = i
        while j + 1 < len(vals) and vals[j + 1] == vals[j] + 1:
            j += 1
        out.append(str(vals[i]) if i == j else f"{vals[i]}-{vals[j]}")
        i = j + 1
    return ", ".join(out) or "none"


class Probe:
    """Base class; subclasses register with ``@PROBES.register`` (named after their module)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ("keys", "values", "hidden")  # swept per (layer, head) when stored
    baseline: ClassVar[bool] = True  # also score the post-projector features
    needs_text: ClassVar[bool] = False  # scores image tokens against the text queries' K/V
    primary_metric: ClassVar[str] = ""
    ranked: ClassVar[bool] = True  # higher primary_metric = better representation (False: a statistic)
    defaults: ClassVar[dict[str, Any]] = {}
    version: ClassVar[int] = 1  # bump when scores change, to invalidate cached results
    draw_plots: bool = True  # summarize() draws its own figures (run_probe's ``plots``)
    prediction_format: ClassVar[str] = ""  # what ``predictions`` returns (probes/predictions.py FORMATS); "" none
    # parameter values that read an any-resolution model's crops (every token, or the crops grid),
    # which a store extracted with --views base does not hold: {"tokens": ("all",)}
    crop_params: ClassVar[dict[str, tuple[Any, ...]]] = {}
    # True where scores see features only through inner products (cosines, distances, dot products
    # with text queries, L2-penalised linear fits with one scale): an orthogonal map of every vector
    # leaves them unchanged, so the probe reads int4 in its stored (rotated) basis and skips the
    # inverse rotation (``read_basis``; store.encoding.BASES)
    rotation_invariant: ClassVar[bool] = False

    @classmethod
    def reads_crops(cls, params: dict[str, Any] | None = None) -> str:
        """"tokens=all" when these parameters (over the defaults) read the crops, else ""."""
        full = {**cls.defaults, **(params or {})}
        return ", ".join(f"{k}={full.get(k)}" for k, values in cls.crop_params.items() if full.get(k) in values)

    def __init__(self, store: FeatureStore, params: dict[str, Any], device: str = "auto",
                 selection: Selection | None = None):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise UsageError(f"task {self.name} has no parameter {', '.join(sorted(unknown))}; "
                             f"its parameters: {', '.join(self.defaults) or 'none'}")
        self.store = store
        self.params = {**self.defaults, **params}
        crops = self.reads_crops(self.params)
        if crops and store.meta.stored_views == "base":
            raise UsageError(f"task {self.name} with {crops} reads the crops (tokens outside the base view), and the "
                             f"store {store.root} holds the base view only (extracted with --views base); re-extract "
                             f"with --views all, or set {crops.split('=')[0]} to another value")
        self.device = resolve_device(device)  # "numpy" (the reference code), "cpu" or "cuda:N" (torch)
        self.selection = selection or Selection()
        self.prepare()

    @classmethod
    def scored_kinds(cls) -> tuple[str, ...]:
        """The kinds a sweep scores: the probe's own, and post_proj where it has the baseline."""
        return tuple(cls.kinds) + (("post_proj",) if cls.baseline else ())

    @classmethod
    def unavailable(cls, meta: FeatureSetMeta) -> str:
        """Why a store with this metadata has nothing this probe can score ("" when it has):
        none of its kinds is stored, or it needs text-query K/V and the store is an encoder's."""
        swept = cls.scored_kinds()
        if cls.needs_text and not meta.text_queries and not any(k in meta.kinds for k in ("keys", "values")):
            return (f"{cls.name} scores image tokens against text queries' features, which only an MLM's "
                    f"store has, or SigLIP's on a dataset with text queries (this one holds "
                    f"{', '.join(meta.kinds)}, no text queries)")
        if not any(k in meta.kinds for k in swept):
            return f"{cls.name} scores {' or '.join(swept)}, and the store holds {', '.join(meta.kinds)}"
        return ""

    def skipped(self) -> list[str]:
        """Stored kinds this probe leaves out of the sweep, each with why (default: none)."""
        return []

    def prepare(self) -> None:
        """Load and check the annotations once; raise a one-line error if they are missing."""

    def score(self, target: Target) -> dict[str, float]:
        """Metrics of one target. Probes either override this, or split it into ``read`` (the
        store reads, which the runner runs one target ahead in a thread) and ``compute``."""
        if type(self).compute is Probe.compute:
            raise NotImplementedError
        return self.compute(target, self.read(target))

    def decode_on(self) -> str | None:
        """Where a probe whose device path takes a target's features as one tensor has them
        decoded: on its GPU (``FeatureStore.read(device=...)``; the stored bytes cross the bus,
        int4's in 0.14 of float32's, and its rotation is undone there), else on the host (None)."""
        return self.device if self.device.startswith("cuda") else None

    def read_basis(self) -> str:
        """The basis of this probe's store reads: "stored" where its scores are rotation invariant."""
        return "stored" if self.rotation_invariant else "model"

    def read(self, target: Target) -> Any:
        """What ``compute`` needs from the store for ``target`` (default: nothing; ``score`` reads)."""
        return None

    def compute(self, target: Target, data: Any) -> dict[str, float]:
        """Metrics of ``target`` from ``read(target)``'s result (default: ``score``)."""
        return self.score(target)

    def predictions(self, target: Target) -> Any:
        """What the probe predicts at ``target`` (masks, propagated frames, matched points), as a
        ``probes.predictions.Predictions`` of ``prediction_format``; the scores come from these."""
        raise NotImplementedError(f"{self.name} saves no predictions")

    def targets(self) -> list[Target]:
        meta = self.store.meta
        sel = self.selection
        out = [Target(k, l, h) for k in self.kinds if k in meta.kinds and sel.has_kind(k)
               for l in meta.layers if sel.has_layer(l) for h in meta.heads if sel.has_head(h)]
        if self.baseline and "post_proj" in meta.kinds and sel.has_kind("post_proj"):
            out.append(Target("post_proj"))
        return out

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        """Extra rows and plots after the sweep (default: none; the runner draws Figure-2 plots).

        Use only ``rows`` (the scored rows) and what ``prepare`` set: a cached run calls this
        again, on a freshly prepared probe, to redraw the plots in a new results directory.
        """
        return [], []


# The catalog: one module per probe, named after the module (fg_seg -> "fg-seg"), imported
# when first used; the last three are the paired tasks of the paper's Table 5.
PROBES: Registry[type[Probe]] = Registry(
    "task", "--task", package="kvpipe.probes",
    modules=("cosegmentation", "fg_seg", "input_agnostic", "refexp_seg", "semantic_corr", "semantic_seg",
             "temporal_corr", "art_style", "spair_vqa", "visual_similarity"))


def views_for(tasks: list[str] | tuple[str, ...], params: dict[str, dict[str, Any]] | None = None) -> tuple[str, str]:
    """The views a store must hold for ``tasks`` (each with its default parameters, or those in
    ``params[task]``): ("all", why) when one of them reads the crops, else ("base", why)."""
    crops = [f"{t} ({why})" for t in tasks if t in PROBES
             for why in [PROBES.get(t).reads_crops((params or {}).get(t))] if why]
    if crops:
        return "all", f"{', '.join(crops)} read the crops"
    return "base", f"tasks {', '.join(tasks) or 'none'} read the base view"
