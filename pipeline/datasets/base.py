"""What a dataset adapter gives the extractor: image records with lazy loaders.

Why this shape: the extractor needs images in a stable order with stable ids (so a killed
run resumes onto the same parts), and the store keeps each image's annotation (label mask +
JSON metadata) beside its features, so probes never need the dataset again. This module
must not import torch or transformers: probes may import annotation code from here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import numpy as np
from PIL import Image

from kvpipe.errors import DataError
from kvpipe.registry import Registry


@dataclass(frozen=True)
class Annotation:
    """Ground truth for one image.

    mask: HxW uint8 label map at the annotation's own resolution (0 = background,
        1..K = objects / classes, 255 = ignore), or None when the dataset has no masks.
    meta: JSON-serialisable extras. Keys probes read (present where the dataset has them):
        "labels": {"<mask label>": class id} for every label in the mask, class ids indexing
            the dataset's structure()["classes"] (so 919 ImageNet-S classes fit a uint8 mask);
        "refs": [{"label": mask label, "queries": [indices into text_queries()]}] for
            referring expressions;
        "keypoints": {name: [x, y]} in pixels of the original image.
    """

    mask: np.ndarray | None = None
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ImageRecord:
    """One image of a dataset, loaded only when asked.

    image_id: unique and stable within the dataset (e.g. "bear/00003").
    source: where the pixels come from (a path, or "synthetic:<id>"), for provenance.
    group / frame: video or image-set id and position inside it ("" / -1 when none).
    texts: what the dataset knows about this image as text, for per-image prefixes
        (``pipeline.prefix``): "class" (the depicted class's name), "domain" (a sentence naming
        the capture conditions), "caption"; only the keys the dataset has for this image.
    prefix: the text placed before this image at extraction, once ``--prefix-from`` /
        ``--prefix-control`` have been resolved (None: the run's ``--prefix``).
    sequence: with ``--multi-image``, every image of this one's prompt, in order (itself included).
    """

    image_id: str
    source: str
    load_image: Callable[[], Image.Image] = field(repr=False, compare=False)
    load_annotation: Callable[[], Annotation] = field(
        default=lambda: Annotation(), repr=False, compare=False
    )
    group: str = ""
    frame: int = -1
    texts: dict[str, str] = field(default_factory=dict, repr=False, compare=False)
    prefix: str | None = field(default=None, compare=False)
    # --multi-image: every record of this one's prompt, in order, itself included (``extraction.sequences``)
    sequence: tuple["ImageRecord", ...] = field(default=(), repr=False, compare=False)

    def image(self) -> Image.Image:
        """The image as RGB; a file that cannot be decoded raises DataError naming it."""
        try:
            img = self.load_image()
            img.load()
        except DataError:
            raise
        except Exception as err:  # PIL raises many types for broken files
            raise DataError(f"cannot read image {self.source}: {err}") from None
        return to_rgb(img)

    def annotation(self) -> Annotation:
        return self.load_annotation()


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB of an image of any PIL mode, the one place images are converted.

    Why not ``img.convert("RGB")`` alone: PIL clips 16- and 32-bit integer greys to 255 (a
    16-bit PNG becomes almost all white) and drops alpha, showing whatever colour transparent
    pixels happen to hold. Here 16-bit greys ("I;16*", and "I", which 16-bit PNGs also open
    as) are scaled by >> 8 (0..65535 -> 0..255, values outside clipped); "F" greys are taken
    as 0..1 when every value lies there, else as 0..255 (clipped); images with alpha ("LA",
    "RGBA", "PA", "P" with a transparent colour, ...) are composited over white, as
    transformers' ``convert_to_rgb`` does; everything else ("1", "L", "P", "CMYK", "YCbCr",
    ...) goes through PIL's own conversion."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(img).astype(np.int64)
        return Image.fromarray((np.clip(a, 0, 65535) >> 8).astype(np.uint8), "L").convert("RGB")
    if mode == "F":
        a = np.asarray(img, dtype=np.float64)
        a = np.nan_to_num(a, nan=0.0)
        if a.size and a.min() >= 0 and a.max() <= 1:
            a = a * 255
        return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L").convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in img.info) \
            or (mode in ("L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


class DatasetAdapter:
    """Base class of dataset adapters; subclasses register with ``@DATASETS.register``.

    Subclasses set ``tasks`` (the probes their annotations support) and implement
    ``records`` and, where they have text queries, ``text_queries``.
    """

    name: ClassVar[str] = ""
    tasks: ClassVar[tuple[str, ...]] = ()
    needs_root: ClassVar[bool] = True
    # records are questions' images (group = question, frame = position): --multi-image applies
    sequences: ClassVar[bool] = False

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None):
        self.root = root
        self.split = split
        self.limit = limit

    def records(self) -> list[ImageRecord]:
        raise NotImplementedError

    def text_queries(self) -> list[str]:
        """Strings whose final-token K/V are stored (class names, referring expressions)."""
        return []

    def structure(self) -> dict[str, Any]:
        """Dataset-level annotations, JSON-serialisable, stored as the store's dataset.json.

        Keys used by probes (present only where the dataset has them):
        "classes": class names by class id (index 0 = background);
        "pairs": [{"source", "target" (image ids), "source_kps", "target_kps" ([[x, y], ...] in
        pixels of the original images), "target_bbox" ([x0, y0, x1, y1]), "category"}];
        "episodes": [{"query": image id, "support": [image ids], "class": class id}];
        "image_sets": {set name: {"images": [image ids], "class": class id or None}} for
            co-segmentation (foreground = mask labels of that class, or every label 1..254 when None);
        "class_queries": {"<class id>": index into text_queries()} (the class-name query);
        "has_background": false when class 0 is not one of the dataset's classes (no pixel is
            background, e.g. BDD-10K); absent or true when it is (ImageNet-S "other category").
        """
        return {}

    def describe(self) -> dict[str, Any]:
        """JSON-serialisable provenance written into the store's metadata."""
        return {"name": self.name, "root": self.root, "split": self.split, "limit": self.limit}


# The catalog: one module per dataset, named after the module (imagenet_s -> "imagenet-s");
# imported when first used. blink and spair_vqa hold the paired tasks' images.
DATASETS: Registry[type[DatasetAdapter]] = Registry(
    "dataset", "--dataset", package="kvpipe.pipeline.datasets",
    modules=("bdd10k", "blink", "coco", "davis", "folder", "hf", "imagenet_s", "msrc", "pascal5i", "refcoco",
             "spair", "spair_vqa", "synthetic"))


def read_mask_image(path: str | Path, what: str = "mask file") -> tuple[str, np.ndarray]:
    """A mask image's PIL mode and pixels; a missing or unreadable file is a one-line DataError
    naming it as ``what``. Each dataset's decoding (palette, RGB class ids, binary) starts here."""
    try:
        with Image.open(path) as img:
            img.load()
            return img.mode, np.asarray(img)
    except FileNotFoundError:
        raise DataError(f"{what} {path} does not exist") from None
    except Exception as err:
        raise DataError(f"cannot read {what} {path}: {err}") from None


def load_palette_mask(path: str) -> np.ndarray:
    """Read a palette (mode "P") or grey PNG mask as its uint8 index map."""
    mode, arr = read_mask_image(path)
    if mode not in ("P", "L", "1"):
        raise DataError(f"mask {path} is mode {mode}; expected a palette or grey PNG")
    return arr.astype(np.uint8)
