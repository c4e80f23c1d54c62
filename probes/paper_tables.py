"""The paper's Tables 1, 2, 4, 5 and 6 filled from stores' probe results and paired-task folders.

Why: a user who extracted and probed several models and datasets wants to see, cell by cell,
what kvpipe measured next to what the paper printed. Nothing is recomputed here: a store's
cells come from ``kvpipe probe``'s results table (STORE/probes/<task>/results.parquet), Table 5
from ``kvpipe paired``'s paired.parquet. A cell is the best (layer, KV head) of one kind on the
probe's primary metric, and a table's other metrics of that task (DAVIS J_m, F_m) are read at
the same (layer, head). Scores that probes store as fractions are shown x100, as the paper does.

Which store fills which row: stores are grouped by model (the store metadata's model name,
renamed by ``--paper-model NAME=PAPER_NAME`` for local checkpoints or test models); the rows of
the paper's model show the paper's number beside kvpipe's, other models get rows of their own
(no paper number). Which store fills which column: the first of the model's stores whose
dataset supports the column's task (and, for Table 4, is that dataset with that filter). A cell
no given store can fill is missing (None), never zero.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pyarrow.parquet as pq

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES
from kvpipe.probes.paper_data import paper_cells
from kvpipe.probes.prefix_report import CONTROL_NAMES, results_table
from kvpipe.probes.report import best_row, metrics_at
from kvpipe.store import FeatureStore
from kvpipe.store.schema import FeatureSetMeta

RANDOM_PREFIX = ("A rustic wooden table filled with freshly baked croissants, dripping honey, and a steaming pot "
                 "of Earl Grey tea beside a bowl of ripe figs.")


@dataclass(frozen=True)
class Column:
    """A table column: a probe task and metric, optionally one dataset with option filters."""

    label: str
    task: str
    metric: str
    dataset: str | None = None
    filters: tuple[tuple[str, str], ...] = ()

    def accepts(self, meta: FeatureSetMeta) -> bool:
        if self.task not in (meta.dataset.tasks or ()):
            return False
        if self.dataset is not None and meta.dataset.name != self.dataset:
            return False
        return all(meta.dataset.get(k) == v for k, v in self.filters)


@dataclass(frozen=True)
class RowSpec:
    """A row the paper prints: its label, the models (catalog names) that fill it, the kind read;
    ``grounded_kind``: the kind read instead in the text-grounded columns (SigLIP's block outputs
    have no text counterpart: its cells there are its image-text space, post_proj)."""

    label: str
    models: frozenset[str]
    kind: str
    grounded_kind: str | None = None

    def kind_for(self, column: "Column") -> str:
        if self.grounded_kind and column.task and PROBES.get(column.task).needs_text:
            return self.grounded_kind
        return self.kind


@dataclass
class Cell:
    value: float | None = None  # kvpipe's number (percent)
    paper: float | str | None = None
    where: str = ""  # "L3 H1 @ STORE", "post-proj @ STORE", a results folder


@dataclass
class PaperTable:
    name: str  # table1, ...
    title: str
    columns: list[str]
    rows: list[str] = field(default_factory=list)
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def cell(self, row: str, column: str) -> Cell:
        return self.cells.setdefault((row, column), Cell())

    def add_row(self, row: str) -> None:
        if row not in self.rows:
            self.rows.append(row)
            for c in self.columns:
                self.cell(row, c)


@dataclass
class StoreSet:
    """Opened stores by model name (after ``--paper-model`` renaming)."""

    by_model: dict[str, list[tuple[str, FeatureSetMeta]]]

    @classmethod
    def open(cls, stores: Sequence[str], rename: Mapping[str, str]) -> "StoreSet":
        by_model: dict[str, list[tuple[str, FeatureSetMeta]]] = {}
        for path in stores:
            meta = FeatureStore.open(path).meta
            name = meta.model.name or "unnamed"
            by_model.setdefault(rename.get(name, name), []).append((str(path), meta))
        return cls(by_model)

    def models_with(self, kind: str) -> list[str]:
        return [m for m, ss in self.by_model.items() if any(kind in meta.kinds for _, meta in ss)]


# ------------------------------------------------------------------------------ the paper's tables
LLAVA_OV, QWEN25, LLAMA3_NEXT = "llava-ov", "qwen25vl", "llava-next-llama3"
CLIP_MODELS = frozenset({"clip-vit-l14", "clip-vit-l14-336"})

SEG_COLUMNS = (Column("Pascal-5i mIoU", "fg-seg", "mIoU"), Column("MSRC J_m", "cosegmentation", "J_m"),
               Column("ImageNet-S mIoU", "semantic-seg", "mIoU"), Column("RefCOCO mIoU", "refexp-seg", "mIoU"))
CORR_COLUMNS = (Column("SPair-71K PCK", "semantic-corr", "pck"), Column("DAVIS J&F_m", "temporal-corr", "JF_mean"),
                Column("DAVIS J_m", "temporal-corr", "J_mean"), Column("DAVIS F_m", "temporal-corr", "F_mean"))
TABLE4_COLUMNS = (
    Column("RefCOCO mIoU", "refexp-seg", "mIoU", "refcoco"),
    Column("SPair-71K PCK", "semantic-corr", "pck", "spair"),
    Column("BDD-10K day+street mIoU", "semantic-seg", "mIoU", "bdd10k", (("timeofday", "daytime"), ("scene", "city street"))),
    Column("BDD-10K night+highway mIoU", "semantic-seg", "mIoU", "bdd10k", (("timeofday", "night"), ("scene", "highway"))),
)
TABLE1_ROWS = (RowSpec("Visual Encoder (post-proj)", frozenset({LLAVA_OV}), "post_proj"),
               RowSpec("LM Image Value (max)", frozenset({LLAVA_OV}), "values"),
               RowSpec("SigLIP without MLM FT", frozenset({"siglip"}), "hidden", grounded_kind="post_proj"))
TABLE2_ROWS = (RowSpec("CLIP", CLIP_MODELS, "hidden"), RowSpec("DINO", frozenset({"dino-vitb8"}), "hidden"),
               RowSpec("LM Image Value (max)", frozenset({LLAVA_OV}), "values"))
TABLE6_ROWS = (RowSpec("LLAMA3-LLaVA-NeXT 8B", frozenset({LLAMA3_NEXT}), "values"),
               RowSpec("LLaVA-OneVision 7B", frozenset({LLAVA_OV}), "values"),
               RowSpec("Qwen-2.5VL 7B", frozenset({QWEN25}), "values"))
TABLE4_ROWS = ("No prefixing", "Prefixing", "Prefixing-random", "Prefixing-incorrect")
PAIRED_COLUMNS = {"spair-vqa": "Semantic Correspondence (%)", "art-style": "Art Style (%)",
                  "visual-similarity": "Visual Similarity (%)"}
TABLE5_ROWS = (("MLM ✓", "mlm_right_pct"), ("Value ✓ MLM ✗", "value_right_mlm_wrong_pct"),
               ("Value ✗ MLM ✓", "value_wrong_mlm_right_pct"), ("(MLM ∪ Value) ✓", "either_right_pct"))
PERCENT = 100.0  # probes store fractions; the paper prints percent


# ------------------------------------------------------------------------------------- cells
def best_cell(stores: Sequence[tuple[str, FeatureSetMeta]], column: Column, kind: str,
              notes: list[str]) -> Cell:
    """The best ``kind`` (layer, head) of the first store that supports ``column`` and has results."""
    primary = PROBES.get(column.task).primary_metric
    for path, meta in stores:
        if not column.accepts(meta) or kind not in meta.kinds:
            continue
        try:
            table = results_table(FeatureStore.open(path), column.task)
        except StoreError:
            notes.append(f"{column.label}: no {column.task} results in {path}; run kvpipe probe --task "
                         f"{column.task} --store {path}")
            continue
        rows = pq.read_table(table).to_pylist()
        best = best_row(rows, primary, kind)
        if best is None:
            continue
        value = metrics_at(rows, best).get(column.metric)
        if value is None:
            continue
        at = "post-proj" if kind == "post_proj" else f"L{best['layer']} H{best['head']}"
        return Cell(float(value) * PERCENT, where=f"{at} @ {path}")
    return Cell()


def _fill(table: PaperTable, row: str, cols: Sequence[Column], stores: Sequence[tuple[str, FeatureSetMeta]],
          kind: str | RowSpec) -> None:
    """Fill ``row`` with ``kind`` (a RowSpec: its kind for each column)."""
    table.add_row(row)
    for col in cols:
        if not col.task:  # a derived column (Table 6's Average) is filled by its table
            continue
        found = best_cell(stores, col, kind.kind_for(col) if isinstance(kind, RowSpec) else kind, table.notes)
        cell = table.cell(row, col.label)
        cell.value, cell.where = found.value, found.where


def _with_paper(table: PaperTable) -> PaperTable:
    for (row, column), value in paper_cells(table.name).items():
        if row in table.rows and column in table.columns:
            table.cell(row, column).paper = value
    return table


def model_table(name: str, title: str, cols: Sequence[Column], specs: Sequence[RowSpec], stores: StoreSet,
                extra_kinds: Sequence[tuple[str, str]]) -> PaperTable:
    """A table whose rows are representations of models: the paper's rows always (kvpipe's cell
    missing when no store of their model is given), then for every other model with stores
    ``extra_kinds`` rows (label, kind), named "label [model]"."""
    table = PaperTable(name, title, [c.label for c in cols])
    claimed = set()
    for spec in specs:
        group = [s for m in sorted(spec.models) for s in stores.by_model.get(m, ())]
        claimed |= spec.models
        _fill(table, spec.label, cols, group, spec)
    for model, group in stores.by_model.items():
        if model in claimed:
            continue
        for label, kind in extra_kinds:
            if any(kind in meta.kinds for _, meta in group):
                _fill(table, f"{label} [{model}]", cols, group, kind)
    return _with_paper(table)


def table1(stores: StoreSet) -> PaperTable:
    return model_table("table1", "Table 1: segmentation and correspondence probes (LLaVA-OneVision 7B)",
                       SEG_COLUMNS + CORR_COLUMNS, TABLE1_ROWS, stores,
                       (("Visual Encoder (post-proj)", "post_proj"), ("LM Image Value (max)", "values"),
                        ("Encoder block output (max)", "hidden")))


def table2(stores: StoreSet) -> PaperTable:
    return model_table("table2", "Table 2: correspondence against vision encoders", CORR_COLUMNS, TABLE2_ROWS,
                       stores, (("LM Image Value (max)", "values"), ("Encoder block output (max)", "hidden")))


def table6(stores: StoreSet) -> PaperTable:
    table = model_table("table6", "Table 6: best image value per segmentation task and model",
                        SEG_COLUMNS + (Column("Average", "", ""),), TABLE6_ROWS, stores,
                        (("LM Image Value (max)", "values"),))
    for row in table.rows:
        vals = [table.cell(row, c.label).value for c in SEG_COLUMNS]
        avg = table.cell(row, "Average")
        avg.value = sum(vals) / len(vals) if all(v is not None for v in vals) else None
        avg.where = "mean of the four tasks" if avg.value is not None else ""
    return table


# -------------------------------------------------------------------------------------- Table 4
def prefix_row(meta: FeatureSetMeta) -> str | None:
    """The Table-4 row of a store's prefix condition; None for a fixed prefix that is none of them."""
    choice = meta.prefix_choice
    if choice:
        return CONTROL_NAMES.get(choice.control)
    if meta.prefix == RANDOM_PREFIX:
        return "Prefixing-random"
    return "No prefixing" if not meta.prefix else None


def check_prefix_store(path: str, meta: FeatureSetMeta) -> None:
    """A one-line UsageError unless the store fits a Table-4 cell."""
    if prefix_row(meta) is None:
        raise UsageError(f"--prefix-stores {path}: its fixed prefix {meta.prefix[:40]!r} is no Table-4 condition; "
                         f"extract with --prefix-from and --prefix-control none|random|incorrect")
    if not any(c.accepts(meta) for c in TABLE4_COLUMNS):
        tasks = ", ".join(meta.dataset.tasks or ()) or "no probe task"
        raise UsageError(f"--prefix-stores {path}: a {meta.dataset.name} store ({tasks}) fits no column of Table 4, "
                         f"which takes refcoco (refexp-seg), spair (semantic-corr) or bdd10k filtered to "
                         f"timeofday=daytime scene='city street' or timeofday=night scene=highway (semantic-seg); "
                         f"pass it with --stores instead")


def check_plain_store(path: str, meta: FeatureSetMeta) -> None:
    """Tables 1, 2 and 6 compare unprefixed stores: a prefixed one belongs to --prefix-stores."""
    if meta.prefix_choice or meta.prefix:
        raise UsageError(f"--stores {path} was extracted with a prefix; Tables 1, 2 and 6 compare stores without "
                         f"one: pass it with --prefix-stores (Table 4)")


def table4(plain: StoreSet, prefixed: StoreSet) -> PaperTable:
    """Rows by prefix condition (of the paper's model; others "[model]"); the "No prefixing"
    row also reads unprefixed --stores of the same datasets."""
    table = PaperTable("table4", "Table 4: image values with and without a text prefix (LLaVA-OneVision 7B)",
                       [c.label for c in TABLE4_COLUMNS])
    for row in TABLE4_ROWS:
        table.add_row(row)
    groups: dict[tuple[str, str], list[tuple[str, FeatureSetMeta]]] = {}
    for source in (prefixed, plain):
        for model, stores in source.by_model.items():
            for path, meta in stores:
                row = prefix_row(meta)
                if row is not None:
                    groups.setdefault((model, row), []).append((path, meta))
    for (model, row), stores in groups.items():
        label = row if model == LLAVA_OV else f"{row} [{model}]"
        if not any(c.accepts(m) for c in TABLE4_COLUMNS for _, m in stores):
            continue
        table.add_row(label)
        for col in TABLE4_COLUMNS:
            found = best_cell(stores, col, "values", table.notes)
            if found.value is not None:
                table.cells[(label, col.label)] = found
    return _with_paper(table)


# -------------------------------------------------------------------------------------- Table 5
def read_paired(folder: Path) -> list[dict[str, Any]]:
    for name in ("paired.parquet", "paired.csv"):
        if (folder / name).is_file():
            if name.endswith(".parquet"):
                return pq.read_table(folder / name).to_pylist()
            import pyarrow.csv as pacsv

            return pacsv.read_csv(folder / name).to_pylist()
    raise UsageError(f"--results {folder}: no paired.parquet; give the --out folder of kvpipe paired")


def table5(folders: Sequence[Path], rename: Mapping[str, str]) -> PaperTable:
    """Rows "MLM ✓" ... of ``kvpipe paired``'s folders; a column per paired task."""
    table = PaperTable("table5", "Table 5: paired tasks, MLM against its image values (%)",
                       list(PAIRED_COLUMNS.values()))
    for label, _ in TABLE5_ROWS:
        table.add_row(label)
    for folder in folders:
        rows = [r for r in read_paired(folder) if str(r.get("subset")) == "all"]
        if not rows:
            raise UsageError(f"--results {folder}: paired.parquet has no 'all' rows; rerun kvpipe paired")
        task, model = str(rows[0]["task"]), str(rows[0]["model"])
        if task not in PAIRED_COLUMNS:
            raise UsageError(f"--results {folder}: paired task {task!r} is not one of Table 5's "
                             f"({', '.join(PAIRED_COLUMNS)})")
        model = rename.get(model, model)
        values = {r["metric"]: float(r["value"]) for r in rows}
        where = f"L{rows[0]['layer']} H{rows[0]['head']} @ {folder}"
        for label, metric in TABLE5_ROWS:
            row = label if model == LLAVA_OV else f"{label} [{model}]"
            table.add_row(row)
            table.cells[(row, PAIRED_COLUMNS[task])] = Cell(values.get(metric), where=where)
    return _with_paper(table)
