"""Pictures of a probe's predictions at one target, for the report and ``kvpipe show``.

Why one place: the report (PNG files next to it) and the show page (inline PNGs) draw the same
pictures from the same predictions. ``PICTURES`` maps each prediction format to its drawer:
masks over their images, a row of propagated frames per video, keypoint matches per pair.
``pca_pictures`` adds the first three PCA components of a target's image tokens as colour.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from kvpipe.errors import StoreError
from kvpipe.probes.base import Target
from kvpipe.probes.figures import mask_overlay, matches_figure, pca_figure, strip
from kvpipe.probes.images import ImageSource
from kvpipe.probes.predictions import (DavisFolders, MaskImages, PointMatches, Predictions, frame_name,
                                       read_predictions, safe_name)
from kvpipe.provenance import read_run_json

MAX_FRAMES = 8  # frames of a video shown in its row (evenly spaced)


@dataclass
class Picture:
    title: str
    image: Image.Image
    caption: str = ""


def mask_pictures(store: Any, preds: MaskImages, images: ImageSource, limit: int) -> list[Picture]:
    out = []
    for item in preds.items[:limit]:
        info = ", ".join(f"{k}: {v}" for k, v in sorted(item.info.items()))
        out.append(Picture(item.name, mask_overlay(images.get(item.image_id), item.labels),
                           f"image {item.image_id}" + (f"; {info}" if info else "")))
    return out


def davis_pictures(store: Any, preds: DavisFolders, images: ImageSource, limit: int) -> list[Picture]:
    rows = {(safe_name(r.group), safe_name(frame_name(r))): r for r in store.images() if r.group}
    out = []
    for video, frames in list(preds.videos.items())[:limit]:
        keep = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(MAX_FRAMES, len(frames)))})
        tiles = []
        for i in keep:
            name, labels = frames[i]
            row = rows.get((safe_name(video), safe_name(name)))
            tiles.append(mask_overlay(images.get(row.image_id) if row else None, labels))
        shown = ", ".join(frames[i][0] for i in keep)
        out.append(Picture(video, strip(tiles), f"frames {shown} (the first is the given mask)"))
    return out


def point_pictures(store: Any, preds: PointMatches, images: ImageSource, limit: int) -> list[Picture]:
    rows = {r.image_id: r for r in store.images()}
    table = preds.table.to_pylist()
    out = []
    for pair in sorted({m["pair"] for m in table})[:limit]:
        ms = [m for m in table if m["pair"] == pair]
        src, tgt = rows.get(ms[0]["source"]), rows.get(ms[0]["target"])
        if src is None or tgt is None:
            continue
        fig = matches_figure(images.get(src.image_id), images.get(tgt.image_id), (src.image_h, src.image_w),
                             (tgt.image_h, tgt.image_w), ms)
        correct = sum(bool(m["correct"]) for m in ms)
        out.append(Picture(f"pair {pair}: {src.image_id} -> {tgt.image_id}", fig,
                           f"{correct} of {len(ms)} keypoints correct (green; red: wrong; white: ground truth)"))
    return out


PICTURES: dict[str, Callable[[Any, Any, ImageSource, int], list[Picture]]] = {
    "masks": mask_pictures, "davis": davis_pictures, "points": point_pictures}


def prediction_pictures(store: Any, preds: Predictions, images: ImageSource, limit: int = 6) -> list[Picture]:
    return PICTURES[preds.format](store, preds, images, limit)


def shown_images(store: Any, preds: Predictions, limit: int) -> list[str]:
    """Image ids the pictures show first (for PCA pictures of the same images)."""
    if isinstance(preds, MaskImages):
        ids = [i.image_id for i in preds.items]
    elif isinstance(preds, PointMatches):
        ids = [x for pair in zip(preds.table.column("source").to_pylist(), preds.table.column("target").to_pylist())
               for x in pair]
    else:
        videos = set(preds.videos) if isinstance(preds, DavisFolders) else set()
        ids = [r.image_id for r in store.images() if safe_name(r.group) in videos]
    return list(dict.fromkeys(ids))[:limit]


def pca_pictures(store: Any, target: Target, image_ids: list[str], images: ImageSource) -> list[Picture]:
    """The image and the first three PCA components of its ``target`` tokens (base grid) as RGB."""
    by_id = {r.image_id: r for r in store.images()}
    rows = [by_id[i] for i in image_ids if i in by_id]
    if not rows:
        return []
    layer = None if target.kind == "post_proj" else target.layer
    head = None if target.kind == "post_proj" else target.head
    feats = store.read(target.kind, layer, head, images=rows)
    label = "post_proj" if target.kind == "post_proj" else f"{target.kind} L{target.layer} H{target.head}"
    return [Picture(f"{r.image_id}: PCA of {label}", pca_figure(feats.grid(i), images.get(r.image_id),
                                                                (r.image_h, r.image_w)),
                    "first three principal components of the image's tokens as red, green, blue")
            for i, r in enumerate(feats.rows)]


def saved_records(run_dir: Path) -> list[dict[str, Any]]:
    """What run.json says ``kvpipe probe`` saved under ``run_dir`` ([] when nothing)."""
    record = read_run_json(Path(run_dir)) or {}
    return list((record.get("predictions") or {}).get("saved") or [])


def pick_saved(records: list[dict[str, Any]], target: Target | None) -> dict[str, Any] | None:
    """The record of ``target``, or without one the best image values' (else the first saved)."""
    if target is not None:
        return next((r for r in records if (r["kind"], r["layer"], r["head"]) ==
                     (target.kind, target.layer, target.head)), None)
    return next((r for r in records if r["kind"] == "values"), records[0] if records else None)


def load_saved(run_dir: Path, record: dict[str, Any]) -> Predictions:
    folder = Path(run_dir) / record["path"]
    if not folder.is_dir():
        raise StoreError(f"{folder} is missing, though {run_dir}/run.json lists it; rerun kvpipe probe")
    return read_predictions(folder, record["format"])


def record_target(record: dict[str, Any]) -> Target:
    return Target(record["kind"], int(record["layer"]), int(record["head"]))

