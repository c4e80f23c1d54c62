"""Multi-image extraction (``kvpipe extract --multi-image``): a question's images in one prompt.

Why: under causal attention an image's keys and values depend on every image before it in the
prompt, so the K/V an MLM holds when it answers a multi-image question (``kvpipe answer``) are
not those of each image extracted alone. With ``--multi-image`` every sequence -- the records
of one ``group`` in ``frame`` order, a BLINK question's images -- is run as the answer's prompt
(``ModelAdapter.preprocess_sequences``), and each image is stored under its own row with its
sequence id, its index in the sequence and the sequence position of its first token.

Parts stay fixed slices of the dataset's records (resume and the reader rely on that), so a
sequence may straddle two parts: each part then runs the whole sequence and stores only its own
images. Always running whole sequences keeps the stored bytes independent of where parts and
batches end (a shorter prompt changes the attention's summation order in the last bits).
A batch holds ``--batch-size`` sequences.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import DatasetAdapter, ImageRecord

FLAG = "--multi-image"


def check_options(cfg: Any, dataset: DatasetAdapter) -> None:
    """One-line UsageErrors for ``--multi-image`` with a dataset or option it cannot serve."""
    if not cfg.multi_image:
        return
    if not dataset.sequences:
        raise UsageError(f"{FLAG}: dataset {cfg.dataset!r} has no multi-image questions; use it with "
                         f"--dataset blink (its questions' images in one prompt each)")
    if cfg.prefix or cfg.prefix_from or cfg.prefix_control != "none":
        raise UsageError(f"{FLAG} places the question's images in the prompt kvpipe answer builds; "
                         f"drop --prefix / --prefix-from / --prefix-control")


def with_sequences(records: list[ImageRecord]) -> list[ImageRecord]:
    """Each record with every record of its sequence (same group, in frame order)."""
    by_group: dict[str, list[ImageRecord]] = {}
    for rec in records:
        if not rec.group:
            raise DataError(f"image {rec.image_id} belongs to no sequence (group); {FLAG} needs the dataset's "
                            f"questions")
        by_group.setdefault(rec.group, []).append(rec)
    whole = {g: tuple(sorted(recs, key=lambda r: r.frame)) for g, recs in by_group.items()}
    return [replace(rec, sequence=whole[rec.group]) for rec in records]


def position(rec: ImageRecord) -> int:
    """The record's index in its sequence."""
    return next(k for k, r in enumerate(rec.sequence) if r.image_id == rec.image_id)


def sequence_pieces(chunk: list[tuple[int, ImageRecord]], batch_size: int) -> list[list[tuple[int, ImageRecord]]]:
    """A part's (index, record) pairs as batches of ``batch_size`` whole sequences (a sequence
    cut by the part's edge counts as one)."""
    runs: list[list[tuple[int, ImageRecord]]] = []
    for index, rec in chunk:
        if runs and runs[-1][-1][1].group == rec.group:
            runs[-1].append((index, rec))
        else:
            runs.append([(index, rec)])
    return [[p for run in runs[b:b + batch_size] for p in run] for b in range(0, len(runs), batch_size)]


def group_chunk(chunk: list[tuple[int, ImageRecord]]) -> list[list[tuple[int, ImageRecord]]]:
    """The batch's (index, record) pairs by sequence, in order."""
    groups: dict[str, list[tuple[int, ImageRecord]]] = {}
    for index, rec in chunk:
        groups.setdefault(rec.group, []).append((index, rec))
    return list(groups.values())


def sequence_images(stored: list[tuple[int, ImageRecord]], image_size: tuple[int, int] | None
                    ) -> tuple[list[Image.Image], list[tuple[int, int]]]:
    """Every image of one sequence and the original size of each; an image that cannot be read
    fails the sequence's stored images."""
    images, sizes = [], []
    for rec in stored[0][1].sequence:
        try:
            img = rec.image()
        except DataError as err:
            raise DataError(f"{err} (image {len(sizes)} of sequence {rec.group})") from None
        sizes.append(img.size)
        images.append(img if image_size is None else img.resize(image_size, Image.BICUBIC))
    return images, sizes
