"""Tiny copies of the question-answering benchmarks' official layouts.

Hugging Face copies are written as the hub serves them and as ``datasets`` writes them: image
columns are struct<bytes: binary, path: string> cells holding PNG/JPEG bytes (the ``Image``
feature), the schema carries the ``huggingface`` features metadata (``datasets.Features`` of
the Arrow types); ``save_to_disk`` folders are written by ``datasets`` itself
(``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``). Every image is one flat colour, so a
test can tell which row an image came from by its pixel.
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def color_of(n: int) -> tuple[int, int, int]:
    """A distinct, JPEG-robust colour per small integer."""
    return ((n * 53) % 256, (n * 97 + 40) % 256, (n * 151 + 80) % 256)


def image_bytes(n: int, size: tuple[int, int] = (12, 10), fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color_of(n)).save(buf, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def cell(n: int | None, fmt: str = "PNG", path: str | None = None) -> dict[str, Any] | None:
    return None if n is None else {"bytes": image_bytes(n, fmt=fmt), "path": path}


def _features(schema: pa.Schema, images: set[str]) -> dict[str, Any]:
    import datasets

    features = datasets.Features.from_arrow_schema(schema)
    for name in images:
        features[name] = datasets.Image()
    return features.to_dict()


def hf_table(columns: dict[str, list], images: tuple[str, ...] = ("image",)) -> pa.Table:
    arrays = {}
    for name, values in columns.items():
        if name in images:
            arrays[name] = pa.array(values, type=IMAGE)
        elif values and any(isinstance(v, list) for v in values):
            arrays[name] = pa.array(values, type=pa.list_(pa.string()))
        else:
            arrays[name] = pa.array(values)
    table = pa.table(arrays)
    meta = {b"huggingface": json.dumps({"info": {"features": _features(table.schema, set(images))}}).encode()}
    return table.replace_schema_metadata(meta)


def write_parquet(path: Path, columns: dict[str, list], images: tuple[str, ...] = ("image",)) -> Path:
    """A hub parquet file; row groups of 2 rows so readers must find the right group."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(hf_table(columns, images), path, row_group_size=2)
    return path


def hf_dataset(columns: dict[str, list], images: tuple[str, ...] = ("image",), split: str | None = None):
    """The rows as a ``datasets.Dataset`` (image columns of the ``Image`` feature)."""
    import datasets

    return datasets.Dataset(hf_table(columns, images), split=datasets.NamedSplit(split) if split else None)


def write_saved_dataset(folder: Path, columns: dict[str, list], images: tuple[str, ...] = ("image",),
                        split: str | None = None) -> Path:
    """``Dataset.save_to_disk``: Arrow shards + state.json + dataset_info.json."""
    hf_dataset(columns, images, split).save_to_disk(str(folder))
    return folder


def write_saved_dict(folder: Path, splits: dict[str, dict[str, list]], images: tuple[str, ...] = ("image",)) -> Path:
    """``DatasetDict.save_to_disk``: dataset_dict.json + one save_to_disk folder per split."""
    import datasets

    datasets.DatasetDict({name: hf_dataset(columns, images, name) for name, columns in splits.items()}) \
        .save_to_disk(str(folder))
    return folder


def columns_of(rows: list[dict[str, Any]], names: tuple[str, ...]) -> dict[str, list]:
    return {n: [r[n] for r in rows] for n in names}


# --- POPE ----------------------------------------------------------------------------------------

# (split, question_id, question, answer, COCO image number); image colour n = image number
POPE_ROWS = [
    ("adversarial", "1", "Is there a dog in the image?", "yes", 101),
    ("adversarial", "2", "Is there a cat in the image?", "no", 101),
    ("popular", "1", "Is there a car in the image?", "yes", 102),
    ("popular", "2", "Is there a bus in the image?", "no", 103),
    ("random", "1", "Is there a person in the image?", "yes", 104),
    ("random", "2", "Is there a zebra in the image?", "no", 104),
]
POPE_COLUMNS = ("id", "question_id", "question", "answer", "image_source", "image", "category")


def coco_name(n: int) -> str:
    return f"COCO_val2014_{n:012d}"


def _pope_row(i: int, r: tuple, fmt: str = "JPEG") -> dict[str, Any]:
    split, qid, question, answer, img = r
    return {"id": str(i), "question_id": qid, "question": question, "answer": answer,
            "image_source": coco_name(img), "image": cell(img, fmt), "category": split}


def make_pope_hub(root: Path) -> Path:
    """lmms-lab/POPE as on the hub: data/test-0000N-of-00002.parquet (default config, category =
    split) and Full/<split>-00000-of-00001.parquet."""
    rows = [_pope_row(i, r) for i, r in enumerate(POPE_ROWS)]
    write_parquet(root / "data" / "test-00000-of-00002.parquet", columns_of(rows[:3], POPE_COLUMNS))
    write_parquet(root / "data" / "test-00001-of-00002.parquet", columns_of(rows[3:], POPE_COLUMNS))
    for split in ("adversarial", "popular", "random"):
        part = [r for r in rows if r["category"] == split]
        write_parquet(root / "Full" / f"{split}-00000-of-00001.parquet", columns_of(part, POPE_COLUMNS))
    return root


def make_pope_saved(root: Path) -> Path:
    """A save_to_disk copy of the Full config: a DatasetDict with the three splits."""
    rows = [_pope_row(i, r, "PNG") for i, r in enumerate(POPE_ROWS)]
    splits = {s: columns_of([r for r in rows if r["category"] == s], POPE_COLUMNS)
              for s in ("adversarial", "popular", "random")}
    return write_saved_dict(root, splits)


def make_pope_original(root: Path) -> Path:
    """The POPE release: output/coco/coco_pope_<split>.json (JSON lines) + val2014/ images."""
    folder = root / "output" / "coco"
    folder.mkdir(parents=True, exist_ok=True)
    (root / "val2014").mkdir(parents=True, exist_ok=True)
    for split in ("random", "popular", "adversarial"):
        lines = []
        for s, qid, question, answer, img in POPE_ROWS:
            if s == split:
                lines.append(json.dumps({"question_id": int(qid), "image": f"{coco_name(img)}.jpg", "image_id": img,
                                         "text": question, "label": answer}))
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")
    for *_, img in POPE_ROWS:
        Image.new("RGB", (12, 10), color_of(img)).save(root / "val2014" / f"{coco_name(img)}.jpg", quality=95)
    return root


# --- MME -----------------------------------------------------------------------------------------

# (category, image file, [(question, answer), (question, answer)]); colour n = position in this list
MME_IMAGES = [
    ("count", "000000001.jpg", [("Are there two dogs in the image? Please answer yes or no.", "Yes"),
                                ("Are there three dogs in the image? Please answer yes or no.", "No")]),
    ("count", "000000002.jpg", [("Is there one cat in the image? Please answer yes or no.", "Yes"),
                                ("Are there two cats in the image? Please answer yes or no.", "No")]),
    ("color", "000000003.jpg", [("Is the car red? Please answer yes or no.", "Yes"),
                                ("Is the car blue? Please answer yes or no.", "No")]),
    ("artwork", "10002.jpg", [("Is this artwork a painting? Please answer yes or no.", "Yes"),
                              ("Is this artwork a glassware? Please answer yes or no.", "No")]),
    ("code_reasoning", "0020.png", [("Does the code print 3? Please answer yes or no.", "Yes"),
                                    ("Does the code print 4? Please answer yes or no.", "No")]),
]


def make_mme_hub(root: Path) -> Path:
    """lmms-lab/MME: data/test-00000-of-00001.parquet, question_id = "<category>/<image file>"."""
    rows = []
    for n, (cat, name, qas) in enumerate(MME_IMAGES):
        for q, a in qas:
            rows.append({"question_id": f"{cat}/{name}", "image": cell(n, "PNG"), "question": q, "answer": a,
                         "category": cat})
    write_parquet(root / "data" / "test-00000-of-00001.parquet",
                  columns_of(rows, ("question_id", "image", "question", "answer", "category")))
    return root


def make_mme_original(root: Path) -> Path:
    """MME_Benchmark_release_version/: artwork in the images/ + questions_answers_YN/ layout, the
    others with each image and its .txt side by side."""
    base = root / "MME_Benchmark_release_version"
    for n, (cat, name, qas) in enumerate(MME_IMAGES):
        split_layout = cat == "artwork"
        img_dir = base / cat / "images" if split_layout else base / cat
        txt_dir = base / cat / "questions_answers_YN" if split_layout else base / cat
        img_dir.mkdir(parents=True, exist_ok=True)
        txt_dir.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (12, 10), color_of(n)).save(img_dir / name)
        stem = name.rsplit(".", 1)[0]
        (txt_dir / f"{stem}.txt").write_text("".join(f"{q}\t{a}\n" for q, a in qas) + "\n")
    return root


# --- BLINK ---------------------------------------------------------------------------------------

BLINK_COLUMNS = ("idx", "question", "sub_task", "image_1", "image_2", "image_3", "image_4", "choices", "answer",
                 "prompt", "explanation")
BLINK_IMAGES = ("image_1", "image_2", "image_3", "image_4")


def blink_rows(sub: str, split: str, n_images: int, choices: list[str], answers: list[str], start: int) -> list[dict]:
    rows = []
    for k, ans in enumerate(answers, 1):
        question = f"Question {k} of {sub}?"
        options = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        row = {"idx": f"{split}_{sub}_{k}", "question": question, "sub_task": sub.replace("_", " "),
               "choices": list(choices), "answer": ans if split == "val" else "?",
               "prompt": f"{question}\nSelect from the following choices.\n{options}", "explanation": ""}
        for j, col in enumerate(BLINK_IMAGES):
            row[col] = cell(start + 10 * k + j, "JPEG") if j < n_images else None
        rows.append(row)
    return rows


def make_blink(root: Path) -> Path:
    """BLINK-Benchmark/BLINK with three sub-tasks in the three layouts: Art_Style as hub parquet
    (val + test), Counting in the parquet-converter layout (val/0000.parquet), Visual_Similarity
    as a DatasetDict save_to_disk copy."""
    art = blink_rows("Art_Style", "val", 3, ["the second image", "the third image"], ["(A)", "(B)", "(B)"], 0)
    write_parquet(root / "Art_Style" / "val-00000-of-00001.parquet", columns_of(art, BLINK_COLUMNS), BLINK_IMAGES)
    art_test = blink_rows("Art_Style", "test", 3, ["the second image", "the third image"], ["", ""], 0)
    write_parquet(root / "Art_Style" / "test-00000-of-00001.parquet", columns_of(art_test, BLINK_COLUMNS),
                  BLINK_IMAGES)
    count = blink_rows("Counting", "val", 1, ["0", "1", "2", "3"], ["(C)", "(D)"], 100)
    write_parquet(root / "Counting" / "val" / "0000.parquet", columns_of(count, BLINK_COLUMNS), BLINK_IMAGES)
    sim = blink_rows("Visual_Similarity", "val", 3, ["the second image", "the third image"], ["(A)", "(B)"], 200)
    sim_test = blink_rows("Visual_Similarity", "test", 3, ["the second image", "the third image"], ["", ""], 200)
    write_saved_dict(root / "Visual_Similarity", {"val": columns_of(sim, BLINK_COLUMNS),
                                                  "test": columns_of(sim_test, BLINK_COLUMNS)}, BLINK_IMAGES)
    return root


# --- CV-Bench ------------------------------------------------------------------------------------

CV_COLUMNS = ("idx", "type", "task", "image", "question", "choices", "answer", "prompt", "filename", "source",
              "source_dataset", "source_filename", "target_class", "target_size", "bbox")
# (idx, type, task, source, choices, answer)
CV_ROWS = [
    (0, "2D", "Count", "ADE20K", ["0", "1", "2", "3", "4"], "(C)"),
    (1, "2D", "Count", "COCO", ["1", "2", "3", "4"], "(A)"),
    (2, "2D", "Relation", "COCO", ["left", "right"], "(B)"),
    (3, "2D", "Relation", "ADE20K", ["above", "below"], "(A)"),
    (4, "3D", "Depth", "Omni3D", ["lamp", "chair"], "(A)"),
    (5, "3D", "Distance", "Omni3D", ["table", "sofa"], "(B)"),
]


def cv_rows() -> list[dict]:
    rows = []
    for idx, typ, task, source, choices, ans in CV_ROWS:
        question = f"How about question {idx}?"
        options = "\n".join(f"({chr(65 + i)}) {c}" for i, c in enumerate(choices))
        rows.append({"idx": idx, "type": typ, "task": task, "image": cell(300 + idx, "PNG"), "question": question,
                     "choices": list(choices), "answer": ans, "prompt": f"{question} Select from the following "
                     f"choices.\n{options}", "filename": f"img/{typ}/{task.lower()}/{idx}.png", "source": source,
                     "source_dataset": f"{source} Val", "source_filename": f"{idx}.jpg", "target_class": None,
                     "target_size": None, "bbox": None})
    return rows


def make_cvbench_hub(root: Path) -> Path:
    """nyu-visionx/CV-Bench as on the hub now: test_2d.parquet + test_3d.parquet."""
    rows = cv_rows()
    write_parquet(root / "test_2d.parquet", columns_of([r for r in rows if r["type"] == "2D"], CV_COLUMNS))
    write_parquet(root / "test_3d.parquet", columns_of([r for r in rows if r["type"] == "3D"], CV_COLUMNS))
    return root


def make_cvbench_saved(root: Path) -> Path:
    """A save_to_disk copy of the default config: a DatasetDict with split "test"."""
    return write_saved_dict(root, {"test": columns_of(cv_rows(), CV_COLUMNS)})


# --- SPair-71k with enough keypoints for four candidates -------------------------------------------

SPAIR_VQA_SIZE = (100, 80)  # every image, (width, height)
# (pair id, source, target, source keypoints, target keypoints, target box)
SPAIR_VQA_PAIRS = [
    ("000001-2008_000001-2008_000002:cat", "2008_000001", "2008_000002",
     [[12, 14], [70, 12], [15, 60], [75, 66], [40, 40]], [[10, 10], [80, 10], [10, 70], [80, 70], [50, 40]],
     [0, 0, 99, 79]),
    ("000002-2008_000003-2008_000001:cat", "2008_000003", "2008_000001",
     [[20, 20], [60, 20], [20, 60], [60, 60]], [[22, 18], [66, 24], [18, 58], [62, 64]], [5, 5, 95, 75]),
    ("000003-2008_000004-2008_000005:dog", "2008_000004", "2008_000005",  # 3 keypoints: never a question
     [[10, 10], [50, 50], [90, 70]], [[12, 12], [52, 48], [88, 72]], [0, 0, 99, 79]),
    ("000004-2008_000005-2008_000004:dog", "2008_000005", "2008_000004",  # 4 keypoints 2-4 px apart
     [[10, 10], [13, 10], [16, 10], [80, 70]], [[10, 10], [12, 10], [14, 10], [80, 70]], [0, 0, 99, 79]),
]


def make_spair_vqa(root: Path) -> Path:
    """<root>/SPair-71k in the release layout (test split), white images so markers are visible."""
    base = root / "SPair-71k"
    w, h = SPAIR_VQA_SIZE
    names = []
    for name, src, trg, skps, tkps, box in SPAIR_VQA_PAIRS:
        cat = name.rsplit(":", 1)[1]
        for img in (src, trg):
            path = base / "JPEGImages" / cat / f"{img}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (w, h), (255, 255, 255)).save(path, quality=95)
        ann = {"pair_id": int(name.split("-", 1)[0]), "filename": f"{name}.json", "src_imname": f"{src}.jpg",
               "trg_imname": f"{trg}.jpg", "src_imsize": [w, h, 3], "trg_imsize": [w, h, 3],
               "src_bndbox": [0, 0, w - 1, h - 1], "trg_bndbox": box, "category": cat, "src_pose": 0, "trg_pose": 0,
               "src_kps": skps, "trg_kps": tkps, "kps_ids": [str(k) for k in range(len(skps))], "mirror": 0,
               "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0}
        ann_dir = base / "PairAnnotation" / "test"
        ann_dir.mkdir(parents=True, exist_ok=True)
        (ann_dir / f"{name}.json").write_text(json.dumps(ann))
        names.append(name)
    layout = base / "Layout" / "large"
    layout.mkdir(parents=True, exist_ok=True)
    (layout / "test.txt").write_text("".join(f"{n}\n" for n in names))
    return root
