"""PASCAL-5i few-shot segmentation episodes over the PASCAL VOC 2012 layout, for fg-seg.

Layout read (the VOC devkit plus the SBD-augmented masks used by PFENet / HSNet)::

    <root>/VOCdevkit/VOC2012/     (or <root>/VOC2012/, or <root> itself)
        JPEGImages/<id>.jpg
        SegmentationClassAug/<id>.png    grey PNG, value = VOC class id, 255 = ignore border
        SegmentationClass/<id>.png       palette PNG, same values (used when Aug is absent)
        ImageSets/Segmentation/{train,val}.txt

Fold i holds classes 5i+1..5i+5 (fold 0: aeroplane, bicycle, bird, boat, bottle). Test episodes
follow HSNet: the fold's (image, class) list of the split (val) is walked in order, wrapping
around, until there are ``n_episodes`` episodes (1000 by default); each gets ``shots`` support
images of its class from that list, never the query itself and distinct (as in PFENet; HSNet's
sampler may repeat one), drawn from a generator seeded by ``seed``. HSNet ships the list
(data/splits/pascal/val/fold<i>.txt, lines "<id>__<class>"); pass it as ``fold_list`` to use it
exactly. Without it the list is derived from the masks: every (image, fold class) with at least
``min_pixels`` pixels of that class (2*32*32, the small-object filter PFENet inherits from OSLSM).

Why episodes live in structure(), not in records: the store keeps one copy of each image's
features; the fg-seg probe assembles episodes from dataset.json. ``--limit N`` keeps the first
N episodes (and only their images), so the store never refers to images it lacks.
An image's texts["class"] is the VOC name of its episodes' class when they all share one
(an image in episodes of two classes has none).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, load_palette_mask
from kvpipe.pipeline.datasets.common import existing_root, first_dir, int_option, read_id_list
from kvpipe.pipeline.datasets.folder import open_image

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
N_FOLDS = 4
MASK_DIRS = ("SegmentationClassAug", "SegmentationClass")
IGNORE = 255


def fold_classes(fold: int) -> list[int]:
    """VOC class ids of Pascal-5i fold ``fold`` (5i+1 .. 5i+5)."""
    return list(range(5 * fold + 1, 5 * fold + 6))


def mask_labels(mask: np.ndarray) -> dict[str, int]:
    """{"<label>": class id} for the VOC classes present (label = class id; 0 and 255 left out)."""
    present = np.flatnonzero(np.bincount(mask.ravel(), minlength=256))
    return {str(int(v)): int(v) for v in present if 0 < v < len(VOC_CLASSES)}


def _class_text(classes: set[int]) -> dict[str, str]:
    """texts["class"] of an image whose episodes all share one class (none when they differ)."""
    return {"class": VOC_CLASSES[next(iter(classes))]} if len(classes) == 1 else {}


def read_fold_list(path: Path, classes: list[int], images: set[str]) -> list[tuple[str, int]]:
    """(image id, class id) pairs of an HSNet-style fold file ("<id>__<class>" per line)."""
    if not path.is_file():
        raise DataError(f"fold_list {path} does not exist; pass HSNet's data/splits/pascal/val/fold<i>.txt "
                        f"or leave fold_list unset to derive the list from the masks")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        image, sep, cls = line.rpartition("__")
        if not sep or not cls.isdigit():
            raise DataError(f"fold_list {path} line {n} is {line!r}; expected '<image id>__<class id>'")
        if int(cls) not in classes:
            raise DataError(f"fold_list {path} line {n} names class {int(cls)}, not one of this fold's "
                            f"classes {classes}; is it the list of another fold?")
        if image not in images:
            raise DataError(f"fold_list {path} line {n} names image {image!r}, which the split list "
                            f"does not contain")
        pairs.append((image, int(cls)))
    return sorted(set(pairs))


@DATASETS.register
class Pascal5iDataset(DatasetAdapter):
    """Query and support images of Pascal-5i test episodes of one fold, with their VOC class masks."""

    tasks = ("fg-seg", "input-agnostic")
    needs_root = True
    root_hint = "the folder holding VOCdevkit/VOC2012 (JPEGImages/, SegmentationClass[Aug]/, ImageSets/)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 fold: int = 0, shots: int = 5, n_episodes: int = 1000, seed: int = 0,
                 min_pixels: int = 2 * 32 * 32, masks: str = "auto", fold_list: str | None = None):
        super().__init__(root, split or "val", limit)
        self.fold = int_option(self.name, "fold", fold, 0, N_FOLDS - 1)
        self.shots = int_option(self.name, "shots", shots, 1)
        self.n_episodes = int_option(self.name, "n_episodes", n_episodes, 1)
        self.seed = int_option(self.name, "seed", seed, 0)
        self.min_pixels = int_option(self.name, "min_pixels", min_pixels, 0)
        if masks not in ("auto",) + MASK_DIRS:
            raise UsageError(f"dataset 'pascal5i' option masks={masks!r} must be 'auto', "
                             f"{MASK_DIRS[0]!r} or {MASK_DIRS[1]!r}")
        self.masks = masks
        self.fold_list = fold_list
        self._cache: tuple[Path, Path, list[dict[str, Any]]] | None = None

    # --- layout ---------------------------------------------------------------------------

    def _voc(self) -> Path:
        root = existing_root(self.root, self.name, self.root_hint)
        candidates = [root / "VOCdevkit" / "VOC2012", root / "VOC2012", root]
        voc = first_dir(c for c in candidates if (c / "JPEGImages").is_dir())
        if voc is None:
            raise DataError(f"--data-root {root} holds no VOC2012 JPEGImages/ (looked in "
                            f"{', '.join(str(c) for c in candidates)}); point it at {self.root_hint}")
        return voc

    def _mask_dir(self, voc: Path) -> Path:
        names = MASK_DIRS if self.masks == "auto" else (self.masks,)
        found = first_dir(voc / n for n in names)
        if found is None:
            raise DataError(f"{voc} has no {' or '.join(n + '/' for n in names)}; unpack the VOC "
                            f"segmentation masks (or the SBD-augmented SegmentationClassAug) there")
        return found

    def _pairs(self, voc: Path, mask_dir: Path) -> list[tuple[str, int]]:
        split_file = voc / "ImageSets" / "Segmentation" / f"{self.split}.txt"
        images = read_id_list(split_file, "split file", f"--split {self.split} expects ImageSets/Segmentation/"
                              f"{self.split}.txt in the VOC2012 folder")
        classes = fold_classes(self.fold)
        if self.fold_list is not None:
            return read_fold_list(Path(self.fold_list).expanduser(), classes, set(images))
        pairs = []
        for image in images:
            counts = np.bincount(self._read_mask(mask_dir, image).ravel(), minlength=256)
            pairs.extend((image, c) for c in classes if counts[c] >= max(self.min_pixels, 1))
        return pairs

    def _read_mask(self, mask_dir: Path, image: str) -> np.ndarray:
        path = mask_dir / f"{image}.png"
        if not path.is_file():
            raise DataError(f"mask {path} does not exist but {image} is in the split list; "
                            f"is the {mask_dir.name} download complete?")
        return load_palette_mask(str(path))

    # --- episodes -------------------------------------------------------------------------

    def _episodes(self, pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
        """HSNet's test protocol, seeded: cycle through the pairs, draw distinct supports."""
        if not pairs:
            raise DataError(f"no {self.split} image of fold {self.fold} (classes "
                            f"{', '.join(VOC_CLASSES[c] for c in fold_classes(self.fold))}) has "
                            f">= {self.min_pixels} pixels of its class; check the masks or lower min_pixels")
        by_class: dict[int, list[str]] = {}
        for image, cls in pairs:
            by_class.setdefault(cls, []).append(image)
        rng = np.random.default_rng(self.seed)
        n = self.n_episodes if self.limit is None else min(self.n_episodes, max(self.limit, 0))
        episodes = []
        for k in range(n):
            query, cls = pairs[k % len(pairs)]
            pool = [im for im in by_class[cls] if im != query]
            if len(pool) < self.shots:
                raise DataError(f"class {cls} ({VOC_CLASSES[cls]}) has {len(pool)} other images in the fold "
                                f"list, fewer than shots={self.shots}; lower shots or min_pixels")
            picks = rng.choice(len(pool), size=self.shots, replace=False)
            episodes.append({"query": query, "support": [pool[i] for i in picks], "class": cls})
        return episodes

    def _state(self) -> tuple[Path, Path, list[dict[str, Any]]]:
        """Layout check, pair list and episodes, computed once per adapter (masks are read once)."""
        if self._cache is None:
            voc = self._voc()
            mask_dir = self._mask_dir(voc)
            self._cache = (voc, mask_dir, self._episodes(self._pairs(voc, mask_dir)))
        return self._cache

    # --- adapter contract -----------------------------------------------------------------

    def records(self) -> list[ImageRecord]:
        voc, mask_dir, episodes = self._state()
        ids = sorted({im for ep in episodes for im in (ep["query"], *ep["support"])})
        classes: dict[str, set[int]] = {}
        for ep in episodes:
            for im in (ep["query"], *ep["support"]):
                classes.setdefault(im, set()).add(ep["class"])
        out = []
        for image in ids:
            jpg = voc / "JPEGImages" / f"{image}.jpg"
            if not jpg.is_file():
                raise DataError(f"image {jpg} does not exist but {image} is in an episode; "
                                f"is the VOC2012 JPEGImages download complete?")
            out.append(ImageRecord(image_id=image, source=str(jpg),
                                   load_image=lambda p=str(jpg): open_image(p),
                                   load_annotation=lambda i=image: self._annotation(voc, mask_dir, i),
                                   texts=_class_text(classes[image])))
        return out

    def _annotation(self, voc: Path, mask_dir: Path, image: str) -> Annotation:
        mask = self._read_mask(mask_dir, image)
        return Annotation(mask, {"labels": mask_labels(mask),
                                 "mask_file": (mask_dir / f"{image}.png").relative_to(voc).as_posix()})

    def structure(self) -> dict[str, Any]:
        _, _, episodes = self._state()
        return {"classes": list(VOC_CLASSES), "fold": self.fold, "fold_classes": fold_classes(self.fold),
                "shots": self.shots, "episodes": episodes}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "fold": self.fold, "shots": self.shots, "n_episodes": self.n_episodes,
                "seed": self.seed, "min_pixels": self.min_pixels, "masks": self.masks,
                "fold_list": self.fold_list}
