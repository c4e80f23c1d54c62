"""Tiny on-disk copies of the RefCOCO (refer toolkit) and SPair-71k layouts.

Why the expected values live here too: tests compare what an adapter reads with what was
written, and the masks below are worked out by hand from the COCO conventions (polygon
coordinates on pixel corners; RLE runs column-major, starting with zeros).
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import numpy as np
from PIL import Image

# --- RefCOCO -------------------------------------------------------------------------------------

# COCO image id -> (height, width)
REFCOCO_IMAGES = {9: (6, 8), 25: (4, 5), 30: (4, 5), 40: (4, 4), 50: (4, 4)}
REFCOCO_CATEGORIES = [{"supercategory": "person", "id": 1, "name": "person"},
                      {"supercategory": "vehicle", "id": 3, "name": "car"},
                      {"supercategory": "animal", "id": 18, "name": "dog"}]
REFCOCO_ANNS = [
    # image 9: two overlapping rectangles as polygons (the second split into two polygons) and one
    # object that no ref mentions
    {"id": 101, "image_id": 9, "category_id": 1, "iscrowd": 0, "area": 12.0, "bbox": [1, 1, 4, 3],
     "segmentation": [[1, 1, 5, 1, 5, 4, 1, 4]]},
    {"id": 102, "image_id": 9, "category_id": 18, "iscrowd": 0, "area": 16.0, "bbox": [3, 2, 4, 4],
     "segmentation": [[3, 2, 7, 2, 7, 4, 3, 4], [3, 4, 7, 4, 7, 6, 3, 6]]},
    {"id": 103, "image_id": 9, "category_id": 3, "iscrowd": 0, "area": 2.0, "bbox": [0, 5, 2, 1],
     "segmentation": [[0, 5, 2, 5, 2, 6, 0, 6]]},
    # image 25: uncompressed RLE; image 30: compressed RLE string
    {"id": 201, "image_id": 25, "category_id": 3, "iscrowd": 1, "area": 6.0, "bbox": [1, 1, 2, 3],
     "segmentation": {"counts": [5, 3, 1, 3, 8], "size": [4, 5]}},
    {"id": 301, "image_id": 30, "category_id": 1, "iscrowd": 1, "area": 7.0, "bbox": [0, 0, 4, 4],
     # runs [2, 6, 4, 1, 7]: runs from the fourth on are stored minus the run two before
     # (1 - 6 = -5, 7 - 4 = 3), each in 5-bit groups + 48: 2 3 4 -> '2' '6' '4', -5 -> 'K', 3 -> '3'
     "segmentation": {"counts": "264K3", "size": [4, 5]}},
    {"id": 401, "image_id": 40, "category_id": 1, "iscrowd": 0, "area": 4.0, "bbox": [0, 0, 2, 2],
     "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
    {"id": 501, "image_id": 50, "category_id": 1, "iscrowd": 0, "area": 4.0, "bbox": [0, 0, 2, 2],
     "segmentation": [[0, 0, 2, 0, 2, 2, 0, 2]]},
    {"id": 502, "image_id": 50, "category_id": 3, "iscrowd": 0, "area": 4.0, "bbox": [2, 2, 2, 2],
     "segmentation": [[2, 2, 4, 2, 4, 4, 2, 4]]},
]
# (ref_id, ann_id, image_id, split, category_id, sentences)
REFCOCO_REFS = [
    (1, 101, 9, "val", 1, ["man on left", "left guy"]),
    (2, 102, 9, "val", 18, ["dog", "left guy"]),
    (3, 201, 25, "val", 3, ["red car "]),
    (4, 301, 30, "val", 1, ["person in back", ""]),
    (5, 401, 40, "train", 1, ["train only"]),
    (6, 501, 50, "testA", 1, ["person A"]),
    (7, 502, 50, "testB", 3, ["car B"]),
]
REFCOCO_VAL_QUERIES = ["man on left", "left guy", "dog", "red car", "person in back"]


def refcoco_expected_masks() -> dict[int, np.ndarray]:
    """The val images' label maps, by hand: label k = k-th referred annotation by id."""
    m9 = np.zeros((6, 8), np.uint8)
    m9[2:6, 3:7] = 2  # ann 102: polygons (3,2)-(7,4) and (3,4)-(7,6) -> rows 2..5, columns 3..6
    m9[1:4, 1:5] = 1  # ann 101: rows 1..3, columns 1..4; smaller (12 < 16 px), so drawn on top
    m25 = np.array([[0, 0, 0, 0, 0],
                    [0, 1, 1, 0, 0],
                    [0, 1, 1, 0, 0],
                    [0, 1, 1, 0, 0]], np.uint8)  # runs 5,3,1,3,8 down the columns
    m30 = np.array([[0, 1, 0, 1, 0],
                    [0, 1, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [1, 1, 0, 0, 0]], np.uint8)  # runs 2,6,4,1,7 down the columns
    return {9: m9, 25: m25, 30: m30}


def refcoco_refs() -> list[dict]:
    out = []
    sent_id = 1000
    for ref_id, ann_id, image_id, split, cat, sents in REFCOCO_REFS:
        entries = []
        for s in sents:
            entries.append({"tokens": s.split(), "raw": s.upper(), "sent_id": sent_id, "sent": s})
            sent_id += 1
        out.append({"image_id": image_id, "split": split, "sentences": entries,
                    "file_name": f"COCO_train2014_{image_id:012d}_{ann_id}.jpg", "category_id": cat,
                    "ann_id": ann_id, "sent_ids": [e["sent_id"] for e in entries], "ref_id": ref_id})
    return out


def make_tiny_refcoco(root: Path, protocol: int = 2) -> Path:
    """Write <root>/refcoco/{refs(unc).p, instances.json} and the train2014 JPEGs."""
    root = Path(root)
    data = root / "refcoco"
    data.mkdir(parents=True, exist_ok=True)
    with open(data / "refs(unc).p", "wb") as f:
        pickle.dump(refcoco_refs(), f, protocol=protocol)
    images = [{"license": 1, "file_name": f"COCO_train2014_{i:012d}.jpg", "height": h, "width": w, "id": i}
              for i, (h, w) in REFCOCO_IMAGES.items()]
    (data / "instances.json").write_text(json.dumps(
        {"images": images, "annotations": REFCOCO_ANNS, "categories": REFCOCO_CATEGORIES}))
    img_dir = root / "images" / "mscoco" / "images" / "train2014"
    img_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (h, w) in REFCOCO_IMAGES.items():
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(
            img_dir / f"COCO_train2014_{i:012d}.jpg", quality=95)
    return root


# --- SPair-71k -----------------------------------------------------------------------------------

SPAIR_IMAGES = {"cat/2008_000001": (40, 30), "cat/2008_000002": (36, 32), "cat/2009_000003": (30, 40),
                "dog/2008_000001": (40, 30), "dog/2010_000004": (32, 32)}  # id -> (width, height)
# split -> [(pair id, src, trg, src_kps, trg_kps, trg_bndbox)]
SPAIR_PAIRS = {
    "test": [
        ("000001-2008_000001-2008_000002:cat", "2008_000001", "2008_000002",
         [[3, 4], [10, 12], [20, 5]], [[5, 6], [12, 13], [25, 7]], [2, 3, 30, 28]),
        ("000002-2009_000003-2008_000001:cat", "2009_000003", "2008_000001",
         [[7, 8]], [[9, 10]], [1, 1, 35, 25]),
        ("000003-2008_000001-2010_000004:dog", "2008_000001", "2010_000004",
         [[1, 2], [30, 20]], [[2, 3], [28, 25]], [0, 0, 31, 31]),
    ],
    "val": [
        ("000001-2008_000002-2009_000003:cat", "2008_000002", "2009_000003",
         [[4, 4]], [[6, 6]], [0, 0, 39, 29]),
    ],
    "trn": [
        ("000001-2010_000004-2008_000001:dog", "2010_000004", "2008_000001",
         [[5, 5]], [[7, 7]], [0, 0, 39, 29]),
    ],
}


def spair_pair_json(name: str, src: str, trg: str, skps: list, tkps: list, box: list) -> dict:
    """A PairAnnotation JSON with the release's fields (values beyond the ones read are plausible)."""
    cat = name.rsplit(":", 1)[1]
    sw, sh = SPAIR_IMAGES[f"{cat}/{src}"]
    tw, th = SPAIR_IMAGES[f"{cat}/{trg}"]
    return {"pair_id": int(name.split("-", 1)[0]), "filename": f"{name}.json", "src_imname": f"{src}.jpg",
            "trg_imname": f"{trg}.jpg", "src_imsize": [sw, sh, 3], "trg_imsize": [tw, th, 3],
            "src_bndbox": [0, 0, sw - 1, sh - 1], "trg_bndbox": box, "category": cat, "src_pose": 0,
            "trg_pose": 0, "src_kps": skps, "trg_kps": tkps, "kps_ids": [str(k) for k in range(len(skps))],
            "mirror": 0, "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0}


def make_tiny_spair(root: Path) -> Path:
    """Write <root>/SPair-71k/{JPEGImages, PairAnnotation, Layout/large, Layout/small}."""
    base = Path(root) / "SPair-71k"
    rng = np.random.default_rng(1)
    for image_id, (w, h) in SPAIR_IMAGES.items():
        path = base / "JPEGImages" / f"{image_id}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(path, quality=95)
    for split, pairs in SPAIR_PAIRS.items():
        ann_dir = base / "PairAnnotation" / split
        ann_dir.mkdir(parents=True, exist_ok=True)
        for name, src, trg, skps, tkps, box in pairs:
            (ann_dir / f"{name}.json").write_text(json.dumps(spair_pair_json(name, src, trg, skps, tkps, box)))
        for size in ("large", "small"):
            layout = base / "Layout" / size
            layout.mkdir(parents=True, exist_ok=True)
            listed = pairs if size == "large" else pairs[:1]
            (layout / f"{split}.txt").write_text("".join(f"{p[0]}\n" for p in listed))
    return Path(root)
