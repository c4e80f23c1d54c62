"""Which (layer, KV head) pairs an attention knock-out blocks: input-agnostic heads and controls.

Why: the paper's intervention (Appendix A.6.2-A.6.3) blocks the input-agnostic image keys of
one layer range (early: the first 8 of 28 layers, middle: the next 10, late: the last 10) and
compares with two controls of the same size in the same layers: input-dependent keys chosen at
random, and keys chosen at random among all. The input-agnostic flags come from the
``input-agnostic`` probe's table (per (layer, head) L2 variance of image keys and a flag below
the bimodal threshold), so no model is needed to pick the heads. Pure Python + pyarrow.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from kvpipe.errors import UsageError
from kvpipe.probes.input_agnostic import FLAG, THRESHOLD_PREFIX, VARIANCE
from kvpipe.registry import Registry

Head = tuple[int, int]  # (layer, kv_head)

# The paper's split of LLaVA-OneVision 7B's 28 layers: 8 early, 10 middle, 10 late.
PAPER_EARLY, PAPER_LATE, PAPER_LAYERS = 8, 10, 28


@dataclass(frozen=True)
class VarianceTable:
    """The input-agnostic probe's per-head table, as the head sets need it."""

    variance: dict[Head, float]
    flags: dict[Head, bool]  # True: input-agnostic (variance below the threshold)
    threshold: float
    n_layers: int
    n_kv_heads: int


def read_variance_table(path: str | Path, n_layers: int, n_kv_heads: int,
                        threshold: float | None = None) -> VarianceTable:
    """Read ``results.parquet`` of ``kvpipe probe --task input-agnostic``; ``threshold`` overrides
    the probe's own (heads with variance below it are input-agnostic)."""
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"no input-agnostic results at {path}; run kvpipe probe --task input-agnostic "
                         f"--store STORE first")
    rows = pq.read_table(path).to_pylist()
    variance = {(int(r["layer"]), int(r["head"])): float(r["value"]) for r in rows
                if r["metric"] == VARIANCE and r["kind"] == "keys"}
    flags = {(int(r["layer"]), int(r["head"])): bool(r["value"]) for r in rows if r["metric"] == FLAG}
    stored = [float(r["value"]) for r in rows if str(r["metric"]).startswith(THRESHOLD_PREFIX)]
    if not variance or (threshold is None and (not flags or not stored)):
        raise UsageError(f"{path} is not an input-agnostic results table (no {VARIANCE} / {FLAG} rows); "
                         f"rerun kvpipe probe --task input-agnostic")
    outside = sorted(k for k in variance if not (0 <= k[0] < n_layers and 0 <= k[1] < n_kv_heads))
    if outside:
        raise UsageError(f"{path} has heads {outside[:3]} outside the model ({n_layers} layers, {n_kv_heads} KV "
                         f"heads); the store was made with another model")
    if threshold is not None:
        flags = {k: v < threshold for k, v in variance.items()}
    return VarianceTable(variance, flags, float(threshold if threshold is not None else stored[0]),
                         n_layers, n_kv_heads)


def _paper_split(n_layers: int) -> tuple[int, int]:
    early = round(n_layers * PAPER_EARLY / PAPER_LAYERS)
    late = round(n_layers * PAPER_LATE / PAPER_LAYERS)
    return early, late


LAYER_RANGES: dict[str, Callable[[int], list[int]]] = {
    "early": lambda n: list(range(0, _paper_split(n)[0])),
    "middle": lambda n: list(range(_paper_split(n)[0], n - _paper_split(n)[1])),
    "late": lambda n: list(range(n - _paper_split(n)[1], n)),
}


def layer_range(spec: str, n_layers: int) -> list[int]:
    """``early`` | ``middle`` | ``late`` (the paper's 8/10/10 of 28 layers, scaled to the model),
    or explicit layers: ``10-20`` (inclusive), ``3,5,7``, ``-1`` (counted from the end)."""
    spec = spec.strip()
    if spec in LAYER_RANGES:
        layers = LAYER_RANGES[spec](n_layers)
        if not layers:
            raise UsageError(f"--layers {spec} is empty for a model of {n_layers} layers; give layers "
                             f"explicitly, e.g. --layers 0-{n_layers - 1}")
        return layers
    layers: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)-(\d+)", part)
        try:
            if m:
                a, b = int(m.group(1)), int(m.group(2))
                if a > b:
                    raise ValueError
                layers.extend(range(a, b + 1))
            else:
                i = int(part)
                layers.append(i + n_layers if i < 0 else i)
        except ValueError:
            raise UsageError(f"--layers must be one of {', '.join(LAYER_RANGES)} or layers like 10-20 or 3,5,7; "
                             f"not {spec!r}") from None
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise UsageError(f"--layers {spec}: the model has {n_layers} layers (0-{n_layers - 1})")
    return sorted(set(layers))


HeadSetFn = Callable[[VarianceTable, list[int], np.random.Generator], frozenset[Head]]
HEAD_SETS: Registry[HeadSetFn] = Registry("head set", "--heads")


def select_heads(table: VarianceTable, kind: str, layers: list[int], seed: int = 0) -> frozenset[Head]:
    """The (layer, kv_head) pairs of head set ``kind`` within ``layers`` (seeded for the controls)."""
    return HEAD_SETS.get(kind)(table, list(layers), np.random.default_rng(seed))


def _agnostic(table: VarianceTable, layers: list[int]) -> list[Head]:
    return sorted(k for k, flag in table.flags.items() if flag and k[0] in layers)


@HEAD_SETS.register("input-agnostic")
def input_agnostic(table: VarianceTable, layers: list[int], rng: np.random.Generator) -> frozenset[Head]:
    heads = _agnostic(table, layers)
    if not heads:
        raise UsageError(f"no input-agnostic heads in layers {_span(layers)} (threshold {table.threshold:g}); "
                         f"choose other --layers or set --threshold")
    return frozenset(heads)


def _matched(table: VarianceTable, layers: list[int], rng: np.random.Generator,
             pool: Callable[[Head], bool], what: str) -> frozenset[Head]:
    """As many heads as there are input-agnostic ones, layer by layer, drawn at random from ``pool``;
    a layer short of candidates takes its remainder from the other layers of the range."""
    target = input_agnostic(table, layers, rng)
    chosen: list[Head] = []
    short = 0
    for layer in layers:
        need = sum(1 for l, _ in target if l == layer)
        cands = sorted(k for k in table.variance if k[0] == layer and pool(k))
        take = min(need, len(cands))
        short += need - take
        if take:
            chosen.extend(cands[i] for i in rng.choice(len(cands), size=take, replace=False))
    if short:
        rest = sorted(k for k in table.variance if k[0] in layers and pool(k) and k not in chosen)
        if len(rest) < short:
            raise UsageError(f"layers {_span(layers)} have {len(chosen) + len(rest)} {what}heads, fewer than the "
                             f"{len(target)} input-agnostic ones to match; choose other --layers or --threshold")
        chosen.extend(rest[i] for i in rng.choice(len(rest), size=short, replace=False))
    return frozenset(chosen)


@HEAD_SETS.register("input-dependent")
def input_dependent(table: VarianceTable, layers: list[int], rng: np.random.Generator) -> frozenset[Head]:
    """Control 1: input-dependent heads, at random, as many per layer as there are input-agnostic ones
    (outside the input-agnostic set by construction: overlap 0)."""
    return _matched(table, layers, rng, lambda k: not table.flags.get(k, False), "input-dependent ")


RANDOM_DRAWS = 1000  # redraws of the random control before giving up on a set other than the treatment


@HEAD_SETS.register("random")
def random_heads(table: VarianceTable, layers: list[int], rng: np.random.Generator) -> frozenset[Head]:
    """Control 2 (the paper's "the same number of all keys ... randomly selected"): heads at random
    among all heads of each layer, as many per layer as there are input-agnostic ones. It may share
    heads with the input-agnostic set (a "random combination of them", Table 9), but it is never
    that set itself: such a draw is redrawn, and a range where no other set exists is an error."""
    target = input_agnostic(table, layers, rng)
    if all(sum(1 for k in table.variance if k[0] == layer) == sum(1 for l, _ in target if l == layer)
           for layer in layers):
        raise UsageError(f"every head of layers {_span(layers)} is input-agnostic, so a random control of the "
                         f"same size per layer would block the very same heads; choose other --layers or "
                         f"--threshold")
    for _ in range(RANDOM_DRAWS):
        chosen = _matched(table, layers, rng, lambda k: True, "")
        if chosen != target:
            return chosen
    raise UsageError(f"{RANDOM_DRAWS} random draws in layers {_span(layers)} all equal the input-agnostic set; "
                     f"choose other --layers or --threshold")


def overlap_with_treatment(table: VarianceTable, layers: list[int], heads: frozenset[Head]) -> int:
    """How many of ``heads`` are input-agnostic heads of ``layers`` (the treatment of Table 3)."""
    return len(heads & frozenset(_agnostic(table, layers)))


def _span(layers: list[int]) -> str:
    if layers and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}" if len(layers) > 1 else str(layers[0])
    return ",".join(map(str, layers))
