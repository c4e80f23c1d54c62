"""Co-segmentation image sets with binary ground truth (MSRC7, Internet300), for cosegmentation.

Layout read: the Object Discovery layout of Rubinstein et al. 2013 (the release Internet300
comes in; MSRC co-segmentation sets are arranged the same way), one folder per image set::

    <root>/<set>/<name>.jpg              (.jpeg, .png or .bmp)
    <root>/<set>/GroundTruth/<name>.png  binary mask (.bmp also read; <name>_GT.* accepted)

Amir et al. 2022 (cosegmentation.py) read the same ``<root>/<set>/`` folders. Each set is one
co-segmentation problem whose common foreground is its class. Ground truth may be 0/255 or
0/1 grey, 1-bit, palette (index > 0 is foreground) or grey-valued RGB; a colour mask (e.g. an
MSRC-v2 multi-class ``_GT.bmp``) is refused, because "not black" there is not the object.

Stored masks: 0 background, 1 the set's object, meta {"labels": {"1": class id}} with class
ids indexing structure()["classes"] = ["background", <sets sorted>].
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, read_mask_image
from kvpipe.pipeline.datasets.common import existing_root, visible_files
from kvpipe.pipeline.datasets.folder import open_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
GT_DIR = "GroundTruth"
GT_EXTENSIONS = (".png", ".bmp")
COLOUR_TOLERANCE = 32  # grey masks saved as RGB (or JPEG'd) differ across channels by a little


def binary_mask(path: Path) -> np.ndarray:
    """A ground-truth file as a 0/1 uint8 foreground map (see the module docstring for formats)."""
    mode, arr = read_mask_image(path, "ground-truth mask")
    if mode in ("P", "1"):
        return (arr > 0).astype(np.uint8)
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.int16)
        if int((rgb.max(axis=-1) - rgb.min(axis=-1)).max()) > COLOUR_TOLERANCE:
            raise DataError(f"ground-truth mask {path} is a colour image; co-segmentation needs a binary "
                            f"object mask (black background, white object)")
        arr = rgb.mean(axis=-1)
    threshold = 0 if arr.max() <= 1 else 127
    return (arr > threshold).astype(np.uint8)


def find_gt(gt_dir: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}_GT"):
        for ext in GT_EXTENSIONS:
            for candidate in (gt_dir / f"{name}{ext}", gt_dir / f"{name}{ext.upper()}"):
                if candidate.is_file():
                    return candidate
    return None


def parse_sets(value: Any) -> list[str] | None:
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UsageError("dataset 'msrc' option sets is empty; give set folder names separated by commas")
    return sorted(set(names))


@DATASETS.register
class MsrcDataset(DatasetAdapter):
    """Every image of every co-segmentation set under --data-root, with its binary object mask."""

    tasks = ("cosegmentation", "input-agnostic")
    needs_root = True
    root_hint = "the folder holding one folder per image set, each with its images and a GroundTruth/ folder"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 sets: str | None = None):
        if split not in (None, "default"):
            raise UsageError(f"dataset 'msrc' has no splits; drop --split {split} (choose image sets with "
                             f"the 'sets' option)")
        super().__init__(root, "default", limit)
        self.sets = parse_sets(sets)

    def _set_dirs(self) -> tuple[Path, list[Path]]:
        root = existing_root(self.root, self.name, self.root_hint)
        found = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
                       key=lambda p: p.name)
        found = [p for p in found if (p / GT_DIR).is_dir() or visible_files(p, IMAGE_EXTENSIONS)]
        if self.sets is not None:
            names = {p.name for p in found}
            missing = [s for s in self.sets if s not in names]
            if missing:
                raise DataError(f"image set {missing[0]!r} is not a folder of --data-root {root}; "
                                f"sets there: {', '.join(sorted(names)) or 'none'}")
            found = [p for p in found if p.name in self.sets]
        if not found:
            raise DataError(f"--data-root {root} has no image-set folders; point it at {self.root_hint}")
        return root, found

    def _listing(self) -> tuple[Path, list[tuple[str, Path, Path]]]:
        """(set name, image, ground truth) for every image, sets and images sorted by name."""
        root, set_dirs = self._set_dirs()
        items = []
        for folder in set_dirs:
            gt_dir = folder / GT_DIR
            images = visible_files(folder, IMAGE_EXTENSIONS)
            if not images:
                raise DataError(f"image set folder {folder} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            stems = [p.stem for p in images]
            twins = sorted({s for s in stems if stems.count(s) > 1})
            if twins:
                raise DataError(f"image set folder {folder} holds several images named {twins[0]!r} (different "
                                f"extensions); keep one, image ids are <set>/<name>")
            for img in images:
                gt = find_gt(gt_dir, img.stem)
                if gt is None:
                    raise DataError(f"image {img} has no ground-truth mask; expected {gt_dir / (img.stem + '.png')}")
                items.append((folder.name, img, gt))
        return root, items

    def classes(self) -> list[str]:
        _, set_dirs = self._set_dirs()
        return ["background"] + [p.name for p in set_dirs]

    def records(self) -> list[ImageRecord]:
        root, items = self._listing()
        class_of = {name: i for i, name in enumerate(self.classes())}
        if self.limit is not None:
            items = items[: max(self.limit, 0)]
        out = []
        for frame_in_set, (set_name, img, gt) in _numbered(items):
            out.append(ImageRecord(
                image_id=f"{set_name}/{img.stem}", source=str(img),
                load_image=lambda p=str(img): open_image(p),
                load_annotation=lambda g=gt, c=class_of[set_name], s=set_name: Annotation(
                    binary_mask(g), {"labels": {"1": c}, "image_set": s, "mask_file": g.relative_to(root).as_posix()}),
                group=set_name, frame=frame_in_set))
        return out

    def structure(self) -> dict[str, Any]:
        classes = self.classes()
        image_sets: dict[str, dict[str, Any]] = {}
        for rec in self.records():
            image_sets.setdefault(rec.group, {"images": [], "class": classes.index(rec.group)})
            image_sets[rec.group]["images"].append(rec.image_id)
        return {"classes": classes, "image_sets": image_sets}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "sets": self.sets}


def _numbered(items: list[tuple[str, Path, Path]]):
    """Position of each image inside its set, alongside the item."""
    counts: dict[str, int] = {}
    for item in items:
        n = counts.get(item[0], 0)
        counts[item[0]] = n + 1
        yield n, item
