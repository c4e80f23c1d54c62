"""SPair-71k in its official layout, for the semantic-corr (keypoint transfer) probe.

Layout read (the release archive, as the HPF/DHPF/CHM correspondence code reads it)::

    <root>/SPair-71k/Layout/large/<split>.txt       one pair id per line,
                                                    "<n>-<source>-<target>:<category>"
    <root>/SPair-71k/PairAnnotation/<split>/<pair id>.json
        src_imname, trg_imname ("2008_002719.jpg"), category, src_kps / trg_kps ([[x, y], ...]
        in pixels, row i of one matches row i of the other), src_bndbox / trg_bndbox
        ([x0, y0, x1, y1]), plus kps_ids, imsize, mirror and difficulty flags (not needed here)
    <root>/SPair-71k/JPEGImages/<category>/<name>.jpg

``--data-root`` may also point at the SPair-71k folder itself. Splits: test (default), val,
trn ("train" is accepted for trn).

records(): the unique images of the selected pairs, ids "<category>/<name>" (a VOC image can
serve two categories), sorted; no masks, meta {"category": ...}; texts {"class": category}
(SPair's own category name, e.g. "pottedplant"). With ``limit``, the first
``limit`` image ids; structure() then keeps only the pairs whose two images both remain.
structure()["pairs"]: one entry per pair, in layout-file order, keypoints and target box in
pixels of the original images (as the PCK@0.1-of-box protocol uses them); "name" is the pair id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord
from kvpipe.pipeline.datasets.common import existing_root
from kvpipe.pipeline.datasets.folder import open_image

DATASET_DIR = "SPair-71k"
SPLITS = ("test", "val", "trn")
SPLIT_ALIASES = {"train": "trn"}
LAYOUT_SIZE = "large"


@dataclass(frozen=True)
class Pair:
    name: str
    category: str
    source: str  # image id
    target: str
    source_kps: list[list[float]]
    target_kps: list[list[float]]
    target_bbox: list[float]
    source_file: str  # as the pair JSON names it, under JPEGImages/<category>/
    target_file: str

    def as_dict(self) -> dict[str, Any]:
        return {"source": self.source, "target": self.target, "source_kps": self.source_kps,
                "target_kps": self.target_kps, "target_bbox": self.target_bbox, "category": self.category,
                "name": self.name}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _points(value: Any) -> list[list[float]] | None:
    if not isinstance(value, list) or not value:
        return None
    if not all(isinstance(p, list) and len(p) == 2 and all(_number(c) for c in p) for p in value):
        return None
    return [[float(x), float(y)] for x, y in value]


def _image_stem(name: Any) -> str | None:
    if not isinstance(name, str) or not name or "/" in name or "\\" in name or name.startswith("."):
        return None
    return name[:-4] if name.lower().endswith(".jpg") else name


def parse_pair(data: Any, name: str, category: str, path: Path) -> Pair:
    """One PairAnnotation JSON as a Pair; anything malformed is a DataError naming the file."""
    def bad(what: str) -> DataError:
        return DataError(f"pair annotation {path}: {what}; is the SPair-71k download complete and unmodified?")

    if not isinstance(data, dict):
        raise bad("not a JSON object")
    if data.get("category", category) != category:
        raise bad(f"category {data.get('category')!r} differs from the layout's {category!r}")
    src, trg = _image_stem(data.get("src_imname")), _image_stem(data.get("trg_imname"))
    if src is None or trg is None:
        raise bad("src_imname / trg_imname must be image file names")
    skps, tkps = _points(data.get("src_kps")), _points(data.get("trg_kps"))
    if skps is None or tkps is None:
        raise bad("src_kps / trg_kps must be non-empty lists of [x, y]")
    if len(skps) != len(tkps):
        raise bad(f"{len(skps)} source but {len(tkps)} target keypoints")
    box = data.get("trg_bndbox")
    if not (isinstance(box, list) and len(box) == 4 and all(_number(v) for v in box)):
        raise bad("trg_bndbox must be [x0, y0, x1, y1]")
    return Pair(name, category, f"{category}/{src}", f"{category}/{trg}", skps, tkps, [float(v) for v in box],
                data["src_imname"], data["trg_imname"])


def _categories_option(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        items = [v.strip() for v in value]
    else:
        raise UsageError(f"dataset 'spair' option categories={value!r} must be a category name, a comma "
                         f"list (e.g. 'cat,dog') or a list of names")
    items = [v for v in items if v]
    if not items:
        raise UsageError("dataset 'spair' option categories is empty; name at least one category or drop it")
    return tuple(dict.fromkeys(items))


def _n_pairs_option(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"dataset 'spair' option n_pairs={value!r} must be an integer >= 1 (or unset for all)")
    return value


@DATASETS.register
class SPairDataset(DatasetAdapter):
    """The images of SPair-71k pairs, with the pairs' keypoints as dataset structure."""

    tasks = ("semantic-corr", "input-agnostic")
    needs_root = True
    root_hint = f"the folder holding {DATASET_DIR}/ (with JPEGImages/, PairAnnotation/ and Layout/)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 categories: str | Sequence[str] | None = None, n_pairs: int | None = None):
        split = SPLIT_ALIASES.get(split or "test", split or "test")
        if split not in SPLITS:
            raise UsageError(f"dataset 'spair' has no split {split!r}; its splits: {', '.join(SPLITS)}")
        super().__init__(root, split, limit)
        self.categories = _categories_option(categories)
        self.n_pairs = _n_pairs_option(n_pairs)
        self._pairs: list[Pair] | None = None

    def _base(self) -> Path:
        root = existing_root(self.root, self.name, self.root_hint)
        for base in (root / DATASET_DIR, root):
            if (base / "Layout").is_dir() and (base / "PairAnnotation").is_dir():
                return base
        raise DataError(f"{root / DATASET_DIR} has no Layout/ and PairAnnotation/; --data-root must be "
                        f"{self.root_hint}")

    def _layout(self, base: Path) -> list[tuple[str, str]]:
        """(pair id, category) of the split's layout file, in file order, repeats dropped."""
        path = base / "Layout" / LAYOUT_SIZE / f"{self.split}.txt"
        if not path.is_file():
            raise DataError(f"split file {path} does not exist; --split {self.split} expects "
                            f"Layout/{LAYOUT_SIZE}/{self.split}.txt under {base}")
        out = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            name = line.strip()
            if not name:
                continue
            if ":" not in name or not name.rsplit(":", 1)[1] or "/" in name:
                raise DataError(f"{path} line {n}: {name!r} is not a pair id like "
                                f"'000001-2008_002719-2008_004100:aeroplane'")
            out.append((name, name.rsplit(":", 1)[1]))
        return list(dict.fromkeys(out))

    def pairs(self) -> list[Pair]:
        """The selected pairs (split, categories, n_pairs), read once."""
        if self._pairs is not None:
            return self._pairs
        base = self._base()
        layout = self._layout(base)
        if self.categories is not None:
            known = sorted({c for _, c in layout})
            unknown = [c for c in self.categories if c not in known]
            if unknown:
                raise UsageError(f"dataset 'spair' split {self.split} has no category {unknown[0]!r}; "
                                 f"its categories: {', '.join(known)}")
            layout = [(n, c) for n, c in layout if c in self.categories]
        if self.n_pairs is not None:
            layout = layout[: self.n_pairs]
        if not layout:
            raise DataError(f"{base / 'Layout' / LAYOUT_SIZE / f'{self.split}.txt'} lists no pairs")
        ann_dir = base / "PairAnnotation" / str(self.split)
        pairs = []
        for name, cat in layout:
            path = ann_dir / f"{name}.json"
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                raise DataError(f"pair annotation {path} does not exist but the layout file lists it; is the "
                                f"SPair-71k download complete?") from None
            except (OSError, ValueError) as err:
                raise DataError(f"cannot read pair annotation {path}: {err}") from None
            pairs.append(parse_pair(data, name, cat, path))
        self._pairs = pairs
        return pairs

    def _image_ids(self) -> list[str]:
        ids = sorted({i for p in self.pairs() for i in (p.source, p.target)})
        return ids if self.limit is None else ids[: max(self.limit, 0)]

    def records(self) -> list[ImageRecord]:
        pairs = self.pairs()
        base = self._base()
        out = []
        files = {}
        for p in pairs:
            files.setdefault(p.source, p.source_file)
            files.setdefault(p.target, p.target_file)
        for image_id in self._image_ids():
            cat = image_id.split("/", 1)[0]
            path = base / "JPEGImages" / cat / files[image_id]
            if not path.is_file():
                raise DataError(f"image {path} does not exist but a pair of split {self.split} uses it; is "
                                f"the SPair-71k download complete?")
            out.append(ImageRecord(image_id=image_id, source=str(path),
                                   load_image=lambda p=str(path): open_image(p),
                                   load_annotation=lambda c=cat: Annotation(None, {"category": c}),
                                   texts={"class": cat}))
        return out

    def structure(self) -> dict[str, Any]:
        kept = set(self._image_ids())
        return {"pairs": [p.as_dict() for p in self.pairs() if p.source in kept and p.target in kept]}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "categories": list(self.categories) if self.categories else None,
                "n_pairs": self.n_pairs}
