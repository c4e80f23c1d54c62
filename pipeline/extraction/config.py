"""What an extraction does: its options, their checks, the model's defaults, the store metadata.

Why one module: every executor and the benchmark build the same ``ExtractConfig`` and turn it
into a ``Selection`` (what to capture) and a ``FeatureSetMeta`` (what the store records) here,
so a store made by any of them describes itself the same way.
"""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import kvpipe
from kvpipe.errors import UsageError
from kvpipe.pipeline.datasets import ImageRecord, create_dataset
from kvpipe.pipeline.extraction import prefix as prefixes
from kvpipe.pipeline.extraction import sequences
from kvpipe.pipeline.models.catalog import model_source
from kvpipe.pipeline.models.options import check_init, dtype_name
from kvpipe.pipeline.models.selection import Selection
from kvpipe.roots import existing_root
from kvpipe.store.encoding import CODECS, check_store_dtype, compressor_meta, text_dtype_for
from kvpipe.store.schema import ALL_KINDS, KEY_ROPE, STORE_DTYPES, VIEWS, FeatureSetMeta, ids_fingerprint

if TYPE_CHECKING:  # config is checked before any model code is imported
    from kvpipe.pipeline.models.base import ModelAdapter


@dataclass
class ExtractConfig:
    """Every option of ``kvpipe extract`` (CLI flags map one to one)."""

    model: str
    dataset: str
    out: str
    data_root: str | None = None
    split: str | None = None
    limit: int | None = None
    init: str = "pretrained"
    revision: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU (the store records what ran)
    device: str = "auto"  # auto: the first GPU when torch sees one, else the CPU
    prefix: str = ""
    prefix_from: str | None = None  # per-image prefixes: pipeline.prefix.PREFIX_SOURCES (caption | class | domain)
    prefix_control: str = "none"  # none | random | incorrect (pipeline.prefix.PREFIX_CONTROLS)
    template: str = "chat"
    keys: str | None = None  # None: post-rope (an MLM's default; a vision encoder stores no keys)
    layers: str = "all"
    heads: str = "all"
    kinds: str | None = None  # None: the model's own kinds (MLM: keys,values,post_proj; encoder: hidden)
    store_dtype: str | None = None  # default: the compute dtype
    pca_step: float | None = None  # --store-dtype pca's step (store.pca.PCA_STEP when None)
    batch_size: int = 4
    part_size: int | None = None  # None: the multiple of batch_size nearest below PART_IMAGES
    codec: str = "zstd"  # store.encoding.CODECS
    loader_processes: int | None = None  # None: LOADER_PROCESSES on a GPU, threads on a CPU
    fast_kernels: bool = True  # numerically equivalent faster kernels (ModelAdapter.accelerate)
    strict: bool = False
    seed: int = 0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    executor: str = "local"  # extraction.executor.EXECUTORS: local | ray
    ray_address: str | None = None  # None: a local Ray instance (or RAY_ADDRESS / ray start's)
    workers: int | None = None  # Ray actors; default: one per GPU of the cluster (1 on CPU)
    repair: bool = False  # redo the parts kvpipe verify finds damaged
    # (width, height): every image resized to this size before the model's processor (one token
    # layout for native-resolution models; recorded in the store's dataset description)
    image_size: tuple[int, int] | None = None
    # all | base: an any-resolution model's crops/tiles stored too, or the base view only (what the
    # probes read); the CLI's default follows the tasks the store serves (probes.base.views_for)
    views: str = "all"
    views_reason: str = ""  # how views was chosen (recorded in the store metadata)
    force: bool = False  # start even when the output disk looks too small for the planned store
    # each sequence's images (a BLINK question's) in one prompt, as kvpipe answer shows them
    # (extraction.sequences); recorded in the store's dataset description
    multi_image: bool = False


@dataclass
class ExtractResult:
    store: str
    parts_done: int
    parts_skipped: int
    images_ok: int
    images_failed: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)
    parts_repaired: list[int] = field(default_factory=list)  # damaged parts redone by --repair
    # where the driver's time went: waiting for loaded batches, capturing, waiting for writes
    timings: dict[str, float] = field(default_factory=lambda: {"load_wait": 0.0, "capture": 0.0,
                                                                "write_wait": 0.0})

    def timed(self, key: str, t0: float) -> None:
        self.timings[key] = self.timings.get(key, 0.0) + time.perf_counter() - t0


def parse_index_spec(spec: str, n: int | None, option: str) -> tuple[int, ...]:
    """ "all" | "0-3,7" | "-1" style -> sorted unique indices below n (n None: the syntax is checked,
    nothing is returned)."""
    if spec.strip() == "all":
        return tuple(range(n)) if n is not None else ()
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                if int(b) < int(a):
                    raise UsageError(f"{option} {spec!r}: the range {part} runs backwards; write {b}-{a}")
                out.update(range(int(a), int(b) + 1))
            else:
                i = int(part)
                out.add(i if i >= 0 or n is None else n + i)
    except ValueError:
        raise UsageError(f"{option} {spec!r} is not a list like 'all', '0-3,7' or '-1'") from None
    if not out:
        raise UsageError(f"{option} {spec!r} names nothing; give at least one index, or 'all'")
    if n is None:
        return ()
    bad = sorted(i for i in out if not 0 <= i < n)
    if bad:
        raise UsageError(f"{option} {spec!r} names {bad}, but the model has {n} (0-{n - 1})")
    return tuple(sorted(out))


def parse_kinds(spec: str) -> tuple[str, ...]:
    kinds = tuple(k.strip().replace("-", "_") for k in spec.split(",") if k.strip())
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad or not kinds:
        raise UsageError(f"--kinds {spec!r}: use a comma list of {', '.join(ALL_KINDS)}")
    return tuple(k for k in ALL_KINDS if k in kinds)


PART_IMAGES = 32  # images per part when --part-size is not given


def default_part_size(batch_size: int) -> int:
    """Parts hold whole batches: the largest multiple of ``batch_size`` up to PART_IMAGES (at least one batch)."""
    return max(1, PART_IMAGES // batch_size) * batch_size


def with_defaults(cfg: ExtractConfig) -> ExtractConfig:
    """``cfg`` with the sizes the user left out filled in (the part size follows --batch-size)."""
    if cfg.part_size is None:
        return replace(cfg, part_size=default_part_size(cfg.batch_size))
    return cfg


def parse_image_size(spec: str | None) -> tuple[int, int] | None:
    """ "448x448" -> (448, 448) (width x height); None stays None."""
    if spec is None:
        return None
    try:
        w, h = (int(v) for v in spec.lower().split("x"))
    except ValueError:
        raise UsageError(f"--image-size {spec!r} must be WIDTHxHEIGHT in pixels, e.g. 448x448") from None
    if w < 1 or h < 1:
        raise UsageError(f"--image-size {spec!r} must be positive, e.g. 448x448")
    return w, h


def validate(cfg: ExtractConfig) -> None:
    """Option combinations that make no sense, caught before any work (imports no model code)."""
    if cfg.keys is not None and cfg.keys not in KEY_ROPE:
        raise UsageError(f"--keys must be one of {', '.join(KEY_ROPE)}, not {cfg.keys!r}")
    check_store_dtype(cfg.store_dtype, cfg.pca_step)
    validate_views(cfg)
    if cfg.codec not in CODECS:
        raise UsageError(f"--codec must be one of {', '.join(CODECS)}, not {cfg.codec!r}")
    if cfg.batch_size < 1 or (cfg.part_size is not None and cfg.part_size < 1):
        raise UsageError("--batch-size and --part-size must be at least 1")
    if cfg.part_size is not None and cfg.part_size % cfg.batch_size:
        raise UsageError(f"--part-size {cfg.part_size} must be a multiple of --batch-size {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError("--limit must be at least 1")
    dtype_name(cfg.dtype)  # bf16 / fp32 aliases are fine; anything else is refused now
    if cfg.kinds is not None:
        parse_kinds(cfg.kinds)
    for spec, option in ((cfg.layers, "--layers"), (cfg.heads, "--heads")):
        parse_index_spec(spec, None, option)  # syntax and order now; bounds once the model is known
    check_init(cfg.init)
    model_source(cfg.model, cfg.init)  # a misspelt name or a missing directory
    ds = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, limit=cfg.limit, **cfg.dataset_options)
    sequences.check_options(cfg, ds)
    if cfg.data_root is not None and "://" not in cfg.data_root:
        existing_root(cfg.data_root, cfg.dataset, "the dataset's directory in its official layout")
    prefixes.check_options(cfg)



def validate_views(cfg: ExtractConfig) -> None:
    if cfg.views not in VIEWS:
        raise UsageError(f"--views must be one of {', '.join(VIEWS)}, not {cfg.views!r}")


def resolve(adapter: ModelAdapter, cfg: ExtractConfig) -> tuple[ExtractConfig, Selection]:
    """``cfg`` with the model's defaults filled in (kinds, keys) and what to capture; a
    one-line UsageError for an option the model cannot honour (e.g. --prefix on an encoder)."""
    kinds = parse_kinds(cfg.kinds) if cfg.kinds is not None else adapter.kinds
    adapter.check_options(kinds, prefix=cfg.prefix, keys=cfg.keys)
    if cfg.multi_image:
        adapter.check_multi_image()
    if prefixes.per_image(cfg) and not adapter.encodes_text:
        raise UsageError(f"--prefix-from / --prefix-control need an MLM: {adapter.source.get('name')} is a "
                         f"vision encoder and reads no text")
    cfg = replace(cfg, kinds=",".join(kinds), keys=cfg.keys or KEY_ROPE[0])
    if cfg.views == "base" and not adapter.multi_view:  # its only view is the base view
        cfg = replace(cfg, views="all", views_reason=f"{adapter.family} stores one view per image")
    sel = Selection(parse_index_spec(cfg.layers, adapter.n_layers, "--layers"),
                    parse_index_spec(cfg.heads, adapter.n_kv_heads, "--heads"), kinds, cfg.keys, cfg.views)
    return cfg, sel


def build_meta(adapter: ModelAdapter, records: list[ImageRecord], dataset_desc: dict[str, Any],
               queries: list[str], cfg: ExtractConfig, sel: Selection) -> FeatureSetMeta:
    store_dtype = cfg.store_dtype or cfg.dtype
    return FeatureSetMeta(
        model=adapter.source, dataset=dataset_desc, layers=sel.layers, heads=sel.heads,
        kinds=sel.kinds, n_layers=adapter.n_layers,
        n_kv_heads=adapter.n_kv_heads, head_dim=adapter.head_dim, hidden_size=adapter.hidden_size,
        compute_dtype=cfg.dtype, store_dtype=store_dtype,
        **adapter.input_meta(prefixes.shared_prefix(cfg), cfg.template, sel.keys_rope),
        prefix_choice=prefixes.prefix_choice(cfg),
        part_size=cfg.part_size, n_images=len(records),
        image_ids_sha256=ids_fingerprint([r.image_id for r in records]),
        text_queries=tuple(queries) if adapter.encodes_queries else (),
        compressor=compressor_meta(store_dtype, codec=cfg.codec, pca_step=cfg.pca_step),
        text_dtype=text_dtype_for(store_dtype, cfg.dtype) if queries and adapter.encodes_queries else "",
        views={"views": sel.views, "reason": cfg.views_reason or ("--views" if sel.views == "base" else "default")},
        command=cfg.command or " ".join(shlex.quote(a) for a in sys.argv),
        kvpipe_version=kvpipe.__version__)
