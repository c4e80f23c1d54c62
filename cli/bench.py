"""``kvpipe bench``: speed measurements with ratios against baselines run in the same process."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

bench_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Benchmarks (see docs/BENCHMARKS.md).")


@bench_app.command("extract")
def bench_extract_cmd(
    model: str = typer.Option("qwen25vl", help="registry name"),
    init: str = typer.Option("random", help="random (full-size architecture, random weights) | pretrained"),
    dtype: str = typer.Option("auto", help="compute dtype: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | "
                                           "bfloat16 | float16"),
    device: str = typer.Option("auto", help="auto (the first GPU when there is one, else the CPU) | cpu | cuda:0"),
    size: int = typer.Option(448, help="square image side in pixels"),
    images: int = typer.Option(64, help="images for the floor and kvpipe runs"),
    batch_size: int = typer.Option(8, help="images per forward pass"),
    part_size: int = typer.Option(32, help="images per store part"),
    naive_images: int = typer.Option(16, help="images for the hand-written loop"),
    kinds: Optional[str] = typer.Option(None, help="what kvpipe stores (default: keys,values of an MLM, "
                                                  "hidden of a vision encoder)"),
    layers: str = typer.Option("all", help="layers kvpipe stores"),
    heads: str = typer.Option("all", help="KV heads kvpipe stores"),
    store_dtype: Optional[str] = typer.Option(None, help="on-disk dtype (default: --dtype): float32 | float16 | "
                                                          "bfloat16 | int8 | int4 | pca"),
    views: str = typer.Option("all", help="all | base (an any-resolution model's base view only)"),
    codec: str = typer.Option("zstd", help="store codec: zstd | lz4bit | lz4 | zstd3"),
    runs: str = typer.Option("floor-hf,floor-kvpipe,kvpipe,naive", help="which runs"),
    rounds: int = typer.Option(1, min=1, help="repeat the extraction runs in rounds of alternating order and "
                                              "report each run's median"),
    json_out: Optional[Path] = typer.Option(None, "--json", help="also write the figures as JSON"),
) -> None:
    """Floor (model prefill), kvpipe extraction and a hand-written loop on the same images."""
    from kvpipe.benchmarks.extract_bench import BenchConfig, bench_extract

    cfg = BenchConfig(model=model, init=init, dtype=dtype, device=device, size=size, images=images,
                      batch_size=batch_size, part_size=part_size, naive_images=naive_images, kinds=kinds,
                      layers=layers, heads=heads, store_dtype=store_dtype, codec=codec, views=views,
                      runs=tuple(r.strip() for r in runs.split(",") if r.strip()), rounds=rounds)
    result = bench_extract(cfg, log=typer.echo)
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2))
