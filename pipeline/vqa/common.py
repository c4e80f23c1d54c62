"""What the question-answering benchmarks share: tables read through ``datasets``, lazy images,
options, parsing.

Why ``datasets``: the benchmarks ship in the Hugging Face formats -- hub parquet snapshots
(``<split>-00000-of-0000N.parquet`` per shard), ``save_to_disk`` folders, or the hub itself --
and the ``datasets`` library reads all of them into memory-mapped Arrow tables with their
features (an ``Image`` column decodes through its own feature). kvpipe keeps only what it
knows about a benchmark's copy: which files form which split (``hf_splits``) and which column
holds what. A --data-root that is no local path but looks like a hub id (``lmms-lab/POPE``) is
loaded with ``datasets.load_dataset``; offline that is a one-line error asking for a local copy.
Text columns are read up front; an image is decoded only when its loader is called. Loaders
are small dataclasses holding their table, so they pickle into DataLoader workers (a
memory-mapped table pickles as its file names).
"""

from __future__ import annotations

import io
import re
import string
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.roots import existing_root

LETTERS = string.ascii_uppercase

# lmms-eval's BLINK and CV-Bench pre_prompt (tasks/blink/_default_template_yaml,
# tasks/cv_bench/_default_template_yaml); "{}" becomes "A, B, C, ..." for the question's options.
MC_PRE_PROMPT = "Note: You only need to respond with {} without providing any additional information.\n"


# --- tables ----------------------------------------------------------------------------------------


@dataclass(eq=False)
class HFTable:
    """One split of a Hugging Face dataset: a ``datasets.Dataset`` and where it came from (for messages)."""

    data: Any  # datasets.Dataset
    name: str
    _arrow: Any = field(default=None, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {"data": self.data, "name": self.name, "_arrow": None}

    @property
    def column_names(self) -> list[str]:
        return list(self.data.column_names)

    def __len__(self) -> int:
        return len(self.data)

    def rows(self, columns: Sequence[str], required: Iterable[str] = (),
             what: str = "the benchmark") -> list[dict[str, Any]]:
        """The named columns of every row (those the table lacks are left out; ``required`` ones
        missing are a DataError naming the table)."""
        have = self.column_names
        missing = [c for c in required if c not in have]
        if missing:
            raise DataError(f"{self.name} has no column {missing[0]!r} (its columns: {', '.join(have)}); is it a "
                            f"copy of {what}?")
        cols = [c for c in columns if c in have]
        images = [c for c in cols if _is_image(self.data.features.get(c))]
        text = [c for c in cols if c not in images]
        try:
            out = self.data.select_columns(text).to_list() if text else [{} for _ in range(len(self.data))]
        except Exception as err:  # Arrow errors of a damaged copy
            raise DataError(f"cannot read {self.name}: {_first_line(err)}") from None
        for c in images:  # undecoded cells; an image is decoded by its loader only
            for r, v in zip(out, self.column(c).to_pylist()):
                r[c] = v
        return out

    def column(self, name: str) -> Any:
        """One column as Arrow (no decoding)."""
        if self._arrow is None:
            self._arrow = self.data.with_format("arrow")
        return self._arrow[name]

    def non_null(self, column: str) -> list[bool]:
        """Which rows hold a value in ``column`` ([] when there is no such column; BLINK's
        image_2..image_4 are empty for some sub-tasks)."""
        if column not in self.column_names:
            return []
        return self.column(column).is_valid().to_pylist()

    def image(self, column: str, row: int) -> "TableImage":
        return TableImage(self, column, row)


def _is_image(feature: Any) -> bool:
    return type(feature).__name__ == "Image"


@dataclass(frozen=True, eq=False)
class TableImage:
    """Loader of the image in one cell of a table (picklable)."""

    table: HFTable
    column: str
    row: int

    @property
    def path(self) -> str:
        return self.table.name

    def __call__(self) -> Image.Image:
        where = f"{self.table.name} row {self.row} column {self.column!r}"
        try:
            value = self.table.column(self.column)[self.row].as_py()
        except (IndexError, KeyError) as err:
            raise DataError(f"{where}: {err}; did the copy change since listing?") from None
        if value is None:
            raise DataError(f"{where}: the image cell is empty")
        feature = self.table.data.features.get(self.column)
        try:
            if _is_image(feature):
                img = feature.decode_example(value)
            else:  # a struct {bytes, path} or raw bytes without the Image feature
                data = value.get("bytes") if isinstance(value, dict) else value
                if not data:
                    raise DataError(f"{where}: the cell holds no image bytes")
                img = Image.open(io.BytesIO(data))
            img.load()
            return img.convert("RGB")  # lmms-eval converts every image with .convert("RGB")
        except DataError:
            raise
        except Exception as err:  # PIL and datasets raise many types for broken data
            raise DataError(f"{where}: cannot decode the image: {_first_line(err)}") from None


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
class FileImage:
    """Loader of an image file (picklable)."""

    path: str

    def __call__(self) -> Image.Image:
        return open_rgb(self.path)


# --- layouts ---------------------------------------------------------------------------------------

_SHARD = re.compile(r"^(?P<split>.+?)-\d{5}-of-\d{5}\.parquet$")
_CONVERTED = re.compile(r"^\d+\.parquet$")  # the hub's parquet-converter layout: <split>/0000.parquet
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class HubId(str):
    """A --data-root that is not a local path but a Hugging Face hub dataset id."""


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


@contextmanager
def _quiet() -> Iterator[Any]:
    """``datasets`` imported, its progress bars and info logging off for the call (they would
    break the one-line errors and the command's own progress)."""
    import datasets

    bars = datasets.is_progress_bar_enabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if bars:
            datasets.enable_progress_bars()


def _tables(loaded: Any, where: str) -> dict[str, HFTable]:
    """A ``Dataset`` (split "" unless recorded) or a ``DatasetDict`` as split -> table."""
    if hasattr(loaded, "keys") and not hasattr(loaded, "features"):  # DatasetDict
        return {str(s): HFTable(d, f"{where} split {s}") for s, d in loaded.items()}
    split = str(loaded.split) if getattr(loaded, "split", None) else ""
    return {split: HFTable(loaded, where)}


def load_saved(folder: Path) -> dict[str, HFTable]:
    """A ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` folder, through ``datasets.load_from_disk``."""
    with _quiet() as datasets:
        try:
            loaded = datasets.load_from_disk(str(folder))
        except Exception as err:
            raise DataError(f"cannot read the save_to_disk copy {folder}: {_first_line(err)}; is it complete?") from None
    return _tables(loaded, str(folder))


def load_parquet(files: dict[str, list[Path]], where: str) -> dict[str, HFTable]:
    """Parquet files by split, through ``datasets.load_dataset("parquet", ...)`` (whose cache,
    HF_DATASETS_CACHE, keeps the Arrow copy it reads from)."""
    names = {re.sub(r"\W", "_", s) or "train": s for s in files}
    with _quiet() as datasets:
        try:
            loaded = datasets.load_dataset("parquet", data_files={k: [str(p) for p in files[s]]
                                                                  for k, s in names.items()})
        except Exception as err:
            raise DataError(f"cannot read the parquet files of {where}: {_first_line(err)}; is the download "
                            f"complete?") from None
    return {names[k]: HFTable(d, f"{where} split {names[k]}") for k, d in loaded.items()}


def load_hub(repo_id: str, config: str | None = None) -> dict[str, HFTable]:
    """A dataset on the Hugging Face hub (``datasets.load_dataset(repo_id, config)``); offline, or
    when the hub cannot be reached, a one-line DataError naming the id and asking for a local copy."""
    what = repr(repo_id) + (f" (config {config!r})" if config else "")
    fix = ("download it where the hub is reachable (datasets.load_dataset(...).save_to_disk(DIR), or the parquet "
           "files) and pass that local copy")
    with _quiet() as datasets:
        if datasets.config.HF_HUB_OFFLINE:
            raise DataError(f"{what} is no local path and the hub is offline (HF_HUB_OFFLINE); {fix}")
        try:
            loaded = datasets.load_dataset(repo_id, config)
        except Exception as err:
            raise DataError(f"cannot load the hub dataset {what}: {_first_line(err)}; if it is a local path, it "
                            f"does not exist; else {fix}") from None
    return _tables(loaded, f"hub:{repo_id}" + (f"/{config}" if config else ""))


def hf_splits(folder: Path) -> dict[str, HFTable]:
    """Split name -> table of one Hugging Face dataset config stored in ``folder``.

    Recognised, in this order: a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json``), a
    ``Dataset.save_to_disk`` folder (``state.json``; the split is the one it recorded, or ""),
    hub parquet files directly in the folder (``<split>-00000-of-00001.parquet``; any other
    ``<name>.parquet`` is split ``<name>``), and the hub's parquet-converter layout
    (``<split>/0000.parquet``). {} when none is there. ``datasets`` reads them all.
    """
    if not folder.is_dir():
        return {}
    if (folder / "dataset_dict.json").is_file() or (folder / "state.json").is_file():
        return load_saved(folder)
    files: dict[str, list[Path]] = {}
    for path in sorted(folder.glob("*.parquet")):
        match = _SHARD.match(path.name)
        files.setdefault(match.group("split") if match else path.stem, []).append(path)
    if not files:
        for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            found = sorted(p for p in sub.glob("*.parquet") if _CONVERTED.match(p.name))
            if found:
                files[sub.name] = found
    return load_parquet(files, str(folder)) if files else {}


def data_source(root: str | None, name: str, hint: str, what: str = "benchmark") -> Path | HubId:
    """--data-root as an existing local directory, or a hub id (``owner/name``) when no such path
    exists; otherwise the one-line error of a missing root."""
    if root is not None and not Path(str(root)).expanduser().exists() and _HUB_ID.match(str(root)) \
            and not str(root).startswith((".", "~")):
        return HubId(str(root))
    return existing_root(root, name, hint, what=what)


def require_root(benchmark: str, root: str | None, hint: str) -> Path | HubId:
    """The benchmark's --data-root: a local directory, or a hub id; a one-line error says what to pass."""
    return data_source(root, benchmark, hint)

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
