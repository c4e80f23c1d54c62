"""One part's images on their way to the store: rows, masks and per-batch host pieces.

Why a builder: a part is the unit of commit; its batches reach the host one by one (copied on
a side stream), and the writer reads them in place without joining them first.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from kvpipe.pipeline.datasets import ImageRecord
from kvpipe.pipeline.extraction.sequences import position
from kvpipe.pipeline.extraction.transfer import Copied
from kvpipe.pipeline.models.capture import CapturedBatch
from kvpipe.store.chunks import TokenSegments
from kvpipe.store.manifest import FAILED, ImageRow


class PartBuilder:
    """Accumulates one part's images: rows, masks, and its batches' features as they reach the
    host (one piece per batch and kind, in token order; ``transfer.Copied``).

    The pieces are not joined here: the writer reads them in place (``TokenSegments``) once
    ``arrays`` has waited for their copies, then ``release`` hands the host buffers back.
    """

    def __init__(self, part: int, sequences: bool = False):
        self.part = part
        self.sequences = sequences  # --multi-image: rows record their sequence and position in it
        self.rows: list[ImageRow] = []
        self.copies: list[Copied] = []
        self.masks: list[np.ndarray] = []
        self.n_tokens = 0
        self.n_mask = 0

    def add_failed(self, index: int, rec: ImageRecord, error: str) -> None:
        row = ImageRow(index=index, image_id=rec.image_id, part=self.part, status=FAILED,
                       error=error, token_offset=self.n_tokens, source=rec.source, group=rec.group, frame=rec.frame)
        if self.sequences:
            row.sequence, row.sequence_index = rec.group, position(rec)
        self.rows.append(row)

    def reserve(self, items: list[tuple[int, ImageRecord, tuple[int, int], Any, Any]],
                counts: list[int]) -> tuple[int, int]:
        """Rows for a batch (index, record, image size, token layout, annotation per image);
        returns the batch's token range in the part."""
        start = self.n_tokens
        for (index, rec, size, lay, annotation), n in zip(items, counts):
            row = ImageRow(index=index, image_id=rec.image_id, part=self.part, token_offset=self.n_tokens,
                           n_tokens=n, grid_h=lay.base.rows, grid_w=lay.base.cols,
                           segments=lay.segments_json(), image_h=size[1], image_w=size[0], source=rec.source,
                           group=rec.group, frame=rec.frame,
                           meta=json.dumps(annotation.meta if rec.prefix is None
                                           else {**annotation.meta, "prefix": rec.prefix}))
            if self.sequences:  # where the image sits in its prompt
                row.sequence, row.sequence_index = rec.group, position(rec)
                row.sequence_offset = int(lay.positions[0])
            mask = annotation.mask
            if mask is not None:
                row.mask_offset, row.mask_h, row.mask_w = self.n_mask, int(mask.shape[0]), int(mask.shape[1])
                self.masks.append(np.ascontiguousarray(mask, dtype=np.uint8).ravel())
                self.n_mask += mask.size
            self.rows.append(row)
            self.n_tokens += n
        return start, self.n_tokens

    def add(self, copied: Copied) -> None:
        """The features of the batch reserved last ([..., tokens, dim] per kind)."""
        self.copies.append(copied)

    def add_batch(self, items: list[tuple[int, ImageRecord, tuple[int, int], Any, Any]],
                  captured: CapturedBatch) -> None:
        """A batch already on the host (synchronous path)."""
        self.reserve(items, captured.counts)
        self.add(Copied(captured.arrays))

    def arrays(self) -> dict[str, Any]:
        """kind -> ``TokenSegments`` of the batches' pieces (waits for their copies); "masks"."""
        for c in self.copies:
            c.wait()
        out: dict[str, Any] = {}
        for kind in (self.copies[0].host if self.copies else {}):
            pieces = [c.host[kind] for c in self.copies]
            out[kind] = TokenSegments(pieces, axis=pieces[0].ndim - 2)
        if self.masks:
            out["masks"] = np.concatenate(self.masks)
        return out

    def release(self) -> None:
        """Hand the host buffers back once the part is written."""
        for c in self.copies:
            c.release()
        self.copies = []
