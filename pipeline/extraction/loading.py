"""Loading batches ahead of the GPU: read images, run the processor, send inputs to the device.

Why ahead: image decoding and the HF processor are Python-heavy and a 7B prefill on an H100 is
fast, so batches are prepared by threads (CPU) or DataLoader processes (GPU host) and their
inputs copied to the device on a side stream before their forward pass.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch
from PIL import Image

from kvpipe.errors import DataError
from kvpipe.pipeline.datasets import ImageRecord
from kvpipe.pipeline.extraction.config import ExtractConfig
from kvpipe.pipeline.extraction.sequences import group_chunk, position, sequence_images, sequence_pieces
from kvpipe.pipeline.extraction.transfer import InputUploader, upload_ahead
from kvpipe.pipeline.models.base import ModelAdapter

# Batches are decoded and preprocessed (PIL, numpy, the HF image processor) by a few threads
# ahead of the GPU; one thread cannot keep up with a 7B model's prefill on an H100.
LOADERS = max(2, min(8, (os.cpu_count() or 2) // 2))
# On a GPU host, loading runs in this many DataLoader processes instead (see iterate_batches).
LOADER_PROCESSES = max(0, min(8, (os.cpu_count() or 1) // 2))


@dataclass
class LoadedBatch:
    """A batch read from the dataset and run through the processor, ready for the GPU.

    Holds dataset indices, not records, so it can come back from a loader process."""

    items: list[tuple[int, tuple[int, int], Any]]  # (index, image size, annotation)
    failed: list[tuple[int, str]]  # (index, error)
    batch: Any  # models.base.Batch, or None when every image failed
    n: int
    fatal: str = ""  # an unreadable image under --strict
    uploaded: Any = None  # transfer.Uploaded: the batch's inputs already sent to the device


def on_device_ahead(adapter: ModelAdapter, batches: Iterator[LoadedBatch],
                    uploader: InputUploader | None = None) -> Iterator[LoadedBatch]:
    """``batches`` with their inputs sent to a CUDA device ahead of their forward pass by
    ``uploader`` (a new ``transfer.InputUploader`` if None); on other devices, ``batches`` as
    they are."""
    if adapter.device.type != "cuda":
        return batches
    uploader = uploader or InputUploader(adapter.device, adapter.host_inputs)

    def upload(loaded: LoadedBatch) -> LoadedBatch:
        if loaded.batch is None:
            return loaded
        return replace(loaded, uploaded=uploader.upload(loaded.batch.inputs))
    return upload_ahead(batches, upload)


def load_batch(adapter: ModelAdapter, chunk: list[tuple[int, ImageRecord]], cfg: ExtractConfig) -> LoadedBatch:
    if cfg.multi_image:
        return load_sequences(adapter, chunk, cfg)
    items, failed = [], []
    images, texts = [], []
    for index, rec in chunk:
        try:
            img, ann = rec.image(), rec.annotation()
        except DataError as err:
            if cfg.strict:
                return LoadedBatch([], [], None, len(chunk), fatal=f"{err} (--strict)")
            failed.append((index, str(err)))
            continue
        items.append((index, img.size, ann))  # the original size: annotations are in its pixels
        images.append(img if cfg.image_size is None else img.resize(cfg.image_size, Image.BICUBIC))
        texts.append(cfg.prefix if rec.prefix is None else rec.prefix)
    batch = None
    if images:
        try:
            batch = adapter.preprocess(images, texts, cfg.template)
        except Exception:  # one image the processor refuses (e.g. a 1x2000 strip) must not cost the batch
            keep, refused = _processable(adapter, images, texts, cfg.template)
            if not refused:
                raise
            if cfg.strict:
                index, why = items[refused[0][0]][0], refused[0][1]
                return LoadedBatch([], [], None, len(chunk), fatal=f"image {index}: {why} (--strict)")
            failed += [(items[k][0], why) for k, why in refused]
            items, images, texts = ([seq[k] for k in keep] for seq in (items, images, texts))
            batch = adapter.preprocess(images, texts, cfg.template) if images else None
    return LoadedBatch(items, failed, batch, len(chunk))


def load_sequences(adapter: ModelAdapter, chunk: list[tuple[int, ImageRecord]], cfg: ExtractConfig) -> LoadedBatch:
    """``--multi-image``: the batch's sequences, each run whole as one prompt; only the images of
    this batch keep a layout. A sequence with an unreadable
    image, or one the processor refuses, fails its stored images alone."""
    items, failed, sequences, keep = [], [], [], []
    for stored in group_chunk(chunk):
        try:
            images, sizes = sequence_images(stored, cfg.image_size)
        except DataError as err:
            if cfg.strict:
                return LoadedBatch([], [], None, len(chunk), fatal=f"{err} (--strict)")
            failed += [(index, str(err)) for index, _ in stored]
            continue
        sequences.append((stored, images, sizes))
    batch = None
    while sequences:
        try:
            batch = adapter.preprocess_sequences([images for _, images, _ in sequences], cfg.template)
            break
        except Exception:  # find the sequence the processor refuses; the others go on
            bad = next((k for k, (_, images, _) in enumerate(sequences)
                        if not _processes(adapter, images, cfg.template)), None)
            if bad is None:
                raise
            stored = sequences.pop(bad)[0]
            why = f"the model's processor refused sequence {stored[0][1].group}"
            if cfg.strict:
                return LoadedBatch([], [], None, len(chunk), fatal=f"{why} (--strict)")
            failed += [(index, why) for index, _ in stored]
    at = 0
    for stored, images, sizes in sequences:
        for index, rec in stored:
            j = position(rec)
            items.append((index, sizes[j], rec.annotation()))
            keep.append(at + j)
        at += len(images)
    if batch is not None:
        batch = replace(batch, layouts=[batch.layouts[k] for k in keep],
                        prefix_ids=[batch.prefix_ids[k] for k in keep], samples=[batch.sample_of(k) for k in keep])
    return LoadedBatch(items, failed, batch, len(chunk))


def _processes(adapter: ModelAdapter, images: list, template: str) -> bool:
    try:
        adapter.preprocess_sequences([images], template)
        return True
    except Exception:
        return False


def _processable(adapter: ModelAdapter, images: list, texts: list[str],
                 template: str) -> tuple[list[int], list[tuple[int, str]]]:
    """Which images the model's processor takes one by one: (kept positions, [(position, why)])."""
    keep, refused = [], []
    for k, (img, text) in enumerate(zip(images, texts)):
        try:
            adapter.preprocess([img], [text], template)
            keep.append(k)
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            refused.append((k, f"the model's image processor refused this {img.size[0]}x{img.size[1]} image: {first}"))
    return keep, refused


class _Pieces(torch.utils.data.Dataset):
    """Batches of (index, record) as a torch Dataset, so DataLoader processes can load them."""

    def __init__(self, adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig):
        self.adapter, self.pieces, self.cfg = adapter, pieces, cfg

    def __len__(self) -> int:
        return len(self.pieces)

    def __getitem__(self, i: int) -> LoadedBatch:
        return load_batch(self.adapter, self.pieces[i], self.cfg)


def _one_thread(_: int) -> None:
    torch.set_num_threads(1)  # loader processes share the cores; no nested thread pools


def iterate_batches(adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig,
                    loader: ThreadPoolExecutor | None, processes: int = 0) -> Iterator[LoadedBatch]:
    """Loaded batches in order, prepared ahead of the GPU.

    With ``processes`` > 0, a torch DataLoader with that many forked worker processes (image
    decoding and the HF image processor are Python-heavy: threads contend for the GIL and
    cannot keep a 7B model's prefill busy); otherwise the ``loader`` thread pool.
    """
    if processes > 0:
        dl = torch.utils.data.DataLoader(
            _Pieces(adapter, pieces, cfg), batch_size=None, shuffle=False, num_workers=processes,
            collate_fn=_identity, worker_init_fn=_one_thread, prefetch_factor=2,
            multiprocessing_context="fork")
        return iter(dl)  # the workers fork here, from the calling thread
    assert loader is not None
    return _on_threads(adapter, pieces, cfg, loader)


def _on_threads(adapter: ModelAdapter, pieces: list[list[tuple[int, ImageRecord]]], cfg: ExtractConfig,
                loader: ThreadPoolExecutor) -> Iterator[LoadedBatch]:
    ahead = [loader.submit(load_batch, adapter, p, cfg) for p in pieces[:LOADERS + 1]]
    for i in range(len(pieces)):
        loaded = ahead.pop(0).result()
        if i + LOADERS + 1 < len(pieces):
            ahead.append(loader.submit(load_batch, adapter, pieces[i + LOADERS + 1], cfg))
        yield loaded


def _identity(x: Any) -> Any:
    return x


def pieces_of(records: list[ImageRecord], part: int, cfg: ExtractConfig) -> list[list[tuple[int, ImageRecord]]]:
    start = part * cfg.part_size
    chunk = list(enumerate(records[start:start + cfg.part_size], start))
    if cfg.multi_image:
        return sequence_pieces(chunk, cfg.batch_size)
    return [chunk[b:b + cfg.batch_size] for b in range(0, len(chunk), cfg.batch_size)]
