"""COCO images of one split folder (val2017, train2014, ...), for probes that need no masks.

Layout read (the official image zips unpacked side by side)::

    <root>/val2017/000000000139.jpg ...      (or train2017/, val2014/, train2014/, test2017/)

Why no annotations: the input-agnostic probe only needs many natural images. Image ids are the
file names without extension, sorted, so ``--limit N`` always takes the same N images.
"""

from __future__ import annotations

from pathlib import Path
from kvpipe.errors import DataError
from kvpipe.pipeline.datasets.base import DATASETS, DatasetAdapter, ImageRecord
from kvpipe.pipeline.datasets.common import existing_root, visible_files
from kvpipe.pipeline.datasets.folder import open_image

EXTENSIONS = (".jpg", ".jpeg")


@DATASETS.register
class CocoDataset(DatasetAdapter):
    """The images of <root>/<split>/ (default val2017), ids = file stems."""

    tasks = ("input-agnostic",)
    needs_root = True
    root_hint = "the COCO folder holding val2017/ (or train2014/, ...) with the .jpg images"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None):
        super().__init__(root, split or "val2017", limit)

    def _folder(self) -> Path:
        root = existing_root(self.root, self.name, self.root_hint)
        folder = root / str(self.split)
        if folder.is_dir():
            return folder
        if root.name == self.split:  # --data-root points at the split folder itself
            return root
        present = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        raise DataError(f"{folder} does not exist; --split {self.split} expects {self.split}/ in --data-root "
                        f"(folders there: {', '.join(present) or 'none'})")

    def records(self) -> list[ImageRecord]:
        folder = self._folder()
        paths = visible_files(folder, EXTENSIONS)
        if not paths:
            raise DataError(f"{folder} holds no .jpg images; is the COCO {self.split} zip unpacked there?")
        if self.limit is not None:
            paths = paths[: max(self.limit, 0)]
        return [ImageRecord(image_id=p.stem, source=str(p), load_image=lambda p=str(p): open_image(p))
                for p in paths]
