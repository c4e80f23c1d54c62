"""Run a benchmark (with or without an attention knock-out) resumably, parse, score, tabulate.

Why a module of its own: ``kvpipe answer`` and ``kvpipe intervene`` both need the same loop
(answers logged as they are generated, so a killed run regenerates nothing it already has;
the benchmark's own parse() and score(); tidy tables), and the CLI must stay thin.

Layout of one condition's directory:
    run.json        what produced the answers (model, benchmark, decoding, knock-out heads)
    answers.jsonl   the resume log: one {"qid", "text"} line per generated answer
    answers.parquet qid, subset, text, parsed, gold, correct (+ model, benchmark, condition)
    scores.parquet / scores.csv   tidy rows: model, benchmark, subset, metric, value
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from kvpipe.errors import UsageError
from kvpipe.pipeline.evaluation.answer import answer_items
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.vqa.base import Benchmark, VQAItem

RUN_FILE, LOG_FILE = "run.json", "answers.jsonl"
ANSWERS_FILE, SCORES_FILE, SCORES_CSV = "answers.parquet", "scores.parquet", "scores.csv"
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


def run_record(adapter: ModelAdapter, bench: Benchmark, max_new_tokens: int, condition: Condition) -> dict[str, Any]:
    """The settings that determine the answers; a resumed run must match them."""
    src = adapter.source
    return {"model": src.get("name"), "checkpoint": src.get("checkpoint"), "revision": src.get("revision"),
            "init": src.get("init"), "seed": src.get("seed"), "dtype": str(next(adapter.model.parameters()).dtype),
            "benchmark": bench.name, "max_new_tokens": int(max_new_tokens), "condition": condition.to_dict()}


def evaluate(adapter: ModelAdapter, bench: Benchmark, items: list[VQAItem], out_dir: str | Path, *,
             condition: Condition = Condition(), max_new_tokens: int = 128, batch_size: int = 8,
             progress: Callable[[int], None] | None = None) -> EvalResult:
    """Answer every item not yet answered in ``out_dir``, then parse, score and write the tables."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record = run_record(adapter, bench, max_new_tokens, condition)
    _check_record(out, record, {"condition": condition.info()})
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
                        "subset": it.subset, "text": predictions[it.qid], "parsed": parsed, "gold": it.answer,
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
    out = Path(out_dir)
    table = pa.Table.from_pylist([{c: r[c] for c in CONDITION_COLUMNS} for r in rows],
                                 schema=_schema(CONDITION_COLUMNS))
    _write(out / SCORES_FILE, out / SCORES_CSV, table)
    return out / SCORES_FILE, out / SCORES_CSV


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


def _check_record(out: Path, record: dict[str, Any], info: dict[str, Any]) -> None:
    """Refuse to mix answers of different runs in one directory; write run.json on first use."""
    path = out / RUN_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
        old.pop("info", None)
        if old != record:
            diff = sorted(k for k in set(record) | set(old) if old.get(k) != record.get(k))
            raise UsageError(f"{out} holds answers of another run (different {', '.join(diff)}); "
                             f"use another --out or delete that directory")
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({**record, "info": info}, indent=1, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


def _schema(columns: list[str]) -> pa.Schema:
    types = {"value": pa.float64(), "n_heads": pa.int64()}
    return pa.schema([(c, types.get(c, pa.string())) for c in columns])


def _answer_schema() -> pa.Schema:
    return pa.schema([("model", pa.string()), ("benchmark", pa.string()), ("condition", pa.string()),
                      ("qid", pa.string()), ("subset", pa.string()), ("text", pa.string()),
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
