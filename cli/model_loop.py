"""``kvpipe answer`` and ``kvpipe intervene``: the commands that need the model in the loop.

Thin: options -> ``kvpipe.pipeline.evaluate`` / ``kvpipe.pipeline.intervene``; benchmarks come
from the ``BENCHMARKS`` registry by name. Registered on the main app by ``register(app)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvpipe.errors import DataError, UsageError

HEAD_KINDS = "input-agnostic | input-dependent | random"

# Options that ``answer`` and ``intervene`` share (typer reads each as metadata per command).
DATA_ROOT = typer.Option(None, help="the benchmark's files in its official layout")
SPLIT = typer.Option(None, help="benchmark split (default: the reader's)")
LIMIT = typer.Option(None, help="answer only the first N questions")
DEVICE = typer.Option("cpu", help="torch device, e.g. cuda:0")
DTYPE = typer.Option("float32", help="compute dtype: float32 | bfloat16 | float16")
INIT = typer.Option("pretrained", help="pretrained | random")
REVISION = typer.Option(None, help="hub revision (branch, tag or commit)")
BATCH_SIZE = typer.Option(8, help="questions per generate call")
MAX_NEW_TOKENS = typer.Option(None, help="greedy decoding length (default: the benchmark's, else 128)")
BENCHMARK_OPTION = typer.Option([], help="benchmark option KEY=VALUE (repeatable), e.g. parser=pope")


def _console() -> Console:
    from kvpipe.cli.app import console

    return console


def _benchmark(name: str, data_root: Optional[str], split: Optional[str], limit: Optional[int],
               option: list[str]):
    from kvpipe.cli.app import _parse_params
    from kvpipe.pipeline.vqa import create_benchmark  # importing the package registers the readers

    bench = create_benchmark(name, data_root, split, limit, **_parse_params(option, "--option"))
    items = bench.items()
    if not items:
        raise DataError(f"--benchmark {name} found no questions under {data_root} (split {split or 'default'})")
    return bench, items


def _max_new_tokens(bench: Any, given: Optional[int]) -> int:
    from kvpipe.pipeline.answer import DEFAULT_MAX_NEW_TOKENS

    if given is not None:
        if given < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, not {given}")
        return given
    return int(getattr(bench, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str, int], None]]:
    from kvpipe.cli.progress import RateColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn("q"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=_console()) as bar:
        tasks: dict[str, Any] = {}

        def advance(name: str, n: int) -> None:
            if name not in tasks:
                tasks[name] = bar.add_task(name, total=total)
            bar.advance(tasks[name], n)

        yield advance


def answer(
    model: str = typer.Option(..., help="registry name (see `kvpipe models`), hub id or checkpoint directory"),
    benchmark: str = typer.Option(..., help="benchmark name (pope, mme, blink, cvbench, spair-vqa, ...)"),
    data_root: Optional[str] = DATA_ROOT,
    split: Optional[str] = SPLIT,
    limit: Optional[int] = LIMIT,
    out: Optional[Path] = typer.Option(None, help="output directory (default: kvpipe-answers/BENCHMARK-MODEL); "
                                                  "answers already there are reused"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    init: str = INIT,
    revision: Optional[str] = REVISION,
    seed: int = typer.Option(0, help="seed for --init random and tiny models"),
    batch_size: int = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    option: list[str] = BENCHMARK_OPTION,
) -> None:
    """Answer a benchmark's questions with the model (greedy); write answers and scores."""
    from kvpipe.pipeline.evaluate import evaluate
    from kvpipe.pipeline.models import load_model

    _check_batch(batch_size)
    bench, items = _benchmark(benchmark, data_root, split, limit, option)
    out = out or Path("kvpipe-answers") / _slug(f"{benchmark}-{model}")
    adapter = load_model(model, dtype=dtype, device=device, init=init, revision=revision, seed=seed)
    with _progress(len(items)) as advance:
        res = evaluate(adapter, bench, items, out, max_new_tokens=_max_new_tokens(bench, max_new_tokens),
                       batch_size=batch_size, progress=lambda n: advance(benchmark, n))
    console = _console()
    table = Table("subset", "metric", "value", title=f"{res.answers[0]['model']} on {benchmark}")
    for r in res.scores:
        table.add_row(r["subset"], r["metric"], f"{r['value']:.4g}")
    console.print(table)
    console.print(f"{len(items)} questions ({res.generated} answered now, {res.reused} reused) -> "
                  f"{out / 'answers.parquet'}, {out / 'scores.csv'}")


def intervene(
    model: str = typer.Option(..., help="registry name, hub id or checkpoint directory (the store's model)"),
    store: str = typer.Option(..., help="a store on which `kvpipe probe --task input-agnostic` has run"),
    heads: str = typer.Option(..., help=f"head set to knock out: {HEAD_KINDS} (the last two are the paper's "
                                        f"controls: as many heads per layer as input-agnostic ones)"),
    layers: str = typer.Option(..., help="early | middle | late (the paper's 8/10/10 of 28 layers, scaled) "
                                         "or layers such as 10-20 or 3,5,7"),
    benchmark: str = typer.Option(..., help="benchmark name (pope, mme, ...)"),
    out: Path = typer.Option(..., help="output directory: OUT/none (baseline), OUT/<head set>, OUT/scores.csv; "
                                       "answers already there are reused"),
    data_root: Optional[str] = DATA_ROOT,
    split: Optional[str] = SPLIT,
    limit: Optional[int] = LIMIT,
    threshold: Optional[float] = typer.Option(None, help="key-variance threshold for input-agnostic heads "
                                                         "(default: the probe's)"),
    seed: int = typer.Option(0, help="seed of the random controls (input-dependent, random)"),
    model_seed: int = typer.Option(0, help="seed for --init random and tiny models"),
    device: str = DEVICE,
    dtype: str = DTYPE,
    init: str = INIT,
    revision: Optional[str] = REVISION,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    option: list[str] = BENCHMARK_OPTION,
) -> None:
    """Knock-out: the benchmark with text queries blocked from a head set's image keys, and without."""
    from kvpipe.pipeline.head_sets import HEAD_SETS
    from kvpipe.pipeline.intervene import knockout_condition, run_intervention
    from kvpipe.pipeline.models import load_model
    from kvpipe.probes.runner import results_dir
    from kvpipe.store import FeatureStore

    _check_batch(batch_size)
    HEAD_SETS.get(heads)
    fs = FeatureStore.open(store)
    meta = fs.meta
    condition = knockout_condition(results_dir(fs.root) / "input-agnostic" / "results.parquet", heads=heads,
                                   layers=layers, n_layers=meta.n_layers, n_kv_heads=meta.n_kv_heads,
                                   threshold=threshold, seed=seed, store=str(store))
    bench, items = _benchmark(benchmark, data_root, split, limit, option)
    adapter = load_model(model, dtype=dtype, device=device, init=init, revision=revision, seed=model_seed)
    if (adapter.n_layers, adapter.n_kv_heads) != (meta.n_layers, meta.n_kv_heads):
        raise UsageError(f"--store {store} was extracted from a model with {meta.n_layers} layers x "
                         f"{meta.n_kv_heads} KV heads, --model {model} has {adapter.n_layers} x {adapter.n_kv_heads}")
    console = _console()
    if meta.model.name != adapter.source.get("name"):
        console.print(f"[yellow]note[/]: the store was extracted with {meta.model.name}, answering with "
                      f"{adapter.source.get('name')}")
    pairs = ", ".join(f"({l}, {h})" for l, h in sorted(condition.heads))
    console.print(f"knock-out {condition.name}: {len(condition.heads)} (layer, KV head) pairs: {pairs}",
                  highlight=False)
    with _progress(len(items)) as advance:
        res = run_intervention(adapter, bench, items, out, condition,
                               max_new_tokens=_max_new_tokens(bench, max_new_tokens), batch_size=batch_size,
                               progress=advance)
    names = ["none", condition.name]
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in res.rows:
        values.setdefault((r["subset"], r["metric"]), {})[r["condition"]] = r["value"]
    table = Table("subset", "metric", *names, "change", title=f"{adapter.source.get('name')} on {benchmark}")
    for (subset, metric), v in values.items():
        a, b = v.get(names[0]), v.get(names[1])
        change = f"{b - a:+.4g}" if a is not None and b is not None else ""
        table.add_row(subset, metric, *(f"{v[n]:.4g}" if n in v else "" for n in names), change)
    console.print(table)
    console.print(f"{len(items)} questions per condition -> {res.table} (and {out}/<condition>/answers.parquet)")


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def register(app: typer.Typer) -> None:
    app.command()(answer)
    app.command()(intervene)
