"""The extraction job: dataset -> model -> feature store, resumable part by part.

Why parts: a part (a fixed slice of the dataset's order) is the unit of work and of commit.
A rerun of the same command opens the same store, skips committed parts and redoes the rest;
Ray workers (or one local process) can each own parts without ever sharing a file.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
from PIL import Image

import kvpipe
from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.capture import Selection, run_capture, run_text_capture
from kvpipe.pipeline.datasets import ImageRecord, create_dataset
from kvpipe.pipeline.models import ModelAdapter, load_model
from kvpipe.store.encoding import compressor_meta
from kvpipe.store.manifest import FAILED, ImageRow
from kvpipe.store.schema import ALL_KINDS, KEY_ROPE, STORE_DTYPES, FeatureSetMeta, ids_fingerprint, structure_fingerprint
from kvpipe.store.writer import StoreWriter


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
    dtype: str = "float32"
    device: str = "cpu"
    prefix: str = ""
    template: str = "chat"
    keys: str = "post-rope"
    layers: str = "all"
    heads: str = "all"
    kinds: str = "keys,values,post_proj"
    store_dtype: str | None = None  # default: the compute dtype
    batch_size: int = 4
    part_size: int = 32
    strict: bool = False
    seed: int = 0
    dataset_options: dict[str, Any] = field(default_factory=dict)
    command: str = ""


@dataclass
class ExtractResult:
    store: str
    parts_done: int
    parts_skipped: int
    images_ok: int
    images_failed: int
    seconds: float
    failures: list[tuple[str, str]] = field(default_factory=list)


def parse_index_spec(spec: str, n: int, option: str) -> tuple[int, ...]:
    """ "all" | "0-3,7" | "-4:" style -> sorted unique indices below n."""
    if spec.strip() == "all":
        return tuple(range(n))
    out: set[int] = set()
    try:
        for part in spec.split(","):
            part = part.strip()
            if "-" in part[1:]:
                a, b = part.split("-", 1) if not part.startswith("-") else (part, "")
                out.update(range(int(a), int(b) + 1))
            else:
                i = int(part)
                out.add(i if i >= 0 else n + i)
    except ValueError:
        raise UsageError(f"{option} {spec!r} is not a list like 'all', '0-3,7' or '-1'") from None
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


def validate(cfg: ExtractConfig) -> None:
    """Option combinations that make no sense, caught before any work."""
    if cfg.keys not in KEY_ROPE:
        raise UsageError(f"--keys must be one of {', '.join(KEY_ROPE)}, not {cfg.keys!r}")
    if cfg.store_dtype is not None and cfg.store_dtype not in STORE_DTYPES:
        raise UsageError(f"--store-dtype must be one of {', '.join(STORE_DTYPES)}")
    if cfg.batch_size < 1 or cfg.part_size < 1:
        raise UsageError("--batch-size and --part-size must be at least 1")
    if cfg.part_size % cfg.batch_size:
        raise UsageError(f"--part-size {cfg.part_size} must be a multiple of --batch-size {cfg.batch_size}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UsageError("--limit must be at least 1")


def _prefix_ids(adapter: ModelAdapter, cfg: ExtractConfig) -> list[int]:
    probe = adapter.preprocess([Image.new("RGB", (56, 56))], cfg.prefix, cfg.template)
    return probe.prefix_ids[0]


def build_meta(adapter: ModelAdapter, records: list[ImageRecord], dataset_desc: dict[str, Any],
               queries: list[str], cfg: ExtractConfig, sel: Selection) -> FeatureSetMeta:
    store_dtype = cfg.store_dtype or cfg.dtype
    return FeatureSetMeta(
        model=adapter.source, dataset=dataset_desc, layers=sel.layers, heads=sel.heads,
        kinds=sel.kinds, keys_rope=sel.keys_rope, n_layers=adapter.n_layers,
        n_kv_heads=adapter.n_kv_heads, head_dim=adapter.head_dim, hidden_size=adapter.hidden_size,
        compute_dtype=cfg.dtype, store_dtype=store_dtype, template=cfg.template, prefix=cfg.prefix,
        prefix_token_ids=tuple(_prefix_ids(adapter, cfg)), image_token_id=adapter.image_token_id,
        part_size=cfg.part_size, n_images=len(records),
        image_ids_sha256=ids_fingerprint([r.image_id for r in records]),
        text_queries=tuple(queries), compressor=compressor_meta(store_dtype),
        command=cfg.command or " ".join(shlex.quote(a) for a in sys.argv),
        kvpipe_version=kvpipe.__version__)


class PartBuilder:
    """Accumulates one part's images (features, masks, rows) into the arrays of a commit."""

    def __init__(self, part: int, sel: Selection):
        self.part, self.sel = part, sel
        self.rows: list[ImageRow] = []
        self.tensors: dict[str, list[np.ndarray]] = {k: [] for k in sel.kinds}
        self.masks: list[np.ndarray] = []
        self.n_tokens = 0
        self.n_mask = 0

    def add_failed(self, index: int, rec: ImageRecord, error: str) -> None:
        self.rows.append(ImageRow(index=index, image_id=rec.image_id, part=self.part, status=FAILED,
                                  error=error, token_offset=self.n_tokens, source=rec.source,
                                  group=rec.group, frame=rec.frame))

    def add(self, index: int, rec: ImageRecord, size: tuple[int, int], layout_json: str,
            base: tuple[int, int], feats: dict[str, Any], annotation: Any) -> None:
        n = int(next(iter(feats.values())).shape[-2])
        mask = annotation.mask
        row = ImageRow(index=index, image_id=rec.image_id, part=self.part, token_offset=self.n_tokens,
                       n_tokens=n, grid_h=base[0], grid_w=base[1], segments=layout_json,
                       image_h=size[1], image_w=size[0], source=rec.source, group=rec.group,
                       frame=rec.frame, meta=json.dumps(annotation.meta))
        if mask is not None:
            row.mask_offset, row.mask_h, row.mask_w = self.n_mask, int(mask.shape[0]), int(mask.shape[1])
            self.masks.append(np.ascontiguousarray(mask, dtype=np.uint8).ravel())
            self.n_mask += mask.size
        for k, v in feats.items():
            self.tensors[k].append(v.numpy())
        self.rows.append(row)
        self.n_tokens += n

    def arrays(self) -> dict[str, np.ndarray]:
        out: dict[str, np.ndarray] = {}
        for k, parts in self.tensors.items():
            if parts:
                out[k] = np.concatenate(parts, axis=-2)  # the token axis
        if self.masks:
            out["masks"] = np.concatenate(self.masks)
        return out


ProgressFn = Callable[[int], None]


def extract(cfg: ExtractConfig, progress: ProgressFn | None = None,
            on_start: Callable[[int, int], None] | None = None) -> ExtractResult:
    """Run (or resume) an extraction. ``progress(n)`` is told of every n images done."""
    validate(cfg)
    t0 = time.perf_counter()
    ds = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, limit=cfg.limit,
                        **cfg.dataset_options)
    records = ds.records()
    if not records:
        raise DataError(f"dataset {cfg.dataset} at {cfg.data_root} has no images")
    adapter = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, init=cfg.init,
                         revision=cfg.revision, seed=cfg.seed)
    sel = Selection(parse_index_spec(cfg.layers, adapter.n_layers, "--layers"),
                    parse_index_spec(cfg.heads, adapter.n_kv_heads, "--heads"),
                    parse_kinds(cfg.kinds), cfg.keys)
    queries = ds.text_queries()
    structure = ds.structure()
    desc = {**ds.describe(), "tasks": list(ds.tasks), "structure_sha256": structure_fingerprint(structure)}
    meta = build_meta(adapter, records, desc, queries, cfg, sel)
    writer = StoreWriter.create_or_resume(cfg.out, meta, structure)
    pending = writer.pending_parts()
    todo_images = sum(len(records[p * cfg.part_size:(p + 1) * cfg.part_size]) for p in pending)
    if on_start:
        on_start(todo_images, len(records))
    result = ExtractResult(cfg.out, 0, writer.n_parts() - len(pending), 0, 0, 0.0)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kvpipe-write") as pool:
        inflight: list[Future] = []
        for part in pending:
            builder = _extract_part(adapter, records, part, cfg, sel, result, progress)
            while len(inflight) >= 2:  # bound memory: at most two parts waiting for the disk
                inflight.pop(0).result()
            inflight.append(pool.submit(writer.write_part, part, builder.rows, builder.arrays()))
            result.parts_done += 1
        for f in inflight:
            f.result()
    if queries and not writer.text_committed():
        feats, ids = run_text_capture(adapter, queries, sel, cfg.template)
        writer.write_text(queries, ids, {k: v.numpy() for k, v in feats.items()})
    result.seconds = time.perf_counter() - t0
    return result


def _extract_part(adapter: ModelAdapter, records: list[ImageRecord], part: int, cfg: ExtractConfig,
                  sel: Selection, result: ExtractResult, progress: ProgressFn | None) -> PartBuilder:
    builder = PartBuilder(part, sel)
    start = part * cfg.part_size
    chunk = list(enumerate(records[start:start + cfg.part_size], start))
    for b in range(0, len(chunk), cfg.batch_size):
        loaded = []
        for index, rec in chunk[b:b + cfg.batch_size]:
            try:
                loaded.append((index, rec, rec.image(), rec.annotation()))
            except DataError as err:
                if cfg.strict:
                    raise DataError(f"{err} (--strict)") from None
                builder.add_failed(index, rec, str(err))
                result.images_failed += 1
                result.failures.append((rec.image_id, str(err)))
        if loaded:
            batch = adapter.preprocess([img for _, _, img, _ in loaded], cfg.prefix, cfg.template)
            feats = run_capture(adapter, batch, sel)
            for (index, rec, img, ann), lay, f in zip(loaded, batch.layouts, feats):
                builder.add(index, rec, img.size, lay.segments_json(), (lay.base.rows, lay.base.cols), f, ann)
                result.images_ok += 1
        if progress:
            progress(len(chunk[b:b + cfg.batch_size]))
    builder.rows.sort(key=lambda r: r.index)
    return builder
