"""``kvpipe plan``: the size of a store before anything runs; the disk check of ``kvpipe extract``.

Why: at the paper's 8,000-20,000 images a lossless LLaVA-OV-7B store is about a terabyte, so
the size is said up front, per encoding and view choice, from the processor's rules alone
(``pipeline.models.sizes``): no weights, no torch.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kvpipe.cli.common import console
from kvpipe.errors import UsageError
from kvpipe.store.fs import LocalLocation

ENCODINGS = ("bfloat16", "int8", "int4", "pca")  # the plan's columns: lossless bf16 and the lossy ones
GB = 1e9


@dataclass
class Plan:
    model: str
    dataset: str
    images: int
    source: str  # "typical" (catalog numbers) or the data root's image sizes
    tokens: dict[str, float]  # views -> mean tokens per image
    bytes_per_image: dict[tuple[str, str], float]  # (views, encoding) -> bytes
    default_views: str = "all"  # what kvpipe extract stores by default (the dataset's tasks' needs)
    queries: int = 0  # text queries (class names, referring sentences)
    bytes_per_query: dict[str, float] = field(default_factory=dict)  # encoding -> bytes of one text query

    def total(self, views: str, encoding: str) -> float:
        return self.bytes_per_image[(views, encoding)] * self.images + self.queries * self.bytes_per_query[encoding]


def text_encoding(encoding: str, compute: str = "bfloat16") -> str:
    """How a store of ``encoding`` keeps its text queries (schema ``text_dtype``)."""
    from kvpipe.store.encoding import text_dtype_for

    return text_dtype_for(encoding, compute) or encoding


def _sizes_from_root(dataset: str, data_root: str, options: dict,
                     limit: int | None) -> tuple[list[tuple[int, int]], int]:
    """The (width, height) of the dataset's images, from their headers (PIL reads no pixels), and
    its number of text queries."""
    from PIL import Image

    from kvpipe.pipeline.datasets import create_dataset

    data = create_dataset(dataset, root=data_root, limit=limit, **options)
    records = data.records()
    out = []
    for r in records:
        try:
            with Image.open(r.source) as im:
                out.append(im.size)
        except (OSError, ValueError):
            img = r.load_image()  # synthetic and in-memory images
            out.append(img.size)
    return out, len(data.text_queries())


def make_plan(model: str, dataset: str, data_root: str | None = None, views: tuple[str, ...] = ("all", "base"),
              options: dict | None = None, limit: int | None = None, image_size: tuple[int, int] | None = None) -> Plan:
    from kvpipe.pipeline.datasets.typical import TYPICAL
    from kvpipe.pipeline.models.sizes import bytes_per_token, model_size

    size = model_size(model)
    if not size.rule.multi_view:
        views = ("all",)  # one view per image: base and all are the same tokens
    if data_root is not None or dataset not in TYPICAL:
        if data_root is None and dataset != "synthetic" and not dataset.startswith("hf:"):
            raise UsageError(f"--dataset {dataset}: kvpipe plan knows the typical images of "
                             f"{', '.join(TYPICAL)}; for another dataset give --data-root")
        sizes, queries = _sizes_from_root(dataset, data_root, options or {}, limit)
        source = data_root or "generated"
    else:
        t = TYPICAL[dataset]
        sizes = [(t.width, t.height)] * (min(t.images, limit) if limit else t.images)
        queries = t.queries
        source = f"typical: {t.what}, {t.width}x{t.height}" + (f", {t.queries} text queries" if t.queries else "")
    if image_size is not None:
        sizes = [image_size] * len(sizes)
    if not sizes:
        raise UsageError(f"--dataset {dataset} has no images to plan for")
    tokens = {v: sum(size.rule.tokens(w, h, v) for w, h in sizes) / len(sizes) for v in views}
    per = {(v, e): tokens[v] * bytes_per_token(size, e) for v in views for e in ENCODINGS}
    per_query = {e: bytes_per_token(size, text_encoding(e)) for e in ENCODINGS}  # a query: one token's K/V
    return Plan(model, dataset, len(sizes), source, tokens, per, _default_views(dataset, size.rule.multi_view),
                queries, per_query)


def _default_views(dataset: str, multi_view: bool) -> str:
    from kvpipe.pipeline.datasets import DATASETS
    from kvpipe.probes.base import views_for

    if not multi_view or dataset.startswith("hf:"):
        return "all"
    return views_for(list(DATASETS.get(dataset).tasks))[0]


def estimate_bytes(cfg, views: str) -> float | None:
    """The planned store size of an extraction (None when kvpipe has no token rules for the model,
    or for an hf: dataset).
    ``--dtype auto`` is counted as bfloat16, what it means on a GPU."""
    from kvpipe.pipeline.models.options import dtype_name
    from kvpipe.pipeline.models.sizes import SIZES, bytes_per_token

    if cfg.model not in SIZES or cfg.dataset.startswith("hf:"):
        return None  # an hf: dataset's images would be decoded twice to learn their sizes
    plan = make_plan(cfg.model, cfg.dataset, cfg.data_root, (views,), cfg.dataset_options, cfg.limit, cfg.image_size)
    compute = dtype_name(cfg.dtype)
    compute = "bfloat16" if compute == "auto" else compute
    encoding = cfg.store_dtype or compute
    tokens = plan.tokens[views if views in plan.tokens else "all"]  # a one-view model: the same either way
    size = SIZES[cfg.model]
    return (tokens * bytes_per_token(size, encoding) * plan.images
            + plan.queries * bytes_per_token(size, text_encoding(encoding, compute)))


def nearest_existing(path: str) -> Path:
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_disk(cfg, views: str) -> None:
    """A one-line UsageError when --out's disk cannot hold the planned store (``--force`` skips)."""
    if cfg.force or "://" in cfg.out or "://" in (cfg.data_root or ""):
        return  # an object store has no disk to fill; remote images are not opened twice
    need = estimate_bytes(cfg, views)
    if need is None:
        return
    out = Path(cfg.out).expanduser()
    if out.is_dir():  # a resumed store: what is already written counts (another run may be writing it)
        need -= LocalLocation(out).size()
    free = shutil.disk_usage(nearest_existing(cfg.out)).free
    if need > free:
        raise UsageError(f"--out {cfg.out}: the store needs about {need / GB:.1f} GB (kvpipe plan), the disk has "
                         f"{free / GB:.1f} GB free; free space, use --store-dtype int8/int4 or --views base, "
                         f"or pass --force")


def choose_views(cfg, views: str | None, tasks: str | None):
    """``cfg`` with --views decided: as given, or what the store's tasks need (probes.base.views_for);
    a one-line error for --views base with a task whose defaults read the crops."""
    from kvpipe.pipeline.datasets import create_dataset
    from kvpipe.probes.base import PROBES, views_for

    if tasks is not None:
        names = [t.strip() for t in tasks.split(",") if t.strip()]
        for t in names:
            PROBES.get(t)  # a misspelt task: one line listing the known ones
    else:
        ds = create_dataset(cfg.dataset, root=cfg.data_root, split=cfg.split, limit=cfg.limit, **cfg.dataset_options)
        names = [t for t in ds.tasks if t in PROBES]
    need, why = views_for(names)
    if views is None:
        cfg = replace(cfg, views=need, views_reason=why)
    elif views == "base" and need == "all":
        raise UsageError(f"--views base: {why}; use --views all, or name the tasks the store serves with --tasks")
    else:
        cfg = replace(cfg, views=views, views_reason="--views")
    from kvpipe.pipeline.extraction.config import validate_views

    validate_views(cfg)
    check_disk(cfg, cfg.views)
    return cfg


def print_plan(plans: list[Plan]) -> None:
    """One row per dataset and view choice (* marks what kvpipe extract stores by default: the
    views the dataset's tasks read); with several datasets, their sum per view choice."""
    table = Table("model", "dataset", "images", "views", "tokens / image",
                  *[f"{e} MB / image" for e in ENCODINGS], *[f"{e} total GB" for e in ENCODINGS])
    for p in plans:
        for v in p.tokens:
            mark = "*" if v == p.default_views and len(p.tokens) > 1 else ""
            table.add_row(p.model, p.dataset, str(p.images), v + mark, f"{p.tokens[v]:.0f}",
                          *[f"{p.bytes_per_image[(v, e)] / 1e6:.1f}" for e in ENCODINGS],
                          *[f"{p.total(v, e) / GB:.1f}" for e in ENCODINGS])
    if len(plans) > 1:
        rows = [("all", lambda p: "all"), ("base", lambda p: "base"), ("default *", lambda p: p.default_views)]
        for label, pick in rows[: 1 if len(plans[0].tokens) == 1 else 3]:
            table.add_row(plans[0].model, "total", str(sum(p.images for p in plans)), label, "",
                          *[""] * len(ENCODINGS),
                          *[f"{sum(p.total(pick(p), e) for p in plans) / GB:.1f}" for e in ENCODINGS])
    console.print(table)
    for p in plans:
        console.print(f"{p.model} / {p.dataset}: {p.source}", soft_wrap=True, highlight=False)
    console.print("bf16 is lossless (zstd at the ratio measured on 7B K/V); int8, int4, pca lossy: see "
                  "docs/BENCHMARKS.md; pca varies with the features (the ratio measured on random-weight "
                  "Qwen2.5-VL-7B, an upper estimate); the totals include the text queries, lossless (bf16) in "
                  "every encoding",
                  soft_wrap=True, highlight=False)


def register(app: typer.Typer) -> None:
    @app.command()
    def plan(
        model: str = typer.Option(..., help="registry name (qwen25vl, llava-ov, ...; see kvpipe models)"),
        dataset: str = typer.Option(..., help="registry name, or 'paper' for every dataset of the paper"),
        data_root: Annotated[Optional[str], typer.Option(help="the dataset's directory: plan from its images' "
                                                              "sizes (default: its typical count and size)")] = None,
        tasks: Annotated[Optional[str], typer.Option(help="the probes the store serves (default: the dataset's); "
                                                          "they decide the default views")] = None,
        views: Annotated[Optional[str], typer.Option(help="base | all (default: both rows)")] = None,
        limit: Annotated[Optional[int], typer.Option(help="only the first N images")] = None,
        option: list[str] = typer.Option([], help="dataset option KEY=VALUE (repeatable)"),
    ) -> None:
        """Images, tokens and bytes per image, and the total, per encoding and view choice, before anything runs."""
        from kvpipe.cli.common import parse_params
        from kvpipe.pipeline.datasets.typical import PAPER_DATASETS
        from kvpipe.probes.base import PROBES, views_for

        if views is not None and views not in ("base", "all"):
            raise UsageError(f"--views must be base or all, not {views!r}")
        if tasks is not None:
            names = [t.strip() for t in tasks.split(",") if t.strip()]
            for t in names:
                PROBES.get(t)
            need, why = views_for(names)
            if views == "base" and need == "all":
                raise UsageError(f"--views base: {why}; use --views all")
        datasets = PAPER_DATASETS if dataset == "paper" else (dataset,)
        rows = (views,) if views else ("all", "base")
        print_plan([make_plan(model, d, data_root, rows, parse_params(option, "--option"), limit) for d in datasets])
