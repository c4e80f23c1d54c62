"""The dataset images behind a store, for pictures of its predictions.

Why: a store keeps tokens and masks, not pixels. The dataset adapter recorded in the store's
metadata (name, root, split, limit, options) loads them again: files of a dataset on disk, or
synthetic images rendered again from their seed. When it cannot (the data moved, a hub
dataset offline), pictures are drawn on a grey canvas and ``problem`` says why.
"""

from __future__ import annotations

from typing import Any

from PIL import Image

from kvpipe.errors import KvpipeError
from kvpipe.pipeline.datasets import create_dataset, dataset_options
from kvpipe.pipeline.datasets.base import DATASETS


class ImageSource:
    """``get(image_id)`` -> the image as RGB, or None when the dataset cannot be read here."""

    def __init__(self, store: Any):
        self.store = store
        self.problem = ""
        self._records: dict[str, Any] | None = None

    def _load(self) -> dict[str, Any]:
        if self._records is None:
            d = self.store.meta.dataset
            try:
                name = str(d.name)
                known = dataset_options(DATASETS.get(name)) if name in DATASETS else {}
                options = {k: v for k, v in d.extra.items() if k in known}
                adapter = create_dataset(name, d.root, d.split, d.limit, **options)
                self._records = {r.image_id: r for r in adapter.records()}
            except (KvpipeError, OSError, ValueError, TypeError) as err:
                self.problem = f"images of dataset {d.name!r} unavailable ({err}); drawn on grey"
                self._records = {}
        return self._records

    def get(self, image_id: str) -> Image.Image | None:
        record = self._load().get(image_id)
        if record is None:
            return None
        try:
            return record.image()
        except (KvpipeError, OSError) as err:
            self.problem = f"image {image_id} unreadable ({err}); drawn on grey"
            return None
