"""Tiny on-disk copies of the PASCAL VOC (+SBD), co-segmentation, ImageNet-S, COCO and BDD100K layouts.

Why expose the spec and mask functions: tests compare what an adapter reads with what was
written, pixel for pixel and label for label.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from layouts import davis_palette  # the PASCAL VOC colour map

# --- PASCAL VOC 2012 + SegmentationClassAug ---------------------------------------------------

VOC_SIZE = (48, 40)  # width, height
# image id -> [(VOC class id, (x0, y0, x1, y1)), ...]; a 1-pixel 255 border surrounds each object
VOC_VAL = {
    "2007_000001": [(1, (4, 4, 30, 30))],
    "2007_000002": [(1, (2, 2, 20, 20)), (3, (24, 10, 44, 36))],
    "2007_000003": [(1, (10, 6, 40, 34))],
    "2007_000004": [(3, (6, 6, 26, 30)), (15, (30, 4, 46, 38))],
    "2007_000005": [(3, (12, 8, 40, 30))],
    "2007_000006": [(2, (2, 2, 7, 6)), (3, (14, 10, 44, 38))],  # bicycle: 20 px, below min_pixels=50
    "2007_000007": [(15, (8, 8, 40, 36))],  # person only: no fold-0 class
    "2007_000008": [(1, (20, 12, 46, 38))],
}
VOC_TRAIN = {
    "2008_000001": [(4, (4, 4, 30, 30))],
    "2008_000002": [(4, (10, 10, 40, 34))],
}


def tiny_voc_mask(image_id: str) -> np.ndarray:
    """The class mask written for ``image_id`` (values: class ids, 255 borders, 0 background)."""
    width, height = VOC_SIZE
    mask = np.zeros((height, width), np.uint8)
    for cls, (x0, y0, x1, y1) in {**VOC_VAL, **VOC_TRAIN}[image_id]:
        mask[max(y0 - 1, 0): y1 + 1, max(x0 - 1, 0): x1 + 1] = 255
        mask[y0:y1, x0:x1] = cls
    return mask


def _noisy_rgb(mask: np.ndarray, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    img = rng.integers(40, 120, (*mask.shape, 3), dtype=np.uint8)
    img[(mask > 0) & (mask < 255)] += 100
    return Image.fromarray(img, "RGB")


def make_tiny_voc(root: Path, aug: bool = True, plain: bool = True, devkit: bool = True) -> Path:
    """Write VOCdevkit/VOC2012 (or VOC2012/ when ``devkit`` is False) under root; returns root.

    ``plain`` writes SegmentationClass/ (palette PNGs, as in the VOC tar), ``aug`` writes
    SegmentationClassAug/ (grey PNGs, as in the SBD-augmented release)."""
    root = Path(root)
    voc = root / "VOCdevkit" / "VOC2012" if devkit else root / "VOC2012"
    for sub in ("JPEGImages", "ImageSets/Segmentation") + (("SegmentationClass",) if plain else ()) + (
            ("SegmentationClassAug",) if aug else ()):
        (voc / sub).mkdir(parents=True, exist_ok=True)
    palette = davis_palette()
    for n, image_id in enumerate(sorted({**VOC_VAL, **VOC_TRAIN})):
        mask = tiny_voc_mask(image_id)
        _noisy_rgb(mask, n).save(voc / "JPEGImages" / f"{image_id}.jpg", quality=95)
        if plain:
            png = Image.fromarray(mask, "P")
            png.putpalette(palette)
            png.save(voc / "SegmentationClass" / f"{image_id}.png")
        if aug:
            Image.fromarray(mask, "L").save(voc / "SegmentationClassAug" / f"{image_id}.png")
    sets = voc / "ImageSets" / "Segmentation"
    (sets / "val.txt").write_text("".join(f"{i}\n" for i in VOC_VAL))
    (sets / "train.txt").write_text("".join(f"{i}\n" for i in VOC_TRAIN))
    return root


# --- co-segmentation sets (Object Discovery layout) --------------------------------------------

COSEG_SETS = {"cow": 3, "plane": 2}
COSEG_SIZE = (40, 32)


def tiny_coseg_mask(set_index: int, i: int) -> np.ndarray:
    """0/1 object mask of image i of set number ``set_index`` (sorted set order)."""
    width, height = COSEG_SIZE
    mask = np.zeros((height, width), np.uint8)
    x0, y0 = 3 + 4 * i + set_index, 4 + 2 * i
    mask[y0: y0 + 14, x0: x0 + 18] = 1
    return mask


def make_tiny_coseg(root: Path, sets: dict[str, int] | None = None) -> Path:
    """<root>/<set>/<name>.jpg + <root>/<set>/GroundTruth/<name>.png, ground truth in the formats
    seen in the wild: grey 0/255 PNG, 1-bit PNG (image 1) and a BMP image with a BMP mask (image 2)."""
    root = Path(root)
    for s, (name, n) in enumerate(sorted((sets or COSEG_SETS).items())):
        folder = root / name
        (folder / "GroundTruth").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            mask = tiny_coseg_mask(s, i)
            stem = f"{name}{i:03d}"
            image = _noisy_rgb(mask, 10 * s + i)
            if i == 2:
                image.save(folder / f"{stem}.bmp")
                Image.fromarray(mask * 255, "L").save(folder / "GroundTruth" / f"{stem}.bmp")
            else:
                image.save(folder / f"{stem}.jpg", quality=95)
                gt = Image.fromarray(mask * 255, "L")
                (gt.convert("1") if i == 1 else gt).save(folder / "GroundTruth" / f"{stem}.png")
    return root


# --- ImageNet-S ---------------------------------------------------------------------------------

def fake_wnids(n: int) -> list[str]:
    """n distinct wnid-like ids, deliberately not in sorted order (as the categories file is not)."""
    ids = [f"n{1000000 + 7919 * k % 100003:08d}" for k in range(n)]
    assert len(set(ids)) == n
    return ids


def imagenet_s_ids(mask_rgb: np.ndarray) -> np.ndarray:
    return mask_rgb[..., 0].astype(np.int32) + 256 * mask_rgb[..., 1].astype(np.int32)


def tiny_imagenet_s_classes(variant: int, wnids: Sequence[str]) -> dict[str, list[int]]:
    """wnid folder -> class ids drawn in its images: its own id and, for the first image, one other."""
    order = sorted(wnids)
    picks = [order[0], order[min(3, len(order) - 1)], order[-1]]  # last one: id = variant (> 255 for 919)
    return {w: [order.index(w) + 1] for w in picks}


def tiny_imagenet_s_mask(own: int, other: int | None, size: tuple[int, int] = (36, 28)) -> np.ndarray:
    """Class-id map: background 0, own class, optional other class, an ignore (1000) band."""
    width, height = size
    ids = np.zeros((height, width), np.int32)
    ids[4:20, 4:20] = own
    if other is not None:
        ids[18:26, 22:34] = other
    ids[:, 0] = 1000
    return ids


def make_tiny_imagenet_s(root: Path, variant: int = 50, n_images: int = 2, categories: bool = True,
                         names: str | None = "LOC_synset_mapping.txt") -> tuple[Path, list[str]]:
    """Write <root>/ImageNetS<variant>/{validation,validation-segmentation}/<wnid>/ for three
    classes; the categories file (unsorted, as shipped) and a wnid -> name file in root.
    Returns (root, the wnids in categories-file order)."""
    root = Path(root)
    base = root / f"ImageNetS{variant}"
    wnids = fake_wnids(variant)
    order = sorted(wnids)
    for wnid, (own,) in tiny_imagenet_s_classes(variant, wnids).items():
        (base / "validation" / wnid).mkdir(parents=True, exist_ok=True)
        (base / "validation-segmentation" / wnid).mkdir(parents=True, exist_ok=True)
        for k in range(n_images):
            other = (own % variant) + 1 if k == 0 else None
            ids = tiny_imagenet_s_mask(own, other)
            rgb = np.zeros((*ids.shape, 3), np.uint8)
            rgb[..., 0], rgb[..., 1] = ids % 256, ids // 256
            stem = f"ILSVRC2012_val_{order.index(wnid) * 10 + k:08d}"
            Image.fromarray(rgb, "RGB").save(base / "validation-segmentation" / wnid / f"{stem}.png")
            _noisy_rgb((ids > 0).astype(np.uint8), own + k).save(base / "validation" / wnid / f"{stem}.JPEG")
    if categories:
        (root / f"ImageNetS_categories_im{variant}.txt").write_text("\n".join(wnids))
    if names == "LOC_synset_mapping.txt":
        (root / names).write_text("".join(f"{w} thing {i}, synonym {i}\n" for i, w in enumerate(reversed(order))))
    elif names == "imagenet_class_index.json":
        (root / names).write_text(json.dumps({str(i): [w, f"thing_{i}"] for i, w in enumerate(order)}))
    return root, wnids


def imagenet_s_name(line_names: str, order: list[str], wnid: str) -> str:
    """The name make_tiny_imagenet_s wrote for ``wnid`` (first name of its line)."""
    if line_names == "imagenet_class_index.json":
        return f"thing_{order.index(wnid)}"
    return f"thing {list(reversed(order)).index(wnid)}"


# --- COCO ---------------------------------------------------------------------------------------

COCO_IDS = ("000000000139", "000000000285", "000000000632")


def make_tiny_coco(root: Path, split: str = "val2017") -> Path:
    """<root>/<split>/<12-digit id>.jpg (written out of order), a hidden file and an annotation dir."""
    root = Path(root)
    (root / split).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for k, image_id in enumerate(reversed(COCO_IDS)):
        Image.fromarray(rng.integers(0, 256, (20 + 4 * k, 30, 3), dtype=np.uint8), "RGB").save(
            root / split / f"{image_id}.jpg")
    (root / split / "._000000000139.jpg").write_bytes(b"resource fork")
    (root / "annotations").mkdir(exist_ok=True)
    return root


# --- BDD100K 10K sem_seg ------------------------------------------------------------------------

BDD_SIZE = (64, 36)
# name -> (frame tags or None when untagged, which det_20 file carries the tags)
BDD_VAL = {
    "7d06fefd-f7be05a6": ({"weather": "clear", "scene": "city street", "timeofday": "daytime"}, "det_val"),
    "7d128593-0ccfea4c": ({"weather": "rainy", "scene": "highway", "timeofday": "night"}, "det_val"),
    "7d15b18b-1e0d6e3f": ({"weather": "clear", "scene": "city street", "timeofday": "night"}, "det_train"),
    "80a9e37d-e4548ac1": (None, None),  # in the 10K set but in no 100K label file
}
BDD_TRAIN = {
    "0a0a0b1a-7c39d841": ({"weather": "overcast", "scene": "residential", "timeofday": "dawn/dusk"}, "det_train"),
}


def tiny_bdd_trainids(name: str) -> np.ndarray:
    """trainId mask written for ``name``: road, sky, a car, 255 (unknown) patch; seeded by name."""
    width, height = BDD_SIZE
    k = sorted({**BDD_VAL, **BDD_TRAIN}).index(name)
    mask = np.full((height, width), 255, np.uint8)
    mask[: height // 3] = 10  # sky
    mask[2 * height // 3:] = 0  # road
    mask[height // 3: 2 * height // 3, 4 + 3 * k: 20 + 3 * k] = 13  # car
    mask[height // 3: 2 * height // 3, 40:48] = 18 if k % 2 else 5  # bicycle or pole
    return mask


def _frame(name: str, tags: dict | None) -> dict:
    frame = {"name": f"{name}.jpg", "timestamp": 10000,
             "labels": [{"id": "1", "category": "car", "attributes": {"occluded": False, "truncated": False},
                         "box2d": {"x1": 1.0, "y1": 2.0, "x2": 3.0, "y2": 4.0}}]}
    if tags is not None:
        frame["attributes"] = tags
    return frame


def make_tiny_bdd(root: Path, det20: bool = True) -> Path:
    """Write <root>/bdd100k/{images/10k,labels/sem_seg}/..., sem_seg polygon JSONs without frame
    tags (as released) and, if ``det20``, labels/det_20/det_{train,val}.json carrying the tags
    plus one 100K-only frame."""
    root = Path(root)
    base = root / "bdd100k"
    det: dict[str, list] = {"det_train": [_frame("ffffffff-00000000", {"weather": "snowy", "scene": "tunnel",
                                                                      "timeofday": "night"})], "det_val": []}
    for split, spec in (("val", BDD_VAL), ("train", BDD_TRAIN)):
        img_dir = base / "images" / "10k" / split
        mask_dir = base / "labels" / "sem_seg" / "masks" / split
        poly_dir = base / "labels" / "sem_seg" / "polygons"
        for d in (img_dir, mask_dir, poly_dir):
            d.mkdir(parents=True, exist_ok=True)
        for n, (name, (tags, where)) in enumerate(spec.items()):
            mask = tiny_bdd_trainids(name)
            _noisy_rgb((mask == 13).astype(np.uint8), n).save(img_dir / f"{name}.jpg", quality=90)
            Image.fromarray(mask, "L").save(mask_dir / f"{name}.png")
            if where:
                det[where].append(_frame(name, tags))
        (poly_dir / f"sem_seg_{split}.json").write_text(json.dumps(
            [{"name": f"{name}.jpg", "labels": []} for name in spec]))
    if det20:
        (base / "labels" / "det_20").mkdir(parents=True, exist_ok=True)
        for key, frames in det.items():
            (base / "labels" / "det_20" / f"{key}.json").write_text(json.dumps(frames))
    return root
