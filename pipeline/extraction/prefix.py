"""Per-image text prefixes at extraction (the paper's Section 4.1 and Table 4).

Why: under causal attention, text placed before an image changes that image's keys and values.
The paper prefixes each image with what is known about it -- its COCO caption (RefCOCO), its
class name (SPair-71k), its capture domain (BDD-10K) -- and runs two controls: one fixed random
sentence for every image, and the wrong class / domain. Datasets expose what they know as
``ImageRecord.texts``; this module turns ``--prefix-from SOURCE --prefix-control CONTROL``
into one prefix per image, deterministically, before any model is loaded.

Sources (``PREFIX_SOURCES``) name a key of ``ImageRecord.texts``; controls
(``PREFIX_CONTROLS``) map the records to their prefixes:

- ``none``: the image's own text;
- ``random``: the paper's fixed random sentence (``RANDOM_PREFIX``) for every image, whatever
  the source (``--prefix-control random`` alone works);
- ``incorrect``: a wrong text of the same field. A source may define the wrong value itself
  (domain: the other domain of the paper's template, both halves swapped); otherwise another
  of the dataset's distinct values is drawn, seeded by (seed, image id), never the true one.

An image without the source's field is an error (a one-line DataError naming the dataset and
the field); filter the dataset to images that have it (e.g. bdd10k's timeofday / scene options).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import ImageRecord
from kvpipe.pipeline.datasets.bdd10k import other_domain
from kvpipe.registry import Registry

NEEDS_SOURCE = ("--prefix-control incorrect needs --prefix-from (class, domain or caption): the wrong value "
                "of which field?")
# The paper's "Prefixing-random" control, word for word.
RANDOM_PREFIX = ("A rustic wooden table filled with freshly baked croissants, dripping honey, and a steaming pot "
                 "of Earl Grey tea beside a bowl of ripe figs.")


@dataclass(frozen=True)
class PrefixSource:
    """Where an image's prefix comes from: the ``field`` of ``ImageRecord.texts``."""

    field: str
    description: str
    hint: str  # which datasets give the field, for the missing-field error
    wrong: Callable[[str], str | None] | None = None  # a field-defined incorrect value (None: draw another)


PREFIX_SOURCES: Registry[PrefixSource] = Registry("prefix source", "--prefix-from")
PREFIX_SOURCES.add("caption", PrefixSource(
    "caption", "the image's caption (RefCOCO: its COCO caption)",
    "refcoco reads COCO's annotations/captions_train2014.json under --data-root; synthetic generates one"))
PREFIX_SOURCES.add("class", PrefixSource(
    "class", "the name of the image's class (SPair-71k: the pair's category)",
    "spair, imagenet-s and synthetic name every image's class; pascal5i only where an image's episodes "
    "share one class"))
PREFIX_SOURCES.add("domain", PrefixSource(
    "domain", "the paper's domain sentence (BDD-10K: time of day and scene)",
    "bdd10k gives one to images tagged daytime or night and city street or highway; keep only those with "
    "--option timeofday=daytime|night --option scene='city street'|highway", wrong=other_domain))

# (records, source name or None, seed, dataset name) -> one prefix per record
Control = Callable[[Sequence[ImageRecord], "str | None", int, str], list[str]]
PREFIX_CONTROLS: Registry[Control] = Registry("prefix control", "--prefix-control")


def _values(records: Sequence[ImageRecord], name: str, dataset: str) -> list[str]:
    src = PREFIX_SOURCES.get(name)
    missing = [r.image_id for r in records if not r.texts.get(src.field)]
    if missing:
        raise DataError(f"--prefix-from {name}: dataset {dataset} has no {src.field} for image {missing[0]} "
                        f"({len(missing)} of {len(records)} images lack one); {src.hint}")
    return [r.texts[src.field] for r in records]


def _draw(seed: int, image_id: str) -> int:
    """A number fixed by (seed, image id): the same image gets the same wrong text in any run."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{image_id}".encode()).digest()[:8], "big")


@PREFIX_CONTROLS.register("none")
def _own(records: Sequence[ImageRecord], source: str | None, seed: int, dataset: str) -> list[str]:
    if source is None:
        return [""] * len(records)
    return _values(records, source, dataset)


@PREFIX_CONTROLS.register("random")
def _random(records: Sequence[ImageRecord], source: str | None, seed: int, dataset: str) -> list[str]:
    return [RANDOM_PREFIX] * len(records)


@PREFIX_CONTROLS.register("incorrect")
def _incorrect(records: Sequence[ImageRecord], source: str | None, seed: int, dataset: str) -> list[str]:
    if source is None:
        raise UsageError(NEEDS_SOURCE)
    src = PREFIX_SOURCES.get(source)
    values = _values(records, source, dataset)
    if src.wrong is not None:
        out = [src.wrong(v) for v in values]
        bad = next((v for v, w in zip(values, out) if w is None), None)
        if bad is not None:
            raise DataError(f"--prefix-control incorrect: no incorrect {src.field} is defined for {bad!r} "
                            f"(dataset {dataset})")
        return [w for w in out if w is not None]
    distinct = sorted(set(values))
    if len(distinct) < 2:
        raise DataError(f"--prefix-control incorrect: dataset {dataset} has one {src.field} only "
                        f"({distinct[0]!r}); an incorrect {src.field} needs at least two distinct ones")
    out = []
    for rec, v in zip(records, values):
        others = [d for d in distinct if d != v]
        out.append(others[_draw(seed, rec.image_id) % len(others)])
    return out


def resolve_prefixes(records: Sequence[ImageRecord], source: str | None, control: str = "none", seed: int = 0,
                     dataset: str = "the dataset") -> list[str]:
    """One prefix per record for ``--prefix-from source --prefix-control control``."""
    if source is not None:
        PREFIX_SOURCES.get(source)  # an unknown name is a one-line error listing the known ones
    return PREFIX_CONTROLS.get(control)(records, source, seed, dataset)


# ---- what the extraction job asks ------------------------------------------------------------
def per_image(cfg: Any) -> bool:
    """Whether ``cfg`` (an ExtractConfig) asks for per-image prefixes (a source or a control)."""
    return cfg.prefix_from is not None or cfg.prefix_control != "none"


def check_options(cfg: Any) -> None:
    """One-line UsageError for a prefix option that cannot work, before any work."""
    if cfg.prefix_from is not None:
        PREFIX_SOURCES.get(cfg.prefix_from)
    PREFIX_CONTROLS.get(cfg.prefix_control)
    if cfg.prefix and per_image(cfg):
        raise UsageError("--prefix gives every image one fixed text; --prefix-from / --prefix-control choose "
                         "one per image: use one or the other")
    if cfg.prefix_control == "incorrect" and cfg.prefix_from is None:
        raise UsageError(NEEDS_SOURCE)


def shared_prefix(cfg: Any) -> str:
    """The text every image gets, if there is one (the store's ``prefix``): ``--prefix``, or the
    random control's fixed sentence; "" when each image has its own."""
    return RANDOM_PREFIX if cfg.prefix_control == "random" else cfg.prefix


def prefix_choice(cfg: Any) -> dict[str, Any]:
    """The per-image prefix choice as recorded in the store metadata ({} when there is none)."""
    if not per_image(cfg):
        return {}
    return {"source": cfg.prefix_from, "control": cfg.prefix_control, "seed": cfg.seed}


def apply_prefixes(records: list[ImageRecord], cfg: Any) -> list[ImageRecord]:
    """``records`` with ``prefix`` set from ``cfg``'s choice (unchanged without one)."""
    if not per_image(cfg):
        return records
    texts = resolve_prefixes(records, cfg.prefix_from, cfg.prefix_control, cfg.seed, cfg.dataset)
    return [replace(r, prefix=t) for r, t in zip(records, texts)]
