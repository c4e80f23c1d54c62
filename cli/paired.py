"""``kvpipe paired`` (the paper's Table 5) and ``kvpipe figure3`` (its Figure 3).

Thin: options -> ``kvpipe.probes.paired`` / ``kvpipe.probes.figure3`` and the 2x2 table of
``kvpipe.pipeline.vqa.scoring``; neither command loads a model. Registered on the main app by
``register(app)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from kvpipe.cli.common import console, parse_params
from kvpipe.errors import UsageError
from kvpipe.provenance import provenance, write_run_json

TABLE5 = (("mlm_right", "MLM ✓"), ("value_right_mlm_wrong", "Value ✓ MLM ✗"),
          ("value_wrong_mlm_right", "Value ✗ MLM ✓"), ("either_right", "(MLM ∪ Value) ✓"))



def paired(
    store: str = typer.Option(..., help="a store of the task's questions (kvpipe extract --dataset blink or spair-vqa)"),
    task: str = typer.Option(..., help="art-style | visual-similarity | spair-vqa"),
    answers: Path = typer.Option(..., help="the MLM's answers: OUT/answers.parquet of kvpipe answer on the same "
                                           "benchmark (blink, spair-vqa)"),
    layer: Optional[int] = typer.Option(None, help="the values' layer (with --head); default: the best (layer, head) "
                                                   "of the probe's sweep"),
    head: Optional[int] = typer.Option(None, help="the values' KV head (with --layer)"),
    kind: str = typer.Option("values", help="values (the paper's) | keys | post_proj"),
    out: Optional[Path] = typer.Option(None, help="output directory (default: STORE/probes/TASK/paired)"),
    param: list[str] = typer.Option([], help="probe parameter KEY=VALUE (repeatable), e.g. tokens=base"),
) -> None:
    """Table 5: questions by MLM right/wrong x image values right/wrong, for one paired task."""
    called = provenance("paired", dict(locals()))
    from kvpipe.pipeline.vqa.scoring import CELLS, paired_rows, paired_table
    from kvpipe.probes.paired import (check_answers_belong, pair_answers, paired_probe, read_mlm_answers,
                                      resolve_target, write_paired)
    from kvpipe.probes.runner import results_dir, run_probe

    params = parse_params(param)
    probe = paired_probe(store, task, params)
    fs = probe.store
    answers_run = check_answers_belong(fs, answers, probe.benchmark)
    how = "chosen"
    if layer is None and head is None and kind != "post_proj":
        run = run_probe(store, task, params, use_cache=True)
        best = run.best(probe.primary_metric, kind)
        if best is None:
            raise UsageError(f"{task} on {store} has no {kind} scores; is {kind} stored?")
        layer, head, how = int(best["layer"]), int(best["head"]), "best of the sweep"
    target = resolve_target(fs, kind, layer, head)
    mlm = read_mlm_answers(answers, probe.benchmark)
    pairs = pair_answers(probe, target, mlm)
    table = paired_table(pairs.mlm_correct, pairs.value_correct)
    rows = paired_rows(table, "all")
    out = out or results_dir(fs.root) / task / "paired"
    base = {"model": fs.meta.model.name, "dataset": fs.meta.dataset.name}
    paths = write_paired(out, pairs, rows, base)
    write_run_json(out, {**called, "store": str(fs.root), "task": task, "probe_params": params,
                         "target": {"kind": target.kind, "layer": target.layer, "head": target.head, "how": how},
                         "model": fs.meta.model, "dataset": fs.meta.dataset, "answers": str(answers),
                         "answers_run": {k: v for k, v in (answers_run or {}).items() if k != "info"}})

    where = "post-proj" if target.kind == "post_proj" else f"layer {target.layer}, KV head {target.head}"
    view = Table("", "%", "questions",
                 title=f"{task}: MLM vs image {target.kind} ({where}, {how}) on {table['n']} questions")
    counts = table["counts"]
    count_of = {"mlm_right": counts["mlm_right_value_right"] + counts["mlm_right_value_wrong"],
                "value_right_mlm_wrong": counts["mlm_wrong_value_right"],
                "value_wrong_mlm_right": counts["mlm_right_value_wrong"],
                "either_right": table["n"] - counts["mlm_wrong_value_wrong"]}
    for key, label in TABLE5:
        view.add_row(label, f"{table[key]:.1f}", str(count_of[key]))
    console.print(view)
    grid = Table("", "value ✓", "value ✗", title="2x2 counts")
    grid.add_row("MLM ✓", str(counts[CELLS[0]]), str(counts[CELLS[1]]))
    grid.add_row("MLM ✗", str(counts[CELLS[2]]), str(counts[CELLS[3]]))
    console.print(grid)
    console.print(f"value accuracy {table['value_right']:.1f}% on these questions "
                  f"({100 * pairs.value_accuracy_all:.1f}% on all {len(probe.qids)} of the store)")
    if pairs.only_in_store or pairs.only_in_answers:
        console.print(f"[yellow]note[/]: {pairs.only_in_store} store questions have no MLM answer, "
                      f"{pairs.only_in_answers} MLM answers have no store question; only the {table['n']} "
                      f"in both are counted")
    console.print(f"tables: {paths[0]} (+ .csv), {paths[2]} (+ .csv)")


def figure3(
    point: list[str] = typer.Option([], help="NAME:STORE1,STORE2,...:SCORES1,SCORES2,... (repeatable): a model's "
                                             "segmentation stores and its kvpipe answer score files"),
    spec: Optional[Path] = typer.Option(None, help="JSON or YAML file: [{name, stores: [...], scores: [...]}, ...]"),
    out: Path = typer.Option(Path("figure3"), help="output directory (figure3.csv, figure3.png)"),
    y: str = typer.Option("pooled", help="pooled (total correct / total questions of the score files) | mean "
                                         "(mean of the files' accuracies)"),
    tasks: str = typer.Option("fg-seg,cosegmentation,semantic-seg,refexp-seg",
                              help="segmentation probes averaged for x"),
    no_cache: bool = typer.Option(False, help="recompute probe results even if cached"),
    param: list[str] = typer.Option([], help="probe parameter KEY=VALUE (repeatable; every task that takes KEY) or "
                                             "TASK.KEY=VALUE (that task only): picks the cached results to read"),
) -> None:
    """Figure 3: best image-value segmentation (mean of 4 probes) vs MLM accuracy, one point per model."""
    called = provenance("figure3", dict(locals()))
    from kvpipe.probes.figure3 import figure3 as make_figure, parse_point, read_spec, task_params

    points = [parse_point(p) for p in point] + (read_spec(spec) if spec is not None else [])
    if not points:
        raise UsageError("give at least one --point NAME:STORES:SCORES or a --spec file")
    names = [t.strip() for t in tasks.split(",") if t.strip()]
    res = make_figure(points, out, names, y_mode=y, use_cache=not no_cache,
                      params=task_params(parse_params(param), names), provenance=called,
                      on_task=lambda m, t, s: console.print(f"  {m}: {t} on {s}", highlight=False))
    view = Table("model", "x: segmentation (mean best)", "y: MLM accuracy", "questions",
                 *(f"{t}" for t in names), title="Figure 3")
    for r in res.rows:
        per_task = [next((f"{v:.3f}" for k, v in r.items() if k.startswith(f"{t}_") and not k.endswith("_at")), "")
                    for t in names]
        view.add_row(r["model"], f"{r['x_segmentation']:.3f}", f"{r['y_mlm_accuracy']:.3f}",
                     str(r["mlm_questions"]), *per_task)
    console.print(view)
    for note in res.notes:
        console.print(f"[yellow]note[/]: {note}", highlight=False)
    console.print(f"-> {res.csv}, {res.png}, {res.csv.parent / 'run.json'}")


def register(app: typer.Typer) -> None:
    app.command()(paired)
    app.command()(figure3)
