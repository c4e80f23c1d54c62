"""Any image dataset the Hugging Face ``datasets`` library reads: ``--dataset hf:PATH_OR_ID``.

Why: many image collections exist only in the hub's formats. ``PATH_OR_ID`` is a
``save_to_disk`` folder (``Dataset`` or ``DatasetDict``), a parquet file or a folder of parquet
files (the hub's snapshot layouts, split by file name), or a hub id when the hub is reachable
(``datasets.load_dataset(id)``; offline that is a one-line error asking for a local copy). They
carry no annotations kvpipe knows, so the only task is ``input-agnostic``.

Options: ``image_column`` (default "image": an ``Image`` feature, or struct {bytes, path} /
raw bytes cells), ``id_column`` (image ids from that column, which must be unique; default: the
row index), ``config`` (a hub dataset's config). ``--split`` picks the split; a copy with a single
split needs none. ``--limit N`` keeps the first N rows. Image ids are stable: the id column, or
the row index in the split's order (which ``datasets`` keeps).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, DatasetAdapter, ImageRecord
from kvpipe.pipeline.vqa.common import HFTable, HubId, data_source, hf_splits, load_hub, load_parquet

HINT = "a save_to_disk folder, parquet files or a hub dataset id"


def open_splits(path: str, config: str | None = None) -> tuple[dict[str, HFTable], str]:
    """split -> table of a local copy (save_to_disk folder, parquet file or folder) or a hub id."""
    file = Path(path).expanduser()
    source = file.resolve() if file.is_file() else data_source(path, "hf", HINT, what="dataset")
    if isinstance(source, HubId):
        return load_hub(source, config), str(source)
    if config is not None:
        raise UsageError(f"dataset 'hf' option config={config!r} names a hub config; a local copy has none "
                         f"(point --dataset hf:PATH at the config's own folder)")
    if source.is_file():
        if source.suffix != ".parquet":
            raise DataError(f"{source} is neither a save_to_disk folder nor a parquet file; pass {HINT}")
        return load_parquet({source.stem: [source]}, str(source)), str(source)
    splits = hf_splits(source)
    if not splits:
        raise DataError(f"{source} holds no dataset that datasets reads (no dataset_dict.json, state.json or "
                        f"*.parquet); pass a save_to_disk folder, parquet files or a hub id")
    return splits, str(source)


@DATASETS.register
class HFImages(DatasetAdapter):
    """The images of one split of a Hugging Face dataset; ids from ``id_column`` or the row index."""

    tasks = ("input-agnostic",)
    needs_root = False
    root_hint = f"{HINT} (--dataset hf:PATH_OR_ID)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 path: str | None = None, image_column: str = "image", id_column: str | None = None,
                 config: str | None = None):
        if path is None and root is None:
            raise UsageError("dataset 'hf' needs a dataset: --dataset hf:PATH_OR_ID (a save_to_disk folder, "
                             "parquet files or a hub id)")
        if path is not None and root is not None and str(path) != str(root):
            raise UsageError(f"dataset 'hf': give the dataset once, as hf:{path} or --data-root {root}")
        super().__init__(root, split, limit)
        self.path = str(path if path is not None else root)
        self.image_column, self.id_column, self.config = str(image_column), id_column, config
        self._table: HFTable | None = None

    def table(self) -> HFTable:
        if self._table is None:
            splits, where = open_splits(self.path, self.config)
            if self.split is None:
                if len(splits) > 1:
                    raise UsageError(f"{where} has splits {', '.join(sorted(splits))}; choose one with --split")
                self.split = next(iter(splits))
            if self.split not in splits:
                raise UsageError(f"{where} has no split {self.split!r}; its splits: "
                                 f"{', '.join(repr(s) for s in sorted(splits))}")
            table = splits[self.split]
            for option, column in (("image_column", self.image_column), ("id_column", self.id_column)):
                if column is not None and column not in table.column_names:
                    raise DataError(f"{table.name} has no column {column!r} (--option {option}); its columns: "
                                    f"{', '.join(table.column_names)}")
            self._table = table
        return self._table

    def records(self) -> list[ImageRecord]:
        table = self.table()
        n = len(table) if self.limit is None else min(len(table), max(self.limit, 0))
        if self.id_column is None:
            ids = [str(i) for i in range(len(table))]
        else:
            ids = [str(v) for v in table.column(self.id_column).to_pylist()]
            seen: dict[str, int] = {}
            for i, v in enumerate(ids):
                if v in seen:
                    raise DataError(f"{table.name}: --option id_column={self.id_column} is not unique ({v!r} in "
                                    f"rows {seen[v]} and {i}); choose a unique column or drop id_column")
                seen[v] = i
        present = table.non_null(self.image_column)
        empty = next((i for i in range(n) if not present[i]), None)
        if empty is not None:
            raise DataError(f"{table.name} row {empty}: column {self.image_column!r} is empty; is it the image "
                            f"column?")
        return [ImageRecord(image_id=ids[i], source=f"{table.name}#row={i}", load_image=table.image(self.image_column, i))
                for i in range(n)]

    def describe(self) -> dict[str, Any]:
        path = self.path
        if Path(path).expanduser().exists():
            path = str(Path(path).expanduser().resolve())
        return {**super().describe(), "path": path, "config": self.config, "image_column": self.image_column,
                "id_column": self.id_column}
