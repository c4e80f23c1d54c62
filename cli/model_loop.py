"""``kvpipe answer`` and ``kvpipe intervene``: the commands that need the model in the loop.

Thin: options -> ``kvpipe.pipeline.evaluation.evaluate`` / ``kvpipe.pipeline.evaluation.intervene``; benchmarks come
from the ``BENCHMARKS`` registry by name. Registered on the main app by ``register(app)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from kvpipe.cli.common import console, parse_params
from kvpipe.errors import DataError, UsageError

HEAD_KINDS = "input-agnostic | input-dependent | random"

# Options that ``answer`` and ``intervene`` share (typer reads each as metadata per command).
DATA_ROOT = typer.Option(None, help="the benchmark's files in its official layout")
SPLIT = typer.Option(None, help="the benchmark's --split: POPE split, MME categories, CV-Bench tasks, BLINK sub-tasks "
                                "or its data split val|test (default: the reader's)")
LIMIT = typer.Option(None, help="answer only the first N questions")
DEVICE = typer.Option("auto", help="auto (the first GPU when there is one, else the CPU) | cpu | cuda:0 ...")
DTYPE = typer.Option("auto", help="compute dtype: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 | "
                                  "float16 (or fp32, bf16, fp16)")
INIT = typer.Option("pretrained", help="pretrained | random")
REVISION = typer.Option(None, help="hub revision (branch, tag or commit)")
BATCH_SIZE = typer.Option(8, help="questions per generate call")
MAX_NEW_TOKENS = typer.Option(None, help="greedy decoding length (default: the benchmark's, else 128)")
BENCHMARK_OPTION = typer.Option([], help="benchmark option KEY=VALUE (repeatable), e.g. parser=pope, "
                                          "subtask=Art_Style (blink, as kvpipe extract spells it)")
SEED = typer.Option(0, help="model seed: the weights of --init random and tiny models")



def _benchmark(name: str, data_root: Optional[str], split: Optional[str], limit: Optional[int],
               option: list[str]):
    from kvpipe.pipeline.vqa import create_benchmark  # importing the package registers the readers

    bench = create_benchmark(name, data_root, split, limit, **parse_params(option, "--option"))
    items = bench.items()
    if not items:
        raise DataError(f"--benchmark {name} found no questions under {data_root} (split {split or 'default'})")
    return bench, items


def _max_new_tokens(bench: Any, given: Optional[int]) -> int:
    from kvpipe.pipeline.evaluation.answer import DEFAULT_MAX_NEW_TOKENS

    if given is not None:
        if given < 1:
            raise UsageError(f"--max-new-tokens must be at least 1, not {given}")
        return given
    return int(getattr(bench, "max_new_tokens", None) or DEFAULT_MAX_NEW_TOKENS)


@contextmanager
def _progress(total: int) -> Iterator[Callable[[str, int], None]]:
    from kvpipe.cli.progress import RateColumn

    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), RateColumn("q"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console) as bar:
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
    seed: int = SEED,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    option: list[str] = BENCHMARK_OPTION,
) -> None:
    """Answer a benchmark's questions with the model (greedy); write answers and scores."""
    params = dict(locals())
    from kvpipe.pipeline.evaluation.evaluate import check_reusable, evaluate
    from kvpipe.pipeline.models import load_model
    from kvpipe.provenance import provenance

    called = provenance("answer", params)
    _check_batch(batch_size)
    bench, items = _benchmark(benchmark, data_root, split, limit, option)
    out = out or Path("kvpipe-answers") / _slug(f"{benchmark}-{model}")
    tokens = _max_new_tokens(bench, max_new_tokens)
    check_reusable(out, _expected(model, init, seed, bench, items, tokens))
    adapter = load_model(model, dtype=dtype, device=device, init=init, revision=revision, seed=seed)
    with _progress(len(items)) as advance:
        res = evaluate(adapter, bench, items, out, max_new_tokens=tokens, batch_size=batch_size,
                       progress=lambda n: advance(benchmark, n), provenance=called)
    table = Table("subset", "metric", "value", title=f"{res.answers[0]['model']} on {benchmark}")
    for r in res.scores:
        table.add_row(r["subset"], r["metric"], f"{r['value']:.4g}")
    console.print(table)
    console.print(f"{len(items)} questions ({res.generated} answered now, {res.reused} reused) -> "
                  f"{out / 'answers.parquet'}, {out / 'scores.csv'}")


def intervene(
    model: str = typer.Option(..., help="registry name, hub id or checkpoint directory (the store's model)"),
    store: str = typer.Option(..., help="a store on which `kvpipe probe --task input-agnostic` has run"),
    heads: str = typer.Option(..., help=f"head sets to knock out, comma-separated: {HEAD_KINDS} (the last two are "
                                        f"the paper's controls: as many heads per layer as input-agnostic ones)"),
    layers: str = typer.Option(..., help="early | middle | late (the paper's 8/10/10 of 28 layers, scaled) "
                                         "or layers such as 10-20 or 3,5,7"),
    benchmark: str = typer.Option(..., help="benchmark name (pope, mme, ...)"),
    out: Path = typer.Option(..., help="output directory: the baseline in OUT itself (as kvpipe answer writes it; "
                                       "one already there is reused), OUT/<condition>/ per head set, "
                                       "OUT/knockout.csv (every condition run into OUT)"),
    data_root: Optional[str] = DATA_ROOT,
    split: Optional[str] = SPLIT,
    limit: Optional[int] = LIMIT,
    threshold: Optional[float] = typer.Option(None, help="key-variance threshold for input-agnostic heads "
                                                         "(default: the probe's)"),
    control_seed: int = typer.Option(0, help="seed of the controls' draw (input-dependent, random)"),
    seed: int = SEED,
    device: str = DEVICE,
    dtype: str = DTYPE,
    init: str = INIT,
    revision: Optional[str] = REVISION,
    batch_size: int = BATCH_SIZE,
    max_new_tokens: Optional[int] = MAX_NEW_TOKENS,
    option: list[str] = BENCHMARK_OPTION,
) -> None:
    """Knock-out: the benchmark with text queries blocked from head sets' image keys, and without."""
    params = dict(locals())
    from kvpipe.pipeline.evaluation.evaluate import check_reusable
    from kvpipe.pipeline.evaluation.head_sets import HEAD_SETS
    from kvpipe.pipeline.evaluation.intervene import knockout_condition, run_intervention
    from kvpipe.pipeline.models import load_model
    from kvpipe.probes.runner import results_dir
    from kvpipe.provenance import provenance
    from kvpipe.store import FeatureStore

    called = provenance("intervene", params)
    _check_batch(batch_size)
    kinds = list(dict.fromkeys(h.strip() for h in heads.split(",") if h.strip()))
    if not kinds:
        raise UsageError(f"--heads names no head set; give one or more of {HEAD_KINDS}")
    for kind in kinds:
        HEAD_SETS.get(kind)
    fs = FeatureStore.open(store)
    meta = fs.meta
    _same_model(store, meta.model, _registry_source(model, init, revision, seed), model)
    table = results_dir(fs.root) / "input-agnostic" / "results.parquet"
    conditions = [knockout_condition(table, heads=kind, layers=layers, n_layers=meta.n_layers,
                                     n_kv_heads=meta.n_kv_heads, threshold=threshold, control_seed=control_seed,
                                     store=str(store)) for kind in kinds]
    bench, items = _benchmark(benchmark, data_root, split, limit, option)
    tokens = _max_new_tokens(bench, max_new_tokens)
    expected = _expected(model, init, seed, bench, items, tokens)
    check_reusable(out, {**expected, "condition": {"name": "none", "heads": []}})
    for cond in conditions:
        check_reusable(out / cond.name, {**expected, "condition": cond.to_dict()})
    adapter = load_model(model, dtype=dtype, device=device, init=init, revision=revision, seed=seed)
    _same_model(store, meta.model, adapter.source, model)
    if (adapter.n_layers, adapter.n_kv_heads) != (meta.n_layers, meta.n_kv_heads):
        raise UsageError(f"--store {store} was extracted from a model with {meta.n_layers} layers x "
                         f"{meta.n_kv_heads} KV heads, --model {model} has {adapter.n_layers} x {adapter.n_kv_heads}")
    for cond in conditions:
        pairs = ", ".join(f"({l}, {h})" for l, h in sorted(cond.heads))
        shared = cond.details.get("overlap_with_treatment")
        if shared is not None:
            pairs += f"; {shared} of them input-agnostic (of {cond.details['treatment_heads']})"
        console.print(f"knock-out {cond.name}: {len(cond.heads)} (layer, KV head) pairs: {pairs}", highlight=False)
    with _progress(len(items)) as advance:
        res = run_intervention(adapter, bench, items, out, conditions, max_new_tokens=tokens,
                               batch_size=batch_size, progress=advance, provenance=called)
    names = ["none", *(c.name for c in conditions)]
    values: dict[tuple[str, str], dict[str, float]] = {}
    for r in res.rows:
        values.setdefault((r["subset"], r["metric"]), {})[r["condition"]] = r["value"]
    view = Table("subset", "metric", *names, *(f"change ({n})" for n in names[1:]),
                 title=f"{adapter.source.get('name')} on {benchmark}")
    for (subset, metric), v in values.items():
        base = v.get(names[0])
        changes = [f"{v[n] - base:+.4g}" if base is not None and n in v else "" for n in names[1:]]
        view.add_row(subset, metric, *(f"{v[n]:.4g}" if n in v else "" for n in names), *changes)
    console.print(view)
    console.print(f"{len(items)} questions per condition -> {res.table} (every condition run into {out}; answers "
                  f"in {out}/answers.parquet and {out}/<condition>/answers.parquet)")


def _expected(model: str, init: str, seed: int, bench: Any, items: list, max_new_tokens: int) -> dict[str, Any]:
    """What an output folder's run.json must say, as far as it is known before the model loads."""
    from kvpipe.pipeline.evaluation.evaluate import benchmark_record

    return {"model": model, **benchmark_record(bench, items, max_new_tokens)}


def _registry_source(model: str, init: str, revision: Optional[str], seed: int) -> dict[str, Any] | None:
    """The provenance ``load_model`` will give a registry name, known from the catalog without
    loading anything (None for hub ids and directories: known once loaded)."""
    from kvpipe.pipeline.models.catalog import MODELS

    if model not in MODELS:
        return None
    entry = MODELS.get(model)
    if entry.tiny or init == "random":
        return {"name": model, "checkpoint": None, "init": "random", "seed": seed}
    return {"name": model, "checkpoint": entry.checkpoint or model, "revision": revision, "init": "pretrained"}


def _same_model(store: str, stored: dict[str, Any], source: dict[str, Any] | None, model: str) -> None:
    from kvpipe.provenance import model_mismatch

    other = model_mismatch(stored, source) if source is not None else None
    if other:
        raise UsageError(f"--store {store} was extracted from another model than --model {model} ({other}); "
                         f"knock out heads of the model that made the store")


def _check_batch(batch_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"--batch-size must be at least 1, not {batch_size}")


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def register(app: typer.Typer) -> None:
    app.command()(answer)
    app.command()(intervene)
