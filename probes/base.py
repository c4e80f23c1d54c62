"""The probe contract and registry.

Why: a probe is a small declarative unit (lm-evaluation-harness style): it says which
annotations it needs, scores one (layer, head, kind) of a store, and may add summary rows
and plots after the sweep. The runner owns the sweep, caching, tables and plots, so a new
probe is one file with one decorator. Probes read the store only, never a model.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from kvpipe.errors import UsageError
from kvpipe.registry import Registry
from kvpipe.store import FeatureStore
from kvpipe.store.schema import FeatureSetMeta


@dataclass(frozen=True)
class Target:
    """One representation to score: (kind, layer, head); post_proj has layer = head = -1."""

    kind: str
    layer: int = -1
    head: int = -1


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

    def __init__(self, store: FeatureStore, params: dict[str, Any]):
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise UsageError(f"task {self.name} has no parameter {', '.join(sorted(unknown))}; "
                             f"its parameters: {', '.join(self.defaults) or 'none'}")
        self.store = store
        self.params = {**self.defaults, **params}
        self.prepare()

    @classmethod
    def unavailable(cls, meta: FeatureSetMeta) -> str:
        """Why a store with this metadata has nothing this probe can score ("" when it has):
        none of its kinds is stored, or it needs text-query K/V and the store is an encoder's."""
        swept = cls.kinds + (("post_proj",) if cls.baseline else ())
        if not any(k in meta.kinds for k in swept):
            return f"{cls.name} scores {' or '.join(swept)}, and the store holds {', '.join(meta.kinds)}"
        if cls.needs_text and not any(k in meta.kinds for k in ("keys", "values")):
            return (f"{cls.name} scores image tokens against text queries' keys/values, which only an MLM's "
                    f"store has (this one holds {', '.join(meta.kinds)})")
        return ""

    def prepare(self) -> None:
        """Load and check the annotations once; raise a one-line error if they are missing."""

    def score(self, target: Target) -> dict[str, float]:
        raise NotImplementedError

    def targets(self) -> list[Target]:
        meta = self.store.meta
        out = [Target(k, l, h) for k in self.kinds if k in meta.kinds for l in meta.layers for h in meta.heads]
        if self.baseline and "post_proj" in meta.kinds:
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
