"""RefCOCO (UNC splits) in the refer toolkit's layout, for the refexp-seg probe.

Layout read (the one ``REFER(data_root, dataset="refcoco", splitBy="unc")`` of the refer
toolkit reads)::

    <root>/refcoco/refs(unc).p          pickled list of refs: ref_id, ann_id, image_id, split,
                                        category_id, sentences [{"sent", ...}]
    <root>/refcoco/instances.json       COCO format: images, annotations (polygon or RLE
                                        segmentation), categories
    <root>/images/mscoco/images/train2014/<file_name of the image entry>
                                        (COCO_train2014_%012d.jpg when the entry has none)

Splits (as the toolkit selects them): ``train`` and ``val`` match a ref's split exactly;
``testA`` / ``testB`` take refs whose split starts with "test" and names that letter.

Per image: the mask is a uint8 label map where label k is the k-th referred object of the
image in the split, objects ordered by COCO annotation id; where two referred objects overlap,
the smaller one is drawn on top (a small object lying on a large one, like a cup on a table,
would otherwise vanish, while the large one loses only that patch). meta: "labels" (label ->
COCO category id, an index into structure()["classes"]), "refs" (label -> indices into
text_queries() of its expressions), "ann_ids" (label -> COCO annotation id), "coco_id".

text_queries(): every referring-expression sentence of the selected refs, whitespace-trimmed,
deduplicated, in the order of the refs file (with ``limit``, only the selected images' refs).

texts["caption"] (for ``--prefix-from caption``, the paper's Table 4): the image's COCO
caption with the lowest annotation id, whitespace-normalised, when COCO's
annotations/captions_train2014.json is found under --data-root (CAPTION_DIRS).

Masks are decoded with pycocotools (the COCO reference implementation of polygon
rasterisation and RLE), so they agree pixel for pixel with what the toolkit's getMask gives.

Why a restricted unpickler: refs(unc).p is a pickle, and a pickle can name any Python callable
and have it called while loading (``os.system`` included). kvpipe must never run code when
reading data, so the refs file is read by an unpickler that resolves no global at all: plain
lists, dicts, strings, numbers, booleans and None load; anything that names a class or a
function is refused with a DataError. The official files hold only plain data.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord
from kvpipe.pipeline.datasets.common import existing_root
from kvpipe.pipeline.datasets.folder import open_image

DATASET_DIR = "refcoco"
REFS_FILE = "refs(unc).p"
INSTANCES_FILE = "instances.json"
IMAGE_DIR = ("images", "mscoco", "images", "train2014")
CAPTIONS_FILE = "captions_train2014.json"  # COCO 2014 captions (annotations_trainval2014.zip)
# Where the captions file is looked for: COCO's own layout (<coco>/annotations/) with the COCO
# root at --data-root, beside the train2014/ image folder, or one level above it.
CAPTION_DIRS = (("annotations",), ("images", "mscoco", "images", "annotations"), ("images", "mscoco", "annotations"))
SPLITS = ("val", "testA", "testB", "train")
MAX_LABEL = 254  # 255 is "ignore" in kvpipe masks
PYCOCOTOOLS_PIN = "pycocotools==2.0.11"


# --- the refs pickle ---------------------------------------------------------------------------

class RefusedGlobal(pickle.UnpicklingError):
    """The pickle names a Python object (class or function) instead of holding plain data."""


class PlainDataUnpickler(pickle.Unpickler):
    """An unpickler that builds only builtin values and never imports or calls anything.

    Every code path by which a pickle can reach a callable (GLOBAL, STACK_GLOBAL, INST, OBJ,
    the copyreg extension codes, REDUCE/BUILD on what those return) goes through
    ``find_class``; refusing it for every name leaves only the opcodes that build lists,
    tuples, dicts, sets, strings, bytes, numbers, booleans and None. Persistent ids are
    refused too. Python 2 byte strings are decoded as UTF-8 (bad bytes become U+FFFD).
    """

    def __init__(self, file: Any) -> None:
        super().__init__(file, encoding="utf-8", errors="replace")

    def find_class(self, module: str, name: str) -> Any:
        raise RefusedGlobal(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise RefusedGlobal(f"persistent id {pid!r}")


def load_plain_pickle(path: Path) -> Any:
    """Unpickle ``path`` with :class:`PlainDataUnpickler`; any failure is a one-line DataError."""
    try:
        with open(path, "rb") as f:
            return PlainDataUnpickler(f).load()
    except FileNotFoundError:
        raise DataError(f"refs file {path} does not exist; --data-root must hold {DATASET_DIR}/{REFS_FILE} "
                        f"(the refer toolkit's data folder)") from None
    except RefusedGlobal as err:
        raise DataError(f"refusing to load {path}: the pickle references the Python object {err}, and "
                        f"loading it could run code; kvpipe reads only plain-data pickles (lists, dicts, "
                        f"strings, numbers), as in the official RefCOCO release; replace the file with "
                        f"the original") from None
    except Exception as err:  # truncated or corrupt pickles raise many types
        msg = str(err).replace("\n", " ")
        raise DataError(f"cannot read refs file {path}: {type(err).__name__}: {msg}; replace it with the "
                        f"original {REFS_FILE} of the RefCOCO release") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_refs(refs: Any, path: Path) -> list[dict[str, Any]]:
    if not isinstance(refs, list):
        raise DataError(f"refs file {path} holds a {type(refs).__name__}; expected a list of refs")
    for i, ref in enumerate(refs):
        problem = None
        if not isinstance(ref, dict):
            problem = f"is a {type(ref).__name__}, not a dict"
        else:
            for key in ("ref_id", "ann_id", "image_id", "category_id"):
                if not _is_int(ref.get(key)):
                    problem = f"has no integer {key!r}"
                    break
            else:
                sents = ref.get("sentences")
                if not isinstance(ref.get("split"), str):
                    problem = "has no string 'split'"
                elif not isinstance(sents, list) or not all(
                        isinstance(s, dict) and isinstance(s.get("sent"), str) for s in sents):
                    problem = "has no 'sentences' list of {'sent': str} entries"
        if problem:
            raise DataError(f"refs file {path}: ref #{i} {problem}; is it the refer toolkit's {REFS_FILE}?")
    return refs


def in_split(ref_split: str, split: str) -> bool:
    """The refer toolkit's getRefIds(split=...) rule for the UNC splits."""
    if split in ("testA", "testB"):
        return ref_split.startswith("test") and split[-1] in ref_split[4:]
    return ref_split == split


# --- segmentation -> mask ------------------------------------------------------------------------

def _cocomask() -> Any:
    try:
        from pycocotools import mask as cocomask
    except ImportError:
        raise DataError(f"dataset 'refcoco' decodes COCO polygons and RLE with pycocotools; "
                        f"install it: pip install {PYCOCOTOOLS_PIN}") from None
    return cocomask


def segmentation_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """A COCO ``segmentation`` (polygon list, uncompressed or compressed RLE) as an HxW 0/1 map.

    Polygon coordinates are pixel-corner based, as in COCO: the square [0, 1) x [0, 1) is pixel
    (0, 0), so the polygon (1,1)-(5,1)-(5,4)-(1,4) covers rows 1..3 and columns 1..4. Polygons
    with fewer than three points enclose nothing and are skipped. RLE runs are column-major
    (Fortran order), starting with a run of zeros. ``where`` names the annotation in errors.
    """
    cocomask = _cocomask()
    if isinstance(seg, list):
        polys = []
        for poly in seg:
            if not isinstance(poly, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                     for v in poly) or len(poly) % 2:
                raise DataError(f"{where}: a polygon must be a flat list of x, y numbers")
            if len(poly) >= 6:
                polys.append([float(v) for v in poly])
        if not polys:
            return np.zeros((height, width), np.uint8)
        rle = cocomask.merge(cocomask.frPyObjects(polys, height, width))
    elif isinstance(seg, dict) and "counts" in seg and "size" in seg:
        size = seg["size"]
        if not (isinstance(size, list) and len(size) == 2 and all(_is_int(s) for s in size)):
            raise DataError(f"{where}: RLE 'size' must be [height, width]")
        if list(size) != [height, width]:
            raise DataError(f"{where}: RLE size {size} differs from the image's [height, width] "
                            f"[{height}, {width}] in {INSTANCES_FILE}")
        counts = seg["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts) or sum(counts) != height * width:
                raise DataError(f"{where}: uncompressed RLE counts must be non-negative integers "
                                f"summing to height*width = {height * width}")
            rle = cocomask.frPyObjects(seg, height, width)
        elif isinstance(counts, str):
            rle = {"size": [height, width], "counts": counts.encode("ascii", "replace")}
        else:
            raise DataError(f"{where}: RLE 'counts' must be a list of run lengths or a COCO RLE string")
    else:
        raise DataError(f"{where}: segmentation must be a list of polygons or an RLE dict with counts and size")
    try:
        m = cocomask.decode(rle)
    except Exception as err:
        raise DataError(f"{where}: cannot decode segmentation: {err}") from None
    if m.shape != (height, width):
        raise DataError(f"{where}: decoded mask is {m.shape[0]}x{m.shape[1]}, image is {height}x{width}")
    return (m > 0).astype(np.uint8)


def label_map(objects: list[np.ndarray]) -> np.ndarray:
    """Binary masks (label k = objects[k-1]) -> one uint8 map, smaller objects drawn on top."""
    out = np.zeros(objects[0].shape, np.uint8)
    order = sorted(range(len(objects)), key=lambda i: (-int(objects[i].sum()), i))
    for i in order:
        out[objects[i] > 0] = i + 1
    return out


# --- the adapter -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Image:
    coco_id: int
    path: Path
    height: int
    width: int
    ann_ids: tuple[int, ...]  # referred annotations, label k = ann_ids[k-1]
    categories: tuple[int, ...]
    queries: tuple[tuple[int, ...], ...]  # per label: indices into text_queries()


@DATASETS.register
class RefCocoDataset(DatasetAdapter):
    """Images of a RefCOCO (UNC) split with one mask label per referred object."""

    tasks = ("refexp-seg", "input-agnostic")
    needs_root = True
    root_hint = (f"the refer toolkit's data folder holding {DATASET_DIR}/{REFS_FILE}, "
                 f"{DATASET_DIR}/{INSTANCES_FILE} and {'/'.join(IMAGE_DIR)}/")

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None):
        split = split or "val"
        if split not in SPLITS:
            raise UsageError(f"dataset 'refcoco' has no split {split!r}; its UNC splits: {', '.join(SPLITS)}")
        super().__init__(root, split, limit)
        self._index: tuple[list[_Image], list[str], list[str], dict[int, Any]] | None = None

    def _root(self) -> Path:
        return existing_root(self.root, self.name, self.root_hint)

    def _load_instances(self, path: Path) -> dict[str, Any]:
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise DataError(f"{path} does not exist; --data-root must be {self.root_hint}") from None
        except (OSError, ValueError) as err:
            raise DataError(f"cannot read {path}: {err}; replace it with the RefCOCO release's "
                            f"{INSTANCES_FILE}") from None
        if not isinstance(data, dict) or not all(isinstance(data.get(k), list)
                                                 for k in ("images", "annotations", "categories")):
            raise DataError(f"{path} is not COCO instances JSON (needs lists 'images', 'annotations' "
                            f"and 'categories')")
        return data

    def _build(self) -> tuple[list[_Image], list[str], list[str], dict[int, Any]]:
        """Selected images, text queries, class names, and the segmentations they need; once."""
        if self._index is not None:
            return self._index
        root = self._root()
        data_dir = root / DATASET_DIR
        if not data_dir.is_dir():
            raise DataError(f"{data_dir} does not exist; --data-root must be {self.root_hint}")
        refs_path = data_dir / REFS_FILE
        refs = _check_refs(load_plain_pickle(refs_path), refs_path)
        inst_path = data_dir / INSTANCES_FILE
        inst = self._load_instances(inst_path)

        images: dict[int, dict[str, Any]] = {}
        for entry in inst["images"]:
            if not (isinstance(entry, dict) and _is_int(entry.get("id")) and _is_int(entry.get("height"))
                    and _is_int(entry.get("width"))):
                raise DataError(f"{inst_path}: an image entry lacks integer id, height or width")
            images[entry["id"]] = entry
        anns: dict[int, dict[str, Any]] = {}
        for ann in inst["annotations"]:
            if not (isinstance(ann, dict) and _is_int(ann.get("id")) and "segmentation" in ann):
                raise DataError(f"{inst_path}: an annotation lacks an integer id or a segmentation")
            anns[ann["id"]] = ann
        classes = self._classes(inst["categories"], inst_path)

        selected = [r for r in refs if in_split(r["split"], str(self.split))]
        if not selected:
            splits = sorted({r["split"] for r in refs})
            raise DataError(f"{refs_path} has no refs of split {self.split!r} (its splits: "
                            f"{', '.join(splits) or 'none'}); pick another --split")
        coco_ids = sorted({r["image_id"] for r in selected})
        if self.limit is not None:
            keep = set(coco_ids[: max(self.limit, 0)])
            selected = [r for r in selected if r["image_id"] in keep]
            coco_ids = [i for i in coco_ids if i in keep]

        queries: dict[str, int] = {}
        per_ann: dict[int, list[int]] = {}
        per_image: dict[int, set[int]] = {}
        for ref in selected:
            ann = anns.get(ref["ann_id"])
            if ann is None:
                raise DataError(f"{refs_path}: ref {ref['ref_id']} refers to annotation {ref['ann_id']}, "
                                f"which {inst_path} does not have; are both files from the same release?")
            if ref["image_id"] not in images:
                raise DataError(f"{refs_path}: ref {ref['ref_id']} refers to image {ref['image_id']}, "
                                f"which {inst_path} does not have; are both files from the same release?")
            if ann.get("image_id", ref["image_id"]) != ref["image_id"]:
                raise DataError(f"{refs_path}: ref {ref['ref_id']} puts annotation {ref['ann_id']} on image "
                                f"{ref['image_id']}, but {inst_path} has it on image {ann.get('image_id')}")
            ids = per_ann.setdefault(ref["ann_id"], [])
            for sent in ref["sentences"]:
                text = sent["sent"].strip()
                if not text:
                    continue
                q = queries.setdefault(text, len(queries))
                if q not in ids:
                    ids.append(q)
            per_image.setdefault(ref["image_id"], set()).add(ref["ann_id"])
            if not (0 < ref["category_id"] < len(classes) and classes[ref["category_id"]]):
                raise DataError(f"{refs_path}: ref {ref['ref_id']} has category {ref['category_id']}, "
                                f"which {inst_path} does not list")

        ann_category = {r["ann_id"]: r["category_id"] for r in selected}
        image_dir = root.joinpath(*IMAGE_DIR)
        out: list[_Image] = []
        for coco_id in coco_ids:
            entry = images[coco_id]
            ann_ids = tuple(sorted(per_image[coco_id]))
            if len(ann_ids) > MAX_LABEL:
                raise DataError(f"image {coco_id} has {len(ann_ids)} referred objects; a uint8 mask holds "
                                f"at most {MAX_LABEL}")
            name = entry.get("file_name") or f"COCO_train2014_{coco_id:012d}.jpg"
            if not isinstance(name, str) or "/" in name or "\\" in name or name.startswith("."):
                raise DataError(f"{inst_path}: image {coco_id} has file_name {name!r}; expected a plain file "
                                f"name inside {'/'.join(IMAGE_DIR)}/")
            out.append(_Image(coco_id, image_dir / name, entry["height"], entry["width"], ann_ids,
                              tuple(ann_category[a] for a in ann_ids),
                              tuple(tuple(per_ann[a]) for a in ann_ids)))
        missing = [im.path for im in out if not im.path.is_file()]
        if missing:
            raise DataError(f"image {missing[0]} does not exist ({len(missing)} of {len(out)} images of split "
                            f"{self.split} missing); put the COCO train2014 images in {image_dir}")
        segs = {a: anns[a]["segmentation"] for im in out for a in im.ann_ids}
        self._index = (out, list(queries), classes, segs)
        return self._index

    @staticmethod
    def _classes(categories: list[Any], path: Path) -> list[str]:
        names: dict[int, str] = {}
        for cat in categories:
            if not (isinstance(cat, dict) and _is_int(cat.get("id")) and isinstance(cat.get("name"), str)
                    and 0 < cat["id"] <= 10_000):
                raise DataError(f"{path}: a category lacks a positive integer id or a name")
            names[cat["id"]] = cat["name"]
        classes = ["background"] + [""] * max(names, default=0)
        for cid, name in names.items():
            classes[cid] = name
        return classes

    def _annotation(self, im: _Image) -> Annotation:
        segs = self._build()[3]
        objects = [segmentation_mask(segs[a], im.height, im.width,
                                     f"{DATASET_DIR}/{INSTANCES_FILE} annotation {a} (image {im.coco_id})")
                   for a in im.ann_ids]
        labels = {str(k): c for k, c in enumerate(im.categories, 1)}
        refs = [{"label": k, "queries": list(q)} for k, q in enumerate(im.queries, 1)]
        return Annotation(label_map(objects), {
            "labels": labels, "refs": refs, "coco_id": im.coco_id,
            "ann_ids": {str(k): a for k, a in enumerate(im.ann_ids, 1)}})

    def records(self) -> list[ImageRecord]:
        images = self._build()[0]
        captions = self._captions()
        return [
            ImageRecord(image_id=f"{im.coco_id:012d}", source=str(im.path),
                        load_image=lambda p=str(im.path): open_image(p),
                        load_annotation=lambda im=im: self._annotation(im),
                        texts={"caption": captions[im.coco_id]} if im.coco_id in captions else {})
            for im in images
        ]

    def _captions(self) -> dict[int, str]:
        """COCO image id -> its first caption (lowest annotation id), when a COCO captions file is
        present (see CAPTION_DIRS); {} otherwise."""
        root = self._root()
        path = next((root.joinpath(*d, CAPTIONS_FILE) for d in CAPTION_DIRS
                     if root.joinpath(*d, CAPTIONS_FILE).is_file()), None)
        if path is None:
            return {}
        try:
            with open(path, encoding="utf-8") as f:
                anns = json.load(f).get("annotations")
        except (OSError, ValueError, AttributeError) as err:
            raise DataError(f"cannot read COCO captions {path}: {err}; replace it with the COCO release's "
                            f"{CAPTIONS_FILE}") from None
        if not isinstance(anns, list):
            raise DataError(f"{path} is not COCO captions JSON (needs a list 'annotations')")
        first: dict[int, tuple[int, str]] = {}
        for n, a in enumerate(anns):
            if not (isinstance(a, dict) and _is_int(a.get("image_id")) and isinstance(a.get("caption"), str)):
                raise DataError(f"{path}: a caption lacks an integer image_id or a caption string")
            key = a["id"] if _is_int(a.get("id")) else n
            text = " ".join(a["caption"].split())
            if text and (a["image_id"] not in first or key < first[a["image_id"]][0]):
                first[a["image_id"]] = (key, text)
        return {i: t for i, (_, t) in first.items()}

    def text_queries(self) -> list[str]:
        return list(self._build()[1])

    def structure(self) -> dict[str, Any]:
        return {"classes": list(self._build()[2])}
