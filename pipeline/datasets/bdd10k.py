"""BDD100K's 10K semantic-segmentation images with time-of-day / scene tags, for semantic-seg.

Layout read (the official BDD100K download, doc.bdd100k.com "Data Download")::

    <root>/bdd100k/   (or <root> itself)
        images/10k/{train,val}/<name>.jpg
        labels/sem_seg/masks/{train,val}/<name>.png   1-channel, trainId 0..18, 255 = unknown
        labels/det_20/det_{train,val}.json            frame tags (see below)
        labels/bdd100k_labels_images_{train,val}.json 2018 labels, same frame tags

Masks are stored with label = trainId + 1 (1..19 = structure()["classes"][1:], Cityscapes-style
names), so 0 stays the contract's background (never used here) and 255 stays ignore. BDD-10K
has no background class: structure()["has_background"] is false, so semantic-seg's mIoU
averages its 19 classes only.

Why tags come from the detection labels: the 10K segmentation release carries no frame
attributes; the Scalabel-format frame lists of the 100K images do ({"name": "<name>.jpg",
"attributes": {"weather", "scene", "timeofday"}}) but cover only part of the 10K images (the
10K set is not a subset of the 100K); both the train and val lists are searched, by name. Tags are looked up by file name in, first to last:
labels/sem_seg/polygons/sem_seg_<split>.json (if its frames have attributes),
det_20/det_train.json and det_val.json, then the 2018 label files (or only ``attributes_file``).
Untagged images get null tags; a filter (``timeofday="night"``, ``scene="highway"``, ...) keeps
only images tagged with that value. Those files are large (hundreds of MB); they are parsed
once per adapter.

texts["domain"] (for ``--prefix-from domain``): the paper's sentence "The image is taken at
{daytime, nighttime} and it is from {city street view, highway}" for images tagged daytime or
night and city street or highway; other and missing tags give no domain.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, load_palette_mask
from kvpipe.pipeline.datasets.common import choice_option, existing_root, visible_files
from kvpipe.pipeline.datasets.folder import open_image

CLASSES = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
    "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
)
IGNORE = 255
TAGS = {  # frame attributes of the BDD100K label format
    "timeofday": ("daytime", "night", "dawn/dusk", "undefined"),
    "scene": ("tunnel", "residential", "parking lot", "undefined", "city street", "gas stations", "highway"),
    "weather": ("rainy", "snowy", "clear", "overcast", "undefined", "partly cloudy", "foggy"),
}
SPLITS = ("train", "val")
# The paper's domain prefix (Table 4): "The image is taken at {daytime, nighttime} and it is
# from {city street view, highway}", filled from the timeofday / scene tags.
DOMAIN_TEMPLATE = "The image is taken at {time} and it is from {scene}"
DOMAIN_TIME = {"daytime": "daytime", "night": "nighttime"}
DOMAIN_SCENE = {"city street": "city street view", "highway": "highway"}


def domain_text(timeofday: Any, scene: Any) -> str | None:
    """The domain sentence of an image's tags, or None when a tag is outside the template."""
    if timeofday not in DOMAIN_TIME or scene not in DOMAIN_SCENE:
        return None
    return DOMAIN_TEMPLATE.format(time=DOMAIN_TIME[timeofday], scene=DOMAIN_SCENE[scene])


def other_domain(text: str) -> str | None:
    """The incorrect-domain control: both halves swapped (day+street <-> night+highway,
    day+highway <-> night+street), as the paper's control does; None for a foreign text."""
    for t in DOMAIN_TIME:
        for c in DOMAIN_SCENE:
            if domain_text(t, c) == text:
                return domain_text(next(x for x in DOMAIN_TIME if x != t), next(x for x in DOMAIN_SCENE if x != c))
    return None


def trainid_mask(path: Path) -> tuple[np.ndarray, dict[str, int]]:
    """A sem_seg mask as labels trainId+1 (255 kept) and its {"<label>": class id} map."""
    raw = load_palette_mask(str(path))
    values = np.unique(raw)
    bad = [int(v) for v in values if v >= len(CLASSES) and v != IGNORE]
    if bad:
        raise DataError(f"mask {path} has value {bad[0]}; BDD100K sem_seg masks hold trainIds 0..18 and 255")
    lut = np.full(256, IGNORE, np.uint8)
    lut[: len(CLASSES)] = np.arange(1, len(CLASSES) + 1, dtype=np.uint8)
    present = [int(v) + 1 for v in values if v < len(CLASSES)]
    return lut[raw], {str(c): c for c in present}


def read_frame_tags(path: Path) -> dict[str, dict[str, Any]]:
    """{image name: {"timeofday", "scene", "weather"}} of a Scalabel/BDD frame-list JSON."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"attributes file {path} does not exist; pass labels/det_20/det_<split>.json") from None
    except (ValueError, UnicodeDecodeError) as err:
        raise DataError(f"attributes file {path} is not JSON ({err})") from None
    frames = data.get("frames") if isinstance(data, dict) else data
    if not isinstance(frames, list):
        raise DataError(f"attributes file {path} is not a BDD100K frame list (a JSON list of "
                        f"{{\"name\", \"attributes\"}} objects)")
    tags: dict[str, dict[str, Any]] = {}
    for frame in frames:
        if not isinstance(frame, dict) or not isinstance(frame.get("name"), str):
            raise DataError(f"attributes file {path} has a frame without a \"name\"; expected BDD100K label JSON")
        attrs = frame.get("attributes")
        if isinstance(attrs, dict) and any(k in attrs for k in TAGS):
            tags[Path(frame["name"]).name] = {k: attrs.get(k) for k in TAGS}
    return tags


@DATASETS.register
class Bdd10kDataset(DatasetAdapter):
    """BDD100K 10K sem_seg images of a split with trainId masks and frame tags, optionally filtered."""

    tasks = ("semantic-seg", "input-agnostic")
    needs_root = True
    root_hint = "the folder holding bdd100k/images/10k and bdd100k/labels/sem_seg (or bdd100k/ itself)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 timeofday: str | None = None, scene: str | None = None, weather: str | None = None,
                 attributes_file: str | None = None):
        split = split or "val"
        if split not in SPLITS:
            raise UsageError(f"dataset 'bdd10k' has splits {', '.join(SPLITS)} (test has no public masks); "
                             f"got --split {split}")
        super().__init__(root, split, limit)
        self.filters = {k: choice_option(self.name, k, v, TAGS[k])
                        for k, v in (("timeofday", timeofday), ("scene", scene), ("weather", weather))}
        self.attributes_file = attributes_file
        self._tags: dict[str, dict[str, Any]] | None = None

    def _base(self) -> Path:
        root = existing_root(self.root, self.name, self.root_hint)
        for base in (root / "bdd100k", root):
            if (base / "images" / "10k").is_dir():
                return base
        raise DataError(f"--data-root {root} has no images/10k/ (nor bdd100k/images/10k/); "
                        f"point it at {self.root_hint}")

    def _tag_files(self, base: Path) -> list[Path]:
        if self.attributes_file is not None:
            return [Path(self.attributes_file).expanduser()]
        labels = base / "labels"
        candidates = [labels / "sem_seg" / "polygons" / f"sem_seg_{self.split}.json",
                      labels / "det_20" / "det_train.json", labels / "det_20" / "det_val.json",
                      labels / "bdd100k_labels_images_train.json", labels / "bdd100k_labels_images_val.json"]
        return [p for p in candidates if p.is_file()]

    def _frame_tags(self, base: Path) -> dict[str, dict[str, Any]]:
        if self._tags is None:
            files = self._tag_files(base)
            tags: dict[str, dict[str, Any]] = {}
            for path in files:
                for name, t in read_frame_tags(path).items():
                    tags.setdefault(name, t)
            if not tags and any(self.filters.values()):
                searched = f" ({', '.join(p.name for p in files)} carry none)" if files else ""
                raise DataError(f"filtering by {', '.join(k for k, v in self.filters.items() if v)} needs the "
                                f"BDD100K frame tags{searched}; put the Detection 2020 labels in "
                                f"{base / 'labels' / 'det_20'} or pass attributes_file")
            self._tags = tags
        return self._tags

    def records(self) -> list[ImageRecord]:
        base = self._base()
        image_dir = base / "images" / "10k" / self.split
        mask_dir = base / "labels" / "sem_seg" / "masks" / self.split
        if not image_dir.is_dir():
            raise DataError(f"{image_dir} does not exist; is the BDD100K 10K Images zip unpacked in {base}?")
        if not mask_dir.is_dir():
            raise DataError(f"{mask_dir} does not exist; unpack the BDD100K Semantic Segmentation labels in {base}")
        tags = self._frame_tags(base)
        out: list[ImageRecord] = []
        for img in visible_files(image_dir, (".jpg",)):
            t = tags.get(img.name, dict.fromkeys(TAGS))
            if any(v is not None and t.get(k) != v for k, v in self.filters.items()):
                continue
            mask = mask_dir / f"{img.stem}.png"
            if not mask.is_file():
                raise DataError(f"mask {mask} does not exist for image {img}; is the sem_seg download complete?")
            domain = domain_text(t.get("timeofday"), t.get("scene"))
            out.append(ImageRecord(image_id=img.stem, source=str(img),
                                   load_image=lambda p=str(img): open_image(p),
                                   load_annotation=lambda m=mask, t=t: self._annotation(base, m, t),
                                   texts={"domain": domain} if domain else {}))
        if not out:
            active = {k: v for k, v in self.filters.items() if v}
            raise DataError(f"{image_dir} has no images" + (f" tagged {active}" if active else "") +
                            "; check the split, the filters and the tag files")
        return out if self.limit is None else out[: max(self.limit, 0)]

    @staticmethod
    def _annotation(base: Path, mask: Path, tags: dict[str, Any]) -> Annotation:
        labels, meta = trainid_mask(mask)
        return Annotation(labels, {"labels": meta, **tags, "mask_file": mask.relative_to(base).as_posix()})

    def text_queries(self) -> list[str]:
        return list(CLASSES)

    def structure(self) -> dict[str, Any]:
        return {"classes": ["background", *CLASSES], "has_background": False,
                "class_queries": {str(i + 1): i for i in range(len(CLASSES))}}

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), **self.filters, "attributes_file": self.attributes_file}
