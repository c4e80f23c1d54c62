"""Any directory of images, for probes that need no annotation (input-agnostic).

Why sorted relative paths: the order and the ids must not depend on the file system's
listing order, so a resumed run maps onto the same parts. Files are only listed here;
decoding happens in ``ImageRecord.image()``, so one corrupt file fails that image (and is
recorded as failed), not the whole listing. Hidden files and folders (".name", e.g. macOS
"._photo.jpg" resource forks) are skipped: they carry image extensions but no image.
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets.base import DATASETS, DatasetAdapter, ImageRecord
from kvpipe.roots import existing_root

EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def open_image(path: str) -> Image.Image:
    """Decode fully now and close the file (a lazy PIL image keeps it open)."""
    with Image.open(path) as img:
        img.load()
        return img


def list_images(root: Path) -> list[Path]:
    """Image files under root (recursive, symlinked folders followed), sorted by relative posix path.

    Every real folder is listed once, under the first path that reaches it (folders walked in
    sorted order, so the choice is stable): a symlink loop or a link to a folder already
    walked adds nothing, instead of listing its images again at every depth until the
    path grows too long. Names that are not UTF-8 keep their bytes as surrogate escapes
    (``os.fsdecode``), so their ids are stable."""
    found = []
    seen: set[tuple[int, int]] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        try:
            st = os.stat(dirpath)
        except OSError:
            dirnames[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirnames[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(EXTENSIONS):
                found.append(Path(dirpath) / name)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


@DATASETS.register
class FolderDataset(DatasetAdapter):
    """Images under --data-root, ids = their paths relative to it; no annotations."""

    tasks = ("input-agnostic",)
    needs_root = True
    root_hint = "a directory of images (searched recursively)"

    def __init__(self, root: str | None = None, split: str | None = None, limit: int | None = None):
        if split not in (None, "default"):
            raise UsageError(f"dataset 'folder' has no splits; drop --split {split} or point --data-root "
                             f"at the split's own directory")
        super().__init__(root, "default", limit)

    def records(self) -> list[ImageRecord]:
        root = existing_root(self.root, self.name, self.root_hint)
        paths = list_images(root)
        if not paths:
            raise DataError(f"--data-root {root} holds no images (looked recursively for "
                            f"{', '.join(EXTENSIONS)}, any case)")
        if self.limit is not None:
            paths = paths[: max(self.limit, 0)]
        return [
            ImageRecord(image_id=p.relative_to(root).as_posix(), source=str(p),
                        load_image=lambda p=str(p): open_image(p))
            for p in paths
        ]
