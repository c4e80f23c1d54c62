"""ImageNet-S (50 / 300 / 919 classes) validation masks and class-name queries, for semantic-seg.

Layout read (LUSSeg/ImageNet-S data preparation)::

    <root>/ImageNetS<N>/validation/<wnid>/<name>.JPEG
    <root>/ImageNetS<N>/validation-segmentation/<wnid>/<name>.png   RGB: class id = R + 256*G
    (also train-semi/ + train-semi-segmentation/; test/ has no public masks)

In the masks 0 is "other category" (background) and 1000 is ignored. Class id i (1..N) is the
i-th wnid of the *sorted* category list (the ImageNet-S README), i.e. of
``ImageNetS_categories_im<N>.txt`` from the toolbox's data/categories/, looked for in --data-root,
ImageNetS<N>/, its parent and data/categories/ (or given as ``categories``); without it, the
sorted wnid folders of <split>-segmentation/ must number exactly N.

Class names are not in the layout. They come from a wnid -> name file (``class_names``, or
found in the same folders): ImageNet's ``LOC_synset_mapping.txt`` / ``synset_words.txt``
("<wnid> <name>, <synonym>, ..."; the first name is used, like the names in ImageNet-S's evaluator)
or ``imagenet_class_index.json`` ({"0": [wnid, name]}). Without one the wnids themselves are
the names (documented fallback; structure()["class_name_source"] is the file name or "wnid").
Each record's texts["class"] is its folder's class name.

Why local mask labels: 919 classes do not fit a uint8 mask, so each image's classes become
labels 1..K (by class id) with meta {"labels": {"<label>": class id}}; 255 marks ignore.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, read_mask_image
from kvpipe.pipeline.datasets.common import existing_root, visible_files
from kvpipe.pipeline.datasets.folder import open_image

VARIANTS = (50, 300, 919)
SPLITS = {"validation": True, "train-semi": True, "test": False}  # split -> has public masks
IGNORE_ID = 1000
IGNORE = 255
IMAGE_EXTENSIONS = (".jpeg", ".jpg", ".png")
NAME_FILES = ("LOC_synset_mapping.txt", "synset_words.txt", "imagenet_class_index.json")


def decode_class_ids(path: Path) -> np.ndarray:
    """An ImageNet-S mask PNG as its int32 class-id map (R + 256*G)."""
    mode, arr = read_mask_image(path)
    if mode not in ("RGB", "RGBA"):
        raise DataError(f"mask {path} is mode {mode}; ImageNet-S masks are RGB with class id = R + 256*G")
    return arr[..., 0].astype(np.int32) + 256 * arr[..., 1].astype(np.int32)


def local_mask(ids: np.ndarray, n_classes: int, path: Path) -> tuple[np.ndarray, dict[str, int]]:
    """Class-id map -> uint8 labels (0 background, 1..K present classes by id, 255 ignore) + labels meta."""
    values = np.unique(ids)
    bad = [int(v) for v in values if not (0 <= v <= n_classes or v == IGNORE_ID)]
    if bad:
        raise DataError(f"mask {path} has class id {bad[0]}, outside 0..{n_classes} and {IGNORE_ID} (ignore); "
                        f"is it a mask of another ImageNet-S variant?")
    present = [int(v) for v in values if 0 < v <= n_classes]
    if len(present) > 254:
        raise DataError(f"mask {path} has {len(present)} classes; at most 254 fit a uint8 label mask")
    lut = np.zeros(max(n_classes, IGNORE_ID) + 1, np.uint8)
    lut[IGNORE_ID] = IGNORE
    for label, cls in enumerate(present, 1):
        lut[cls] = label
    return lut[ids], {str(label): cls for label, cls in enumerate(present, 1)}


def read_name_file(path: Path) -> dict[str, str]:
    """wnid -> first class name, from a synset-mapping text file or imagenet_class_index.json."""
    if not path.is_file():
        raise DataError(f"class_names file {path} does not exist; pass LOC_synset_mapping.txt, synset_words.txt "
                        f"or imagenet_class_index.json")
    names: dict[str, str] = {}
    try:
        if path.suffix.lower() == ".json":
            for entry in json.loads(path.read_text()).values():
                wnid, name = entry[0], entry[1]
                names[str(wnid)] = str(name)
        else:
            for line in path.read_text().splitlines():
                wnid, _, rest = line.strip().partition(" ")
                if wnid:
                    names[wnid] = rest.split(",")[0].strip() or wnid
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise DataError(f"class_names file {path} is not a wnid -> name mapping ({err})") from None
    return names


def _search_dirs(root: Path, base: Path) -> list[Path]:
    """Where side files (categories, class names) may sit: --data-root, the variant folder, its parent."""
    return list(dict.fromkeys((root, base, base.parent)))


@DATASETS.register
class ImageNetSDataset(DatasetAdapter):
    """Every image of an ImageNet-S split with its semantic mask; class names as text queries."""

    tasks = ("semantic-seg", "input-agnostic")
    needs_root = True
    root_hint = "the folder holding ImageNetS50/, ImageNetS300/ or ImageNetS919/ (or one of them)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 variant: int = 50, categories: str | None = None, class_names: str | None = None):
        split = {"val": "validation", "train": "train-semi"}.get(split or "validation", split or "validation")
        if split not in SPLITS:
            raise UsageError(f"dataset 'imagenet-s' has splits {', '.join(SPLITS)}; got --split {split}")
        super().__init__(root, split, limit)
        if isinstance(variant, str) and variant.strip().isdigit():
            variant = int(variant)
        if isinstance(variant, bool) or variant not in VARIANTS:
            raise UsageError(f"dataset 'imagenet-s' option variant={variant!r} must be 50, 300 or 919")
        self.variant = int(variant)
        self.categories = categories
        self.class_names = class_names
        self._meta: tuple[Path, list[str], list[str], str] | None = None

    # --- layout ---------------------------------------------------------------------------

    def _base(self) -> tuple[Path, Path]:
        root = existing_root(self.root, self.name, self.root_hint)
        folder = f"ImageNetS{self.variant}"
        base = root if root.name == folder else root / folder
        if not (base / self.split).is_dir():
            raise DataError(f"{base / self.split} does not exist; --data-root must be {self.root_hint} "
                            f"(variant {self.variant}, --split {self.split})")
        return root, base

    def _wnids(self, root: Path, base: Path) -> list[str]:
        """Sorted wnids: class id i is entry i-1."""
        name = f"ImageNetS_categories_im{self.variant}.txt"
        if self.categories is not None:
            path: Path | None = Path(self.categories).expanduser()
            if not path.is_file():
                raise DataError(f"categories file {path} does not exist; pass ImageNet-S's "
                                f"data/categories/{name}")
        else:
            path = next((d / name for d in (*_search_dirs(root, base), root / "data" / "categories")
                         if (d / name).is_file()), None)
        if path is not None:
            wnids = sorted({line.strip() for line in path.read_text().splitlines() if line.strip()})
            source = f"categories file {path}"
        else:
            seg = base / (f"{self.split}-segmentation" if SPLITS[self.split] else self.split)
            wnids = sorted(p.name for p in seg.iterdir() if p.is_dir() and not p.name.startswith(".")) \
                if seg.is_dir() else []
            source = f"the class folders of {seg}"
        if len(wnids) != self.variant:
            raise DataError(f"{source} gives {len(wnids)} classes, ImageNet-S-{self.variant} has {self.variant}; "
                            f"put ImageNet-S's {name} in --data-root or pass it as categories")
        return wnids

    def _names(self, root: Path, base: Path, wnids: list[str]) -> tuple[list[str], str]:
        if self.class_names is not None:
            path: Path | None = Path(self.class_names).expanduser()
        else:
            path = next((d / f for d in _search_dirs(root, base) for f in NAME_FILES if (d / f).is_file()), None)
        if path is None:
            return list(wnids), "wnid"
        mapping = read_name_file(path)
        missing = [w for w in wnids if w not in mapping]
        if missing:
            raise DataError(f"class_names file {path} has no name for {missing[0]} "
                            f"({len(missing)} of {len(wnids)} wnids missing)")
        return [mapping[w] for w in wnids], path.name

    def _state(self) -> tuple[Path, list[str], list[str], str]:
        if self._meta is None:
            root, base = self._base()
            wnids = self._wnids(root, base)
            names, source = self._names(root, base, wnids)
            self._meta = (base, wnids, names, source)
        return self._meta

    # --- adapter contract -----------------------------------------------------------------

    def records(self) -> list[ImageRecord]:
        base, wnids, names, _ = self._state()
        known = set(wnids)
        name_of = dict(zip(wnids, names))
        image_root = base / self.split
        seg_root = base / f"{self.split}-segmentation"
        has_masks = SPLITS[self.split]
        if has_masks and not seg_root.is_dir():
            raise DataError(f"{seg_root} does not exist; download the ImageNet-S annotations "
                            f"(datapreparation_anno.sh) into {base}")
        out: list[ImageRecord] = []
        for folder in sorted((p for p in image_root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                             key=lambda p: p.name):
            if folder.name not in known:
                raise DataError(f"class folder {folder} is not one of the ImageNet-S-{self.variant} categories; "
                                f"is --data-root the ImageNetS{self.variant} layout?")
            for img in visible_files(folder, IMAGE_EXTENSIONS):
                mask = seg_root / folder.name / f"{img.stem}.png" if has_masks else None
                if mask is not None and not mask.is_file():
                    raise DataError(f"mask {mask} does not exist for image {img}; is the "
                                    f"{seg_root.name} download complete?")
                out.append(ImageRecord(image_id=f"{folder.name}/{img.stem}", source=str(img),
                                       load_image=lambda p=str(img): open_image(p),
                                       load_annotation=lambda m=mask: self._annotation(base, m),
                                       texts={"class": name_of[folder.name]}))
        if not out:
            raise DataError(f"{image_root} holds no images; is the ImageNet-S {self.split} set prepared?")
        return out if self.limit is None else out[: max(self.limit, 0)]

    def _annotation(self, base: Path, mask: Path | None) -> Annotation:
        if mask is None:
            return Annotation(None, {"labels": {}, "mask_file": None})
        labels, meta = local_mask(decode_class_ids(mask), self.variant, mask)
        return Annotation(labels, {"labels": meta, "mask_file": mask.relative_to(base).as_posix()})

    def text_queries(self) -> list[str]:
        return list(self._state()[2])

    def structure(self) -> dict[str, Any]:
        _, wnids, names, source = self._state()
        return {"classes": ["background"] + names, "wnids": [""] + wnids,
                "class_queries": {str(i): i - 1 for i in range(1, len(names) + 1)},
                "class_name_source": source}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "variant": self.variant, "categories": self.categories,
                "class_names": self.class_names}
