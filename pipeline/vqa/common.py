"""What the question-answering benchmarks share: table readers, lazy images, options, parsing.

Why pyarrow alone: the benchmarks ship as Hugging Face parquet files (hub snapshots, one
``<split>-00000-of-0000N.parquet`` per shard) or as ``datasets.save_to_disk`` folders (Arrow
IPC streams plus ``state.json``); both are plain Arrow, so reading needs neither the
``datasets`` library nor torch. Text columns are read up front; an image is decoded only when
its loader is called. Loaders are small frozen dataclasses, so they pickle into DataLoader
workers, and each process keeps its own little cache of open tables and row groups.
"""

from __future__ import annotations

import bisect
import io
import json
import re
import string
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.roots import existing_root

LETTERS = string.ascii_uppercase

# lmms-eval's BLINK and CV-Bench pre_prompt (tasks/blink/_default_template_yaml,
# tasks/cv_bench/_default_template_yaml); "{}" becomes "A, B, C, ..." for the question's options.
MC_PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"


# --- tables ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TableRef:
    """One file of rows: a parquet file, or an Arrow IPC file of a ``save_to_disk`` folder."""

    path: str
    kind: str  # "parquet" | "arrow"

    @property
    def name(self) -> str:
        return self.path


_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}\.parquet$")
_CONVERTED = re.compile(r"^\d+\.parquet$")  # the hub's parquet-converter layout: <split>/0000.parquet
_LOCK = threading.Lock()


def _remember(cache: OrderedDict, key: Any, value: Any, limit: int) -> None:
    """Keep ``value`` in a least-recently-used ``cache`` of at most ``limit`` entries."""
    with _LOCK:
        cache[key] = value
        while len(cache) > limit:
            cache.popitem(last=False)
_ARROW: OrderedDict[str, pa.Table] = OrderedDict()  # path -> memory-mapped table
_GROUPS: OrderedDict[tuple[str, str, int], pa.Array] = OrderedDict()  # (path, column, row group)
_OFFSETS: dict[str, list[int]] = {}  # parquet path -> first row of each row group
_MAX_ARROW, _MAX_GROUPS = 8, 4


def _arrow_table(path: str) -> pa.Table:
    with _LOCK:
        table = _ARROW.get(path)
        if table is not None:
            _ARROW.move_to_end(path)
            return table
    try:
        source = pa.memory_map(path)
        try:
            table = pa.ipc.open_stream(source).read_all()  # what datasets' ArrowWriter writes
        except pa.ArrowInvalid:
            table = pa.ipc.open_file(pa.memory_map(path)).read_all()
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read Arrow file {path}: {err}; is the save_to_disk copy complete?") from None
    _remember(_ARROW, path, table, _MAX_ARROW)
    return table


def _parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read parquet file {path}: {err}; is the download complete?") from None


def column_names(ref: TableRef) -> list[str]:
    if ref.kind == "arrow":
        return list(_arrow_table(ref.path).column_names)
    return list(_parquet(ref.path).schema_arrow.names)


def read_rows(ref: TableRef, columns: Sequence[str], required: Iterable[str] = (),
              what: str = "the benchmark") -> list[dict[str, Any]]:
    """The named columns of every row (those the file lacks are left out; ``required`` ones
    missing are a DataError naming the file)."""
    have = column_names(ref)
    missing = [c for c in required if c not in have]
    if missing:
        raise DataError(f"{ref.path} has no column {missing[0]!r} (its columns: {', '.join(have)}); is it a "
                        f"file of {what}?")
    cols = [c for c in columns if c in have]
    try:
        if ref.kind == "arrow":
            table = _arrow_table(ref.path).select(cols)
        else:
            table = pq.read_table(ref.path, columns=cols)
    except (OSError, pa.ArrowException) as err:
        raise DataError(f"cannot read {ref.path}: {err}") from None
    return table.to_pylist()


def non_null(ref: TableRef, column: str) -> list[bool]:
    """Which rows hold a value in ``column`` (BLINK's image_2..image_4 are empty for some
    sub-tasks); parquet row groups are streamed, so memory stays bounded."""
    if column not in column_names(ref):
        return []
    if ref.kind == "arrow":
        return _arrow_table(ref.path).column(column).is_valid().to_pylist()
    out: list[bool] = []
    for batch in _parquet(ref.path).iter_batches(columns=[column], batch_size=64):
        out.extend(batch.column(0).is_valid().to_pylist())
    return out


def _parquet_cell(path: str, column: str, row: int) -> Any:
    with _LOCK:
        offsets = _OFFSETS.get(path)
    if offsets is None:
        meta = _parquet(path).metadata
        offsets, start = [], 0
        for g in range(meta.num_row_groups):
            offsets.append(start)
            start += meta.row_group(g).num_rows
        offsets.append(start)
        with _LOCK:
            _OFFSETS[path] = offsets
    if not 0 <= row < offsets[-1]:
        raise DataError(f"{path} has {offsets[-1]} rows, not row {row}; did the file change since listing?")
    group = bisect.bisect_right(offsets, row) - 1
    key = (path, column, group)
    with _LOCK:
        arr = _GROUPS.get(key)
        if arr is not None:
            _GROUPS.move_to_end(key)
    if arr is None:
        try:
            arr = _parquet(path).read_row_group(group, columns=[column]).column(0)
        except (OSError, pa.ArrowException) as err:
            raise DataError(f"cannot read {path}: {err}") from None
        _remember(_GROUPS, key, arr, _MAX_GROUPS)
    return arr[row - offsets[group]].as_py()


def decode_image(value: Any, base: Path, where: str) -> Image.Image:
    """A Hugging Face image cell ({"bytes", "path"}, or raw bytes) as an RGB image (lmms-eval
    converts every image with ``.convert("RGB")``)."""
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
    else:
        data, path = value, None
    try:
        if data:
            with Image.open(io.BytesIO(data)) as img:
                return img.convert("RGB")
        if path:
            file = Path(path) if Path(path).is_absolute() else base / path
            if not file.is_file():
                raise DataError(f"{where}: the image has no bytes and its path {file} does not exist")
            return open_rgb(str(file))
    except DataError:
        raise
    except Exception as err:  # PIL raises many types for broken data
        raise DataError(f"{where}: cannot decode the image: {err}") from None
    raise DataError(f"{where}: the image cell is empty")


def open_rgb(path: str) -> Image.Image:
    """Decode a file fully and close it."""
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except FileNotFoundError:
        raise DataError(f"image {path} does not exist") from None
    except Exception as err:
        raise DataError(f"cannot read image {path}: {err}") from None


@dataclass(frozen=True)
class TableImage:
    """Loader of the image in one cell of a table (picklable)."""

    path: str
    kind: str
    column: str
    row: int

    def __call__(self) -> Image.Image:
        where = f"{self.path} row {self.row} column {self.column!r}"
        if self.kind == "arrow":
            value = _arrow_table(self.path).column(self.column)[self.row].as_py()
        else:
            value = _parquet_cell(self.path, self.column, self.row)
        return decode_image(value, Path(self.path).parent, where)


def table_image(ref: TableRef, column: str, row: int) -> TableImage:
    return TableImage(ref.path, ref.kind, column, row)


@dataclass(frozen=True)
class FileImage:
    """Loader of an image file (picklable)."""

    path: str

    def __call__(self) -> Image.Image:
        return open_rgb(self.path)


# --- layouts ---------------------------------------------------------------------------------------


def _saved_dataset(folder: Path) -> list[TableRef]:
    """The Arrow files of one ``Dataset.save_to_disk`` folder, in state.json order."""
    state_path = folder / "state.json"
    try:
        state = json.loads(state_path.read_text(encoding="utf-8"))
        files = [f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"{state_path} is not a datasets save_to_disk state file ({err}); is the copy "
                        f"complete?") from None
    refs = []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DataError(f"{path} is listed in {state_path} but does not exist; is the save_to_disk copy "
                            f"complete?")
        refs.append(TableRef(str(path), "arrow"))
    return refs


def hf_splits(folder: Path) -> dict[str, list[TableRef]]:
    """Split name -> tables of one Hugging Face dataset config stored in ``folder``.

    Recognised, in this order: a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` +
    one folder per split), a ``Dataset.save_to_disk`` folder (``state.json``; the split is its
    ``_split`` or "" when unrecorded), hub parquet files directly in the folder
    (``<split>-00000-of-00001.parquet``; any other ``<name>.parquet`` is split ``<name>``), and
    the hub's parquet-converter layout (``<split>/0000.parquet``). {} when none is there.
    """
    if not folder.is_dir():
        return {}
    dict_json = folder / "dataset_dict.json"
    if dict_json.is_file():
        try:
            splits = json.loads(dict_json.read_text(encoding="utf-8"))["splits"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise DataError(f"{dict_json} is not a datasets save_to_disk split list ({err})") from None
        return {s: _saved_dataset(folder / s) for s in splits}
    if (folder / "state.json").is_file():
        try:
            split = json.loads((folder / "state.json").read_text(encoding="utf-8")).get("_split") or ""
        except (OSError, ValueError, AttributeError):
            split = ""
        return {split: _saved_dataset(folder)}
    out: dict[str, list[TableRef]] = {}
    for path in sorted(folder.glob("*.parquet")):
        match = _SHARD.match(path.name)
        out.setdefault(match.group("split") if match else path.stem, []).append(TableRef(str(path), "parquet"))
    if out:
        return out
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in sub.glob("*.parquet") if _CONVERTED.match(p.name))
        if files:
            out[sub.name] = [TableRef(str(p), "parquet") for p in files]
    return out


def require_root(benchmark: str, root: str | None, hint: str) -> Path:
    """The benchmark's --data-root as an existing directory, or a one-line error saying what to pass."""
    return existing_root(root, benchmark, hint, what="benchmark")


# --- options ---------------------------------------------------------------------------------------


def _key(name: str) -> str:
    return re.sub(r"[\s\-_]+", "_", name.strip().lower())


def select(benchmark: str, value: str | Sequence[str] | None, known: Sequence[str],
           aliases: dict[str, Sequence[str]] | None = None, what: str = "subset") -> tuple[str, ...]:
    """Resolve a --split value ("count,color", an alias, a list) to known names, in ``known``
    order; None selects all. Matching ignores case and treats spaces, "-" and "_" alike."""
    if value is None:
        return tuple(known)
    if isinstance(value, str):
        asked = [v for v in (p.strip() for p in value.split(",")) if v]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        asked = [v.strip() for v in value if v.strip()]
    else:
        raise UsageError(f"benchmark {benchmark!r}: --split {value!r} must be a {what} name or a comma list")
    if not asked:
        raise UsageError(f"benchmark {benchmark!r}: --split is empty; name a {what} or drop --split for all")
    by_key = {_key(k): k for k in known}
    alias_keys = {_key(a): tuple(v) for a, v in (aliases or {}).items()}
    chosen: set[str] = set()
    for name in asked:
        if _key(name) in alias_keys:
            chosen.update(alias_keys[_key(name)])
        elif _key(name) in by_key:
            chosen.add(by_key[_key(name)])
        else:
            listed = ", ".join([*known, *(aliases or {})])
            raise UsageError(f"benchmark {benchmark!r} has no {what} {name!r}; its {what}s: {listed}")
    return tuple(k for k in known if k in chosen)


def int_option(benchmark: str, name: str, value: Any, minimum: int) -> int:
    """An integer option that may arrive as a string from --option KEY=VALUE."""
    if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UsageError(f"benchmark {benchmark!r} option {name}={value!r} must be an integer >= {minimum}")
    return value


def float_option(benchmark: str, name: str, value: Any, minimum: float) -> float:
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < minimum:
        raise UsageError(f"benchmark {benchmark!r} option {name}={value!r} must be a number >= {minimum}")
    return float(value)


def apply_limit(benchmark: str, items: list, limit: int | None) -> list:
    if limit is None:
        return items
    return items[: int_option(benchmark, "limit", limit, 0)]


def check_unique(benchmark: str, qids: Iterable[str], where: str) -> None:
    seen: set[str] = set()
    for q in qids:
        if q in seen:
            raise DataError(f"{where}: question id {q!r} occurs twice; benchmark {benchmark!r} needs unique ids")
        seen.add(q)


# --- answers ---------------------------------------------------------------------------------------


def option_letters(n: int) -> str:
    """ "A, B, C, D" for four options, as lmms-eval fills its pre_prompt."""
    return ", ".join(LETTERS[i] for i in range(n))


def gold_letter(answer: Any, where: str) -> str:
    """ "(A)" -> "A" (lmms-eval: ``doc["answer"].strip("()")``)."""
    letter = str(answer or "").strip().strip("()").strip()
    if len(letter) != 1 or letter not in LETTERS:
        raise DataError(f"{where}: answer {answer!r} is not an option letter like '(A)'")
    return letter


def extract_letter(text: str, valid_letters: str = LETTERS) -> str:
    """The option letter of a free-form answer, "" when there is none.

    lmms-eval ``tasks/blink/utils.py`` ``_extract_answer_letter`` (release 0.7.3), rule for
    rule: (1) a first line of at most 4 characters that is just the letter ("C", "(C)", "A."),
    (2) the last "answer is (B)" / "answer: B", (3) the last parenthesised letter "(C)",
    (4) a leading letter ("B) a cat"); only ``valid_letters`` count, so "The answer ..." is
    never read as "T".
    """
    text = text.strip()
    letters = re.escape(valid_letters.upper())
    first_line = text.split("\n", 1)[0].strip()
    if len(first_line) <= 4:
        match = re.match(rf"^\(?([{letters}])\)?[\.\s:,)]*$", first_line, flags=re.IGNORECASE)
        if match:
            return match.group(1).upper()
    matches = re.findall(rf"answers?(?:\s+is)?\s*[:\-]?\s*\(?([{letters}])\)?(?![A-Za-z])", text, flags=re.IGNORECASE)
    if matches:
        return matches[-1].upper()
    matches = re.findall(rf"\(([{letters}])\)", text)
    if matches:
        return matches[-1].upper()
    match = re.match(rf"[\(\s]*([{letters}])[\)\.\s]*", text, flags=re.IGNORECASE)
    if match:
        return match.group(1).upper()
    return ""


def leading_letter(text: str) -> str:
    """lmms-eval ``tasks/cv_bench/utils.py`` ``_extract_answer_letter``: the first character
    (after spaces and "(") if it is a letter A-Z in either case, upper-cased; "" otherwise.
    Unlike BLINK's rule it is not limited to the options: "The answer is (B)" reads as "T"."""
    match = re.match(r"[\(\s]*([A-Z])[\)\.\s]*", text.strip(), flags=re.IGNORECASE)
    return match.group(1).upper() if match else ""


def predictions_of(benchmark: str, items: Sequence[Any], predictions: dict[str, str]) -> list[str]:
    """The generated text of every item, in item order; a missing one is a UsageError."""
    missing = [it.qid for it in items if it.qid not in predictions]
    if missing:
        raise UsageError(f"benchmark {benchmark!r}: no prediction for {len(missing)} of {len(items)} questions "
                         f"(first: {missing[0]!r}); score the items that were answered")
    out = []
    for it in items:
        text = predictions[it.qid]
        if not isinstance(text, str):
            raise UsageError(f"benchmark {benchmark!r}: the prediction for {it.qid!r} is {type(text).__name__}, "
                             f"not the generated text")
        out.append(text)
    return out


def row(subset: str, metric: str, value: float) -> dict[str, Any]:
    return {"subset": subset, "metric": metric, "value": float(value)}


def accuracy(flags: Sequence[bool]) -> float:
    return sum(bool(f) for f in flags) / len(flags) if flags else 0.0
