"""DAVIS-2017 in its official layout, for the temporal-corr (mask propagation) probe.

Layout read (the one DINO's eval_video_segmentation.py and the official evaluation use)::

    <root>/ImageSets/2017/<split>.txt          one sequence name per line
    <root>/JPEGImages/<resolution>/<seq>/00000.jpg ...
    <root>/Annotations/<resolution>/<seq>/00000.png ...   palette PNG, index = object id

Why masks per frame are optional: val has a mask for every frame, test-dev only for the
first; frames without one get ``Annotation(mask=None)`` and the probe scores what exists.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from PIL import Image

from kvpipe.errors import DataError
from kvpipe.pipeline.datasets.base import DATASETS, Annotation, DatasetAdapter, ImageRecord, load_palette_mask
from kvpipe.pipeline.datasets.common import existing_root

FRAME_EXTENSIONS = (".jpg", ".jpeg")


def open_image(path: str) -> Image.Image:
    """Decode fully now and close the file (a lazy PIL image keeps it open)."""
    with Image.open(path) as img:
        img.load()
        return img


def read_sequence_list(root: Path, split: str) -> list[str]:
    """Sequence names of ImageSets/2017/<split>.txt, in file order, blanks and repeats dropped."""
    path = root / "ImageSets" / "2017" / f"{split}.txt"
    if not path.is_file():
        raise DataError(f"split file {path} does not exist; --split {split} expects ImageSets/2017/{split}.txt "
                        f"under the DAVIS-2017 --data-root")
    names = [line.strip() for line in path.read_text().splitlines()]
    return list(dict.fromkeys(n for n in names if n))


def list_frames(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise DataError(f"sequence folder {folder} does not exist but the split file lists it; "
                        f"is the DAVIS download complete?")
    frames = sorted(p for p in folder.iterdir() if p.suffix.lower() in FRAME_EXTENSIONS)
    if not frames:
        raise DataError(f"sequence folder {folder} has no .jpg frames; is the DAVIS download complete?")
    return frames


def _annotation(root: Path, seq: str, mask: Path | None) -> Annotation:
    if mask is None:
        return Annotation(mask=None, meta={"sequence": seq, "mask_file": None})
    return Annotation(load_palette_mask(str(mask)),
                      {"sequence": seq, "mask_file": mask.relative_to(root).as_posix()})


@DATASETS.register
class DavisDataset(DatasetAdapter):
    """Every frame of every sequence of a DAVIS-2017 split, with its object mask when it has one."""

    tasks = ("temporal-corr", "input-agnostic")
    needs_root = True
    root_hint = "the DAVIS-2017 folder holding JPEGImages/, Annotations/ and ImageSets/"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None, *,
                 resolution: str = "480p"):
        super().__init__(root, split or "val", limit)
        self.resolution = resolution

    def _root(self) -> Path:
        root = existing_root(self.root, self.name, self.root_hint)
        images = root / "JPEGImages" / self.resolution
        if not images.is_dir():
            raise DataError(f"{images} does not exist; --data-root must be {self.root_hint} "
                            f"(resolution {self.resolution!r})")
        return root

    def _sequence(self, root: Path, seq: str) -> list[ImageRecord]:
        frames = list_frames(root / "JPEGImages" / self.resolution / seq)
        ann_dir = root / "Annotations" / self.resolution / seq
        masks = {p.stem: p for p in ann_dir.glob("*.png")} if ann_dir.is_dir() else {}
        return [
            ImageRecord(image_id=f"{seq}/{f.stem}", source=str(f),
                        load_image=lambda f=str(f): open_image(f),
                        load_annotation=lambda m=masks.get(f.stem), s=seq: _annotation(root, s, m),
                        group=seq, frame=t)
            for t, f in enumerate(frames)
        ]

    def records(self) -> list[ImageRecord]:
        root = self._root()
        out: list[ImageRecord] = []
        for seq in read_sequence_list(root, str(self.split)):
            if self.limit is not None and len(out) >= self.limit:
                break
            out.extend(self._sequence(root, seq))
        return out if self.limit is None else out[: max(self.limit, 0)]

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "resolution": self.resolution}
