"""The ``kvpipe`` command line: parse, call library functions, print.

Thin on purpose: every command maps its options onto one library call. Errors the user can
cause are ``KvpipeError``s, caught once in ``main`` and printed as one line (exit code 2).
Model code is imported only by the commands that need a model, so probing a store never
loads torch models or transformers.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from kvpipe.cli.common import STORE_ARG, STORE_OPT, console, err_console, one_store, parse_params
from kvpipe.errors import KvpipeError, UsageError


def _version(value: bool) -> None:
    if value:
        import kvpipe

        console.print(f"kvpipe {kvpipe.__version__}")
        raise typer.Exit()


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Extract image keys/values of multimodal LMs into a Zarr store; probe them.")


@app.callback()
def _global(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                         help="print kvpipe's version and exit")) -> None:
    """Extract image keys/values of multimodal LMs into a Zarr store; probe them."""


def _add_subcommands() -> None:
    from kvpipe.cli.bench import bench_app
    from kvpipe.cli.model_loop import register as register_model_loop
    from kvpipe.cli.paired import register as register_paired
    from kvpipe.cli.paper import register as register_paper
    from kvpipe.cli.plan import register as register_plan
    from kvpipe.cli.prefix import register as register_prefix

    app.add_typer(bench_app, name="bench")
    register_model_loop(app)  # answer, intervene
    register_paired(app)  # paired, figure3
    register_prefix(app)  # report-prefix
    register_paper(app)  # paper: the paper's tables and figures
    register_plan(app)  # plan


_add_subcommands()


@app.command()
def extract(
    model: str = typer.Option(..., help="registry name (see `kvpipe models`), hub id or checkpoint directory"),
    dataset: str = typer.Option(..., help="registry name (see `kvpipe datasets`), or hf:PATH_OR_ID for any image "
                                          "dataset the datasets library reads (save_to_disk, parquet, hub id)"),
    out: str = typer.Option(..., help="store directory or fsspec URL such as s3://bucket/store (created, or "
                                      "resumed if it holds this feature set)"),
    data_root: Optional[str] = typer.Option(None, help="dataset directory in the dataset's official layout"),
    split: Optional[str] = typer.Option(None, help="dataset split (default: the adapter's)"),
    limit: Optional[int] = typer.Option(None, help="use only the first N images"),
    init: str = typer.Option("pretrained", help="pretrained | random (full-size architecture, random weights)"),
    revision: Optional[str] = typer.Option(None, help="hub revision (branch, tag or commit)"),
    dtype: str = typer.Option("auto", help="compute dtype: auto (bfloat16 on a GPU, float32 on a CPU) | float32 | "
                                           "bfloat16 | float16 (or fp32, bf16, fp16)"),
    device: str = typer.Option("auto", help="auto (the first GPU when there is one, else the CPU) | cpu | cuda:0 ..."),
    prefix: str = typer.Option("", help="text placed right before the image"),
    prefix_from: Annotated[Optional[str], typer.Option(help="per-image prefix: caption | class | domain (from what "
                                                            "the dataset knows of each image)")] = None,
    prefix_control: Annotated[str, typer.Option(help="none | random (the paper's fixed random sentence) | "
                                                     "incorrect (another class / the other domain)")] = "none",
    template: str = typer.Option("chat", help="chat (the model's own template) | none (prefix + image only)"),
    keys: Optional[str] = typer.Option(None, help="post-rope (as cached; default) | pre-rope (k_proj output); "
                                                   "MLMs only"),
    layers: str = typer.Option("all", help="layers to store: all | 0-13,20 | -1"),
    heads: str = typer.Option("all", help="KV heads to store: all | 0,2"),
    kinds: Optional[str] = typer.Option(None, help="comma list of keys, values, post_proj (an MLM's; default: all "
                                                    "three) or hidden (a vision encoder's block outputs; its default)"),
    store_dtype: Optional[str] = typer.Option(None, help="float32 | float16 | bfloat16 (default: --dtype) | int8 (lossy: "
                                                          "8-bit codes and a scale per token, half of bf16) | int4 "
                                                          "(lossy: rotated 4-bit codes, a scale and zero point per "
                                                          "token, about a quarter of bf16) | pca (lossy: each part's "
                                                          "(layer, head) coded in its own principal components, about "
                                                          "a quarter of bf16's zstd size)"),
    views: Annotated[Optional[str], typer.Option(help="base (an any-resolution model's base view only: what the "
                                                      "probes read) | all (crops/tiles too); default: what --tasks "
                                                      "need")] = None,
    tasks: Annotated[Optional[str], typer.Option(help="comma list of the probes the store will serve (default: "
                                                      "every task of the dataset); sets the default --views")] = None,
    force: Annotated[bool, typer.Option("--force", help="start even when the output disk looks too small for "
                                                        "the planned store (see kvpipe plan)")] = False,
    codec: str = typer.Option("zstd", help="lossless codec: zstd (smaller) | lz4bit (lz4, bit shuffle: faster to "
                                               "write and read) | lz4 | zstd3"),
    pca_step: Annotated[Optional[float], typer.Option(help="--store-dtype pca's step in units of a chunk's "
                                                           "typical RMS (default 0.35, int4's error; smaller: "
                                                           "closer to lossless, larger store)")] = None,
    batch_size: int = typer.Option(4, help="images per forward pass"),
    part_size: Optional[int] = typer.Option(None, help="images per store part, the unit of commit and resume "
                                                       "(default: whole batches, up to 32 images)"),
    strict: bool = typer.Option(False, help="stop at the first unreadable image instead of recording it"),
    seed: int = typer.Option(0, help="seed for --init random and tiny models"),
    executor: str = typer.Option("local", help="local (this process) | ray (one actor per GPU of a Ray cluster)"),
    ray_address: Optional[str] = typer.Option(None, help="Ray cluster HOST:PORT, ray://HOST:PORT or auto "
                                                         "(default: RAY_ADDRESS, else a local Ray)"),
    workers: Optional[int] = typer.Option(None, help="Ray actors (default: one per GPU of the cluster; 1 on CPU)"),
    repair: bool = typer.Option(False, help="redo only the parts kvpipe verify finds damaged (and unfinished ones)"),
    option: list[str] = typer.Option([], help="dataset option KEY=VALUE (repeatable), e.g. fold=1 for pascal5i; "
                                              "see `kvpipe datasets`"),
    image_size: Annotated[Optional[str], typer.Option(help="WIDTHxHEIGHT: resize every image to this size before "
                                                           "the model's processor (one token layout for "
                                                           "native-resolution models such as qwen25vl; "
                                                           "input-agnostic's per-position variance needs it)")] = None,
    multi_image: Annotated[bool, typer.Option("--multi-image", help="each question's images in one prompt, the one "
                                                                    "kvpipe answer shows the model (dataset blink; "
                                                                    "the paired tasks read these rows)")] = False,
) -> None:
    """Run the model once per image and store every layer's and head's image K/V."""
    from kvpipe.cli.plan import choose_views
    from kvpipe.cli.progress import extraction_progress
    from kvpipe.pipeline.extraction.config import ExtractConfig, parse_image_size, validate

    cfg = ExtractConfig(model=model, dataset=dataset, out=str(out), data_root=data_root, split=split,
                        limit=limit, init=init, revision=revision, dtype=dtype, device=device,
                        prefix=prefix, prefix_from=prefix_from, prefix_control=prefix_control,
                        template=template, keys=keys, layers=layers, heads=heads,
                        kinds=kinds, store_dtype=store_dtype, pca_step=pca_step, batch_size=batch_size,
                        part_size=part_size, strict=strict, seed=seed, executor=executor,
                        ray_address=ray_address, workers=workers, repair=repair,
                        dataset_options=parse_params(option, "--option"), codec=codec,
                        image_size=parse_image_size(image_size), multi_image=multi_image,
                        command="kvpipe " + " ".join(sys.argv[1:]), force=force)
    validate(cfg)  # usage errors answer before torch and the model are imported
    cfg = choose_views(cfg, views, tasks)
    from kvpipe.pipeline.extraction.job import extract as run_extract

    with extraction_progress(console) as (on_start, advance):
        res = run_extract(cfg, progress=advance, on_start=on_start)
    console.print(f"[bold]stored[/] {res.images_ok} images ({res.images_failed} failed) in "
                  f"{res.parts_done} new parts, {res.parts_skipped} already committed, "
                  f"{res.seconds:.1f} s -> {res.store}")
    if repair:
        console.print(f"repaired {len(res.parts_repaired)} damaged part(s)"
                      + (f": {', '.join(f'p{p:06d}' for p in res.parts_repaired)}" if res.parts_repaired else ""))
    for image_id, why in res.failures[:10]:
        console.print(f"  [yellow]failed[/] {image_id}: {why}")


@app.command()
def probe(
    task: str = typer.Option(..., help="probe name (see `kvpipe tasks`) or all (every task the store's dataset supports)"),
    store: str = typer.Option(..., help="a store made by kvpipe extract (directory or URL)"),
    out: Optional[Path] = typer.Option(None, help="results directory (default: STORE/probes/TASK; "
                                                  "with --task all, OUT/TASK)"),
    param: list[str] = typer.Option([], help="probe parameter KEY=VALUE (repeatable); with --task all it "
                                             "goes to every task that has that parameter"),
    no_cache: bool = typer.Option(False, "--no-cache", help="recompute even if cached results exist"),
    allow_incomplete: bool = typer.Option(False, "--allow-incomplete",
                                          help="probe a store whose extraction has parts pending"),
    device: str = typer.Option("auto", help="where probes compute: auto (a GPU when torch sees one), cpu, "
                                            "cuda, cuda:N, or numpy (the float64 reference code)"),
    layers: Optional[str] = typer.Option(None, help="sweep these layers only, e.g. 0-13,20 (default: all stored)"),
    heads: Optional[str] = typer.Option(None, help="sweep these KV heads only, e.g. 0,2 (default: all stored)"),
    kinds: Optional[str] = typer.Option(None, help="sweep these kinds only, e.g. values or keys,post_proj "
                                                   "(default: all the probe scores)"),
    executor: str = typer.Option("local", help="who scores the targets: local (this process) or ray (actors over "
                                               "a Ray cluster, one per GPU)"),
    workers: Optional[int] = typer.Option(None, help="--executor ray: actors (default: the cluster's GPUs, or 2 "
                                                     "on CPU)"),
    ray_address: Optional[str] = typer.Option(None, help="--executor ray: the cluster (HOST:PORT, ray://HOST:PORT "
                                                         "or auto; default: RAY_ADDRESS, else a local one)"),
    save_predictions: str = typer.Option("best", help="write predicted masks / points under OUT/predictions at: "
                                                      "best (the best target of each kind) | all | none | "
                                                      "LAYER:HEAD:KIND[,...] (post_proj for the baseline)"),
    plots: Optional[bool] = typer.Option(None, "--plots/--no-plots", show_default=False,
                                         help="draw the figures (the default); --no-plots writes the tables only "
                                              "(a later cached run draws them)"),
) -> None:
    """Sweep a probe over every (layer, head, kind) + post-proj; write table, plots and predictions."""
    from kvpipe.probes import PROBES
    from kvpipe.probes.base import Selection
    from kvpipe.probes.executor import PROBE_EXECUTORS, ExecutorOptions
    from kvpipe.probes.predictions import SaveRequest
    from kvpipe.store import FeatureStore

    params = parse_params(param)
    if task != "all":
        PROBES.get(task)  # an unknown name is a one-line error listing the registered ones (no torch yet)
    scorer = PROBE_EXECUTORS.get(executor)()
    options = ExecutorOptions(workers=workers, address=ray_address)
    scorer.check(options)  # Ray missing, or nothing at --ray-address: one line, before any work
    meta = FeatureStore.open(store).meta
    selection = Selection.parse(meta, layers, heads, kinds)
    save = SaveRequest.parse(save_predictions, meta)
    if executor == "local":
        from kvpipe.probes.device import resolve_device

        device = resolve_device(device)  # a GPU asked for where there is none: one line, before any work
    dataset = meta.dataset
    supported = dataset.tasks
    if task != "all":
        if supported is not None and task not in supported:
            raise UsageError(f"task {task} needs annotations the dataset {dataset.name} does not have; "
                             f"it supports: {', '.join(supported) or 'no task'}")
        runs = [(task, params)]
    else:
        if not supported:
            raise UsageError(f"the dataset {dataset.name} of {store} lists no tasks; name one with --task "
                             f"(see kvpipe tasks)")
        for name in supported:
            if name not in PROBES:
                console.print(f"[yellow]skipped[/] {name}: no probe of that name is registered in this kvpipe")
        names = [t for t in supported if t in PROBES]
        if not names:
            raise UsageError(f"the dataset {dataset.name} supports {', '.join(supported)}, none of which "
                             f"is a registered probe ({', '.join(PROBES.names())})")
        for name in list(names):  # e.g. text-grounded tasks on a vision encoder's store
            why = PROBES.get(name).unavailable(meta)
            if why:
                console.print(f"[yellow]skipped[/] {name}: {why}", soft_wrap=True, highlight=False)
                names.remove(name)
        if not names:
            raise UsageError(f"no task of the dataset {dataset.name} can run on the store {store}")
        unused = set(params) - {k for t in names for k in PROBES.get(t).defaults}
        if unused:
            raise UsageError(f"no task of --task all has parameter {', '.join(sorted(unused))}")
        runs = [(t, {k: v for k, v in params.items() if k in PROBES.get(t).defaults}) for t in names]
    failed = []
    started_ray = False
    if executor == "ray":  # joined once for every task of --task all
        from kvpipe.raycluster import connect

        started_ray = connect(ray_address)
    try:
        _probe_runs(runs, task, out, store, no_cache, allow_incomplete, device, selection, executor, options,
                    save, plots, failed)
    finally:
        if started_ray:
            import ray

            ray.shutdown()
    if failed:
        console.print(f"[red]{len(failed)} of {len(runs)} tasks failed[/]: {', '.join(failed)}")
        raise typer.Exit(1)


def _probe_runs(runs, task, out, store, no_cache, allow_incomplete, device, selection, executor, options,
                save, plots, failed) -> None:
    """Each task's sweep with its progress bar; under --task all a failed task is reported and skipped."""
    from kvpipe.cli.progress import probe_progress
    from kvpipe.cli.render import print_probe_run
    from kvpipe.probes import run_probe

    for name, task_params in runs:
        target = out / name if (out and task == "all") else out
        try:
            with probe_progress(console, name) as advance:
                run = run_probe(store, name, task_params, target, use_cache=not no_cache, progress=advance,
                                allow_incomplete=allow_incomplete, device=device, selection=selection,
                                executor=executor, options=options, save_predictions=save, plots=plots)
        except KvpipeError as err:
            if task != "all":
                raise
            console.print(f"[red]failed[/] {name}: {err}", soft_wrap=True, highlight=False)
            failed.append(name)
            continue
        print_probe_run(console, run)


@app.command()
def report(
    store: str = typer.Option(..., help="a store on which kvpipe probe has run (directory or URL)"),
    out: Optional[Path] = typer.Option(None, help="FILE.md (Markdown, default RESULTS/report.md) or FILE.html"),
    results: Annotated[Optional[Path], typer.Option(help="directory of <task>/results.parquet (default: "
                                                         "STORE/probes, where kvpipe probe writes without --out)")] = None,
) -> None:
    """One page with the Table-1 summary (best layer/head per task vs post-proj) and every plot."""
    from kvpipe.probes.report import build_report

    path = build_report(store, out, results)
    console.print(f"report: {path}")


@app.command()
def show(
    store: str = typer.Option(..., help="a store made by kvpipe extract (directory or URL)"),
    task: str = typer.Option(..., help="a probe that predicts masks or points: fg-seg, cosegmentation, semantic-seg, "
                                       "refexp-seg, semantic-corr, temporal-corr"),
    layer: Optional[int] = typer.Option(None, help="target layer (with --head and --kind; default: the best "
                                                   "image values kvpipe probe saved)"),
    head: Optional[int] = typer.Option(None, help="target KV head"),
    kind: Optional[str] = typer.Option(None, help="keys | values | post_proj (the baseline: no --layer/--head)"),
    out: Optional[Path] = typer.Option(None, help="PAGE.html (default: RESULTS/TASK/show.html)"),
    results: Annotated[Optional[Path], typer.Option(help="directory of <task>/ results (default: STORE/probes)")] = None,
    limit: int = typer.Option(8, help="pictures per section"),
    device: str = typer.Option("auto", help="where a target not saved is predicted: auto, cpu, cuda[:N], numpy"),
) -> None:
    """One self-contained HTML page of a probe's predictions over the images (masks, DAVIS frames,
    keypoint matches, PCA colours); opens from disk."""
    from kvpipe.probes.show import build_show_page, parse_target

    path = build_show_page(store, task, parse_target(layer, head, kind), out, results, limit, device)
    console.print(f"page: {path}")


@app.command()
def info(store_arg: Optional[str] = STORE_ARG, store: Optional[str] = STORE_OPT) -> None:
    """Describe a store: model, dataset, layers, heads, kinds, encoding, size."""
    from kvpipe.store import FeatureStore

    table = Table(show_header=False, box=None)
    for k, v in FeatureStore.open(one_store(store_arg, store)).describe().items():
        table.add_row(f"[bold]{k}[/]", str(v))
    console.print(table)


@app.command()
def verify(store_arg: Optional[str] = STORE_ARG, store: Optional[str] = STORE_OPT) -> None:
    """Check every committed part's checksums and arrays; exit 1 if anything is damaged."""
    from kvpipe.store.verify import verify_store

    report = verify_store(one_store(store_arg, store))
    for part, problems in sorted(report.problems.items()):
        for p in problems:
            console.print(f"[red]part p{part:06d}[/]: {p}")
    for p in report.store_problems:
        console.print(f"[red]{p}[/]", soft_wrap=True, highlight=False)
    if report.ok:
        console.print(f"[green]ok[/]: {report.parts_checked} parts verified")
        return
    console.print(f"[red]damaged[/]: {len(report.problems)} of {report.parts_checked} parts"
                  f"{' and ' + str(len(report.store_problems)) + ' other file(s)' if report.store_problems else ''}; "
                  f"rerun the same kvpipe extract with --repair to redo them")
    raise typer.Exit(1)


@app.command()
def recode(store_arg: Optional[str] = STORE_ARG, store: Optional[str] = STORE_OPT,
           out: str = typer.Option(..., help="the new store (a local directory; a killed run resumes)"),
           store_dtype: str = typer.Option("pca", help="the lossy encoding: pca | int4 | int8"),
           pca_step: Annotated[Optional[float], typer.Option(help="pca's step (see kvpipe extract)")] = None) -> None:
    """Write a lossless store (in its compute dtype) again in a lossy encoding, without the model:
    the bytes kvpipe extract --store-dtype would write."""
    from kvpipe.cli.progress import recode_progress
    from kvpipe.store.recode import recodable, recode as recode_store

    src = recodable(one_store(store_arg, store), out, store_dtype, pca_step)  # one-line errors before the bar
    with recode_progress(console) as advance:
        path = recode_store(src, out, store_dtype, pca_step, advance)
    console.print(f"recoded to {store_dtype} -> {path}")


@app.command()
def status(store_arg: Optional[str] = STORE_ARG, store: Optional[str] = STORE_OPT,
           all_parts: bool = typer.Option(False, "--all", help="list every part, not only failed ones")) -> None:
    """Parts done, pending and failed (with why); rerun the same extract to finish the store."""
    from kvpipe.cli.ops import print_status
    from kvpipe.store.status import store_status

    print_status(console, store_status(one_store(store_arg, store)), all_parts)


@app.command()
def models(pattern: str = typer.Argument("*", help="wildcard filter")) -> None:
    """List registered models."""
    from kvpipe.pipeline.models import MODELS

    table = Table("name", "adapter", "checkpoint", "tokens (448x448 image)", "layers", "KV heads", "description")
    for name, e in MODELS.items(pattern):  # catalog data: lists without importing any model code
        shape = [str(v) if v is not None else "-" for v in (e.tokens_448, e.layers, e.kv_heads)]
        table.add_row(name, e.adapter_module, e.checkpoint or "(built in code)", *shape, e.description)
    console.print(table)


@app.command()
def datasets(pattern: str = typer.Argument("*", help="wildcard filter")) -> None:
    """List registered datasets and the tasks their annotations support."""
    from kvpipe.pipeline.datasets import DATASETS
    from kvpipe.registry import keyword_options

    table = Table("name", "tasks", "needs --data-root", "options (--option KEY=VALUE, default)")
    for name, cls in DATASETS.items(pattern):
        opts = ", ".join(f"{k}={v!r}" for k, v in keyword_options(cls).items())
        table.add_row(name, ", ".join(cls.tasks), "yes" if cls.needs_root else "no", opts or "-")
    console.print(table)


@app.command()
def tasks(pattern: str = typer.Argument("*", help="wildcard filter")) -> None:
    """List registered probes."""
    from kvpipe.probes import PROBES

    table = Table("name", "metric", "parameters", "description")
    for name, cls in PROBES.items(pattern):
        table.add_row(name, cls.primary_metric, ", ".join(f"{k}={v}" for k, v in cls.defaults.items()),
                      cls.description)
    console.print(table)


@app.command()
def demo(out: Path = typer.Option(Path("demo-out"), help="where the store and results go")) -> None:
    """The embedded default: tiny Qwen2.5-VL on synthetic data, every probe, one report page."""
    store = out / "store"
    extract(model="tiny-qwen25vl", dataset="synthetic", out=store, data_root=None, split=None,
            limit=None, init="pretrained", revision=None, dtype="float32", device="cpu", prefix="",
            template="chat", keys="post-rope", layers="all", heads="all",
            kinds="keys,values,post_proj", store_dtype=None, views=None, tasks=None, force=False, codec="zstd",
            batch_size=4, part_size=8,
            strict=False, seed=0, executor="local", ray_address=None, workers=None, repair=False, option=[])
    probe(task="all", store=store, out=None, param=[], no_cache=False, device="auto", layers=None, heads=None,
          kinds=None, executor="local", workers=None, ray_address=None, save_predictions="best", plots=None)
    report(store=store, out=out / "report.md")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # click returns typer.Exit's code instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except KvpipeError as err:
        err_console.print(f"[red]error:[/] {err}", soft_wrap=True, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)
    except Exception as err:  # click's own usage errors (click, or the copy typer ships)
        names = {c.__name__ for c in type(err).__mro__}
        if "ClickException" in names:
            err.show()
            sys.exit(2)
        if "Exit" in names and hasattr(err, "exit_code"):
            sys.exit(err.exit_code)
        if "Abort" in names:
            sys.exit(130)
        raise
