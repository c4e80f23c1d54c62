"""Run a benchmark (with or without an attention knock-out) resumably, parse, score, tabulate.

Why a module of its own: ``kvpipe answer`` and ``kvpipe intervene`` both need the same loop
(answers logged as they are generated, so a killed run regenerates nothing it already has;
the benchmark's own parse() and score(); tidy tables), and the CLI must stay thin.

Layout of one condition's directory:
    run.json        what produced the answers: model (checkpoint, revision, init, seed, dtype),
                    benchmark (data root, split, limit, options, a digest of the prompts),
                    decoding, knock-out heads -- compared on resume -- and, under "info" and
                    "provenance" (not compared), how the heads were chosen and the kvpipe
                    version, command line and every parameter of the call that made it
    answers.jsonl   the resume log: one {"qid", "text"} line per generated answer
    answers.parquet qid, subset, question, prompt, text, parsed, gold, correct (+ model,
                    benchmark, condition)
    scores.parquet / scores.csv   tidy rows: model, benchmark, subset, metric, value
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kvpipe.errors import UsageError
from kvpipe.provenance import RUN_FILE
from kvpipe.pipeline.evaluation.answer import answer_items
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.vqa.base import Benchmark, VQAItem

LOG_FILE = "answers.jsonl"
UNCOMPARED = ("info", "provenance")  # run.json keys that say how, not what: a resumed run may differ there
ANSWERS_FILE, SCORES_FILE, SCORES_CSV = "answers.parquet", "scores.parquet", "scores.csv"
KNOCKOUT_FILE, KNOCKOUT_CSV = "knockout.parquet", "knockout.csv"  # kvpipe intervene: every condition's scores
SCORE_COLUMNS = ["model", "benchmark", "subset", "metric", "value"]
CONDITION_COLUMNS = ["model", "benchmark", "condition", "heads", "layers", "n_heads", "subset", "metric", "value"]
BASELINE = "none"


@dataclass
class EvalResult:
    out_dir: Path
    answers: list[dict[str, Any]]
    scores: list[dict[str, Any]]
    generated: int  # answers generated in this run
    reused: int  # answers taken from an earlier run's log


@dataclass(frozen=True)
class Condition:
    """What the model runs under: the unmodified model (``none``) or a knock-out head set."""

    name: str = BASELINE
    heads_kind: str = BASELINE
    layers: str = ""
    heads: frozenset[tuple[int, int]] = field(default_factory=frozenset)
    details: dict[str, Any] = field(default_factory=dict)  # threshold, seed, store: recorded in run.json

    def to_dict(self) -> dict[str, Any]:
        """What determines the answers: the blocked heads (and the directory's name)."""
        return {"name": self.name, "heads": [list(h) for h in sorted(self.heads)]}

    def info(self) -> dict[str, Any]:
        """How the heads were chosen; recorded, not compared on resume."""
        return {"heads_kind": self.heads_kind, "layers": self.layers, **self.details}


def benchmark_record(bench: Benchmark, items: list[VQAItem], max_new_tokens: int) -> dict[str, Any]:
    """The benchmark side of a run's record: which questions, phrased how, decoded how long."""
    prompts = hashlib.sha256(json.dumps([[it.qid, it.prompt] for it in items]).encode()).hexdigest()[:16]
    return {"benchmark": bench.name, **bench.settings(), "prompts": prompts, "max_new_tokens": int(max_new_tokens)}


def run_record(adapter: ModelAdapter, bench: Benchmark, max_new_tokens: int, condition: Condition,
               items: list[VQAItem] = ()) -> dict[str, Any]:
    """The settings that determine the answers; a resumed run must match them."""
    src = adapter.source
    record = {"model": src.get("name"), "checkpoint": src.get("checkpoint"), "revision": src.get("revision"),
              "init": src.get("init"), "seed": src.get("seed"), "dtype": str(next(adapter.model.parameters()).dtype),
              **benchmark_record(bench, list(items), max_new_tokens), "condition": condition.to_dict()}
    return json.loads(json.dumps(record, default=str))  # as it reads back from run.json


def check_reusable(out_dir: str | Path, expected: dict[str, Any]) -> None:
    """Before any model is loaded: refuse an ``out_dir`` whose run.json differs from ``expected``
    on the keys ``expected`` names (the rest is compared once the model is loaded)."""
    path = Path(out_dir) / RUN_FILE
    old = _read_record(path)
    if old is None:
        return
    expected = json.loads(json.dumps(expected, default=str))
    diff = sorted(k for k in expected if old.get(k) != expected[k])
    if diff:
        raise UsageError(f"{out_dir} holds answers of another run (different {', '.join(diff)}); use another "
                         f"--out or delete that directory")


def evaluate(adapter: ModelAdapter, bench: Benchmark, items: list[VQAItem], out_dir: str | Path, *,
             condition: Condition = Condition(), max_new_tokens: int = 128, batch_size: int = 8,
             progress: Callable[[int], None] | None = None,
             provenance: dict[str, Any] | None = None) -> EvalResult:
    """Answer every item not yet answered in ``out_dir``, then parse, score and write the tables.

    ``provenance`` (kvpipe version, command line, parameters) goes into a new run.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(adapter, bench, max_new_tokens, condition, items)
    _check_record(out, record, {"condition": condition.info()}, provenance or {})
    done = read_log(out / LOG_FILE)
    todo = [it for it in items if it.qid not in done]
    reused = len(items) - len(todo)
    if progress is not None and reused:
        progress(reused)
    with open(out / LOG_FILE, "a", encoding="utf-8") as log:
        def append(batch: dict[str, str]) -> None:
            for qid, text in batch.items():
                log.write(json.dumps({"qid": qid, "text": text}) + "\n")
            log.flush()
            os.fsync(log.fileno())

        done.update(answer_items(adapter, todo, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                 knockout=condition.heads, progress=progress, on_batch=append))
    model = str(adapter.source.get("name"))
    predictions = {it.qid: done[it.qid] for it in items}
    answers = []
    for it in items:
        parsed = bench.parse(it, predictions[it.qid])
        answers.append({"model": model, "benchmark": bench.name, "condition": condition.name, "qid": it.qid,
                        "subset": it.subset, "question": it.question, "prompt": it.prompt,
                        "text": predictions[it.qid], "parsed": parsed, "gold": it.answer,
                        "correct": parsed == it.answer})
    scores = [{"model": model, "benchmark": bench.name, "subset": str(r["subset"]), "metric": str(r["metric"]),
               "value": float(r["value"])} for r in bench.score(items, predictions)]
    _write(out / ANSWERS_FILE, None, pa.Table.from_pylist(answers, schema=_answer_schema()))
    _write(out / SCORES_FILE, out / SCORES_CSV, pa.Table.from_pylist(scores, schema=_schema(SCORE_COLUMNS)))
    return EvalResult(out, answers, scores, len(todo), reused)


def with_condition(scores: list[dict[str, Any]], condition: Condition) -> list[dict[str, Any]]:
    """Score rows tagged with the condition they were measured under (kvpipe intervene's table)."""
    return [{**r, "condition": condition.name, "heads": condition.heads_kind, "layers": condition.layers,
             "n_heads": len(condition.heads)} for r in scores]


def write_condition_table(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """Merge ``rows`` into OUT/knockout.parquet (+ .csv): the conditions they hold replace their
    earlier rows (in their place), every other condition's rows are kept (baseline first, then in
    the order conditions were first run)."""
    out = Path(out_dir)
    parquet, csv = out / KNOCKOUT_FILE, out / KNOCKOUT_CSV
    new = [{c: r[c] for c in CONDITION_COLUMNS} for r in rows]
    replaced = {r["condition"] for r in new}
    old = pq.read_table(parquet).to_pylist() if parquet.exists() else []
    kept = [r for r in old if r.get("condition") not in replaced and set(CONDITION_COLUMNS) <= set(r)]
    merged = kept + new
    order = list(dict.fromkeys([BASELINE] + [r.get("condition") for r in old] + [r["condition"] for r in new]))
    merged.sort(key=lambda r: order.index(r["condition"]))  # stable: rows keep their order within a condition
    _write(parquet, csv, pa.Table.from_pylist(merged, schema=_schema(CONDITION_COLUMNS)))
    return parquet, csv


def read_log(path: Path) -> dict[str, str]:
    """Answers logged by earlier runs; a line cut short by a kill is ignored (and regenerated)."""
    done: dict[str, str] = {}
    if not path.exists():
        return done
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
            done[str(rec["qid"])] = str(rec["text"])
        except (ValueError, KeyError, TypeError):
            continue
    return done


def _read_record(path: Path) -> dict[str, Any] | None:
    """A run.json without its uncompared keys; None when there is none, {} when unreadable."""
    if not path.exists():
        return None
    try:
        old = json.loads(path.read_text())
    except ValueError:
        return {}
    if not isinstance(old, dict):
        return {}
    for key in UNCOMPARED:
        old.pop(key, None)
    return old


def _check_record(out: Path, record: dict[str, Any], info: dict[str, Any], provenance: dict[str, Any]) -> None:
    """Refuse to mix answers of different runs in one directory; write run.json on first use."""
    path = out / RUN_FILE
    old = _read_record(path)
    if old is not None:
        if old != record:
            diff = sorted(k for k in set(record) | set(old) if old.get(k) != record.get(k))
            raise UsageError(f"{out} holds answers of another run (different {', '.join(diff)}); "
                             f"use another --out or delete that directory")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "info": info, "provenance": provenance}, indent=1, sort_keys=True,
                              default=str) + "\n")
    tmp.replace(path)


def _schema(columns: list[str]) -> pa.Schema:
    types = {"value": pa.float64(), "n_heads": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def _answer_schema() -> pa.Schema:
    return pa.schema([("model", pa.string()), ("benchmark", pa.string()), ("condition", pa.string()),
                      ("qid", pa.string()), ("subset", pa.string()), ("question", pa.string()),
                      ("prompt", pa.string()), ("text", pa.string()),
                      ("parsed", pa.string()), ("gold", pa.string()), ("correct", pa.bool_())])


def _write(parquet: Path, csv: Path | None, table: pa.Table) -> None:
    """Write to a temporary name and rename, so a reader never sees half a table."""
    tmp = parquet.with_suffix(".parquet.tmp")
    pq.write_table(table, tmp)
    tmp.replace(parquet)
    if csv is not None:
        tmp = csv.with_suffix(".csv.tmp")
        pacsv.write_csv(table, tmp)
        tmp.replace(csv)
