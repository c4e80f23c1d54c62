"""Saved predictions: what a probe predicted at chosen targets, in formats other tools read.

Why: a score says how good a (layer, head, kind) is; the predictions say how it fails, and let
anyone re-score a number with the benchmark's own evaluation. ``run_probe`` writes them at the
best target of each representation (``--save-predictions best``), at every target (``all``),
or at targets named ``L:H:K`` (``post_proj`` alone for the baseline), under
``<results>/predictions/<kind>-L<layer>-H<head>/`` (``post_proj/`` for the baseline), and
records in run.json what it saved and where. Formats (``FORMATS``, by name):

* ``davis``: ``<dir>/<video>/<frame>.png``, palette PNGs with the DAVIS palette, object ids as
  indices, the annotations' size: the folder layout the official davis2017-evaluation reads;
* ``masks``: ``<dir>/<name>.png`` palette PNGs (0 background, predicted labels as indices)
  and ``masks.parquet`` (name, image id, file, what the mask answers);
* ``points``: ``<dir>/matches.parquet``, one row per transferred keypoint.
"""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import Target
from kvpipe.store.schema import FeatureSetMeta

PREDICTIONS_DIR = "predictions"
SAVE_MODES = ("best", "all", "none")


def davis_palette() -> list[int]:
    """The 256-colour palette of the DAVIS annotations (the PASCAL VOC colour map): index 1 is
    (128, 0, 0), 2 (0, 128, 0), 3 (128, 128, 0), ...; 768 numbers for ``Image.putpalette``."""
    out = []
    for i in range(256):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out += [r, g, b]
    return out


PALETTE = davis_palette()


def write_palette_png(path: Path, labels: np.ndarray) -> None:
    """An indexed PNG whose pixel indices are ``labels`` (uint8), with the DAVIS palette."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or labels.size == 0 or labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError(f"a palette mask needs a 2-D map of labels 0..255, got shape {labels.shape}")
    img = Image.fromarray(labels.astype(np.uint8), mode="P")
    img.putpalette(PALETTE)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def read_palette_png(path: Path) -> np.ndarray:
    """The index map of a palette PNG written by ``write_palette_png``."""
    with Image.open(path) as img:
        if img.mode != "P":
            raise StoreError(f"{path} is a {img.mode} image, not a palette PNG of saved predictions")
        return np.asarray(img).copy()


def frame_name(row: Any) -> str:
    """A frame's file name in a DAVIS results folder: the image id after its video's name
    ("bear/00003" -> "00003"), else the frame number on five digits."""
    prefix = f"{row.group}/"
    if row.image_id.startswith(prefix) and "/" not in row.image_id[len(prefix):]:
        return row.image_id[len(prefix):]
    return f"{int(row.frame):05d}"


def safe_name(name: str) -> str:
    """A relative file path from an image id: path separators kept, anything odd replaced."""
    parts = [re.sub(r"[^A-Za-z0-9._+-]+", "_", p) for p in str(name).split("/")]
    parts = [p for p in parts if p not in ("", ".", "..")]
    return "/".join(parts) or "_"


# ------------------------------------------------------------------------------ formats
class Predictions:
    """A probe's predictions at one target; ``write`` puts them in a directory, ``read`` reverses it."""

    format: ClassVar[str] = ""

    def write(self, directory: Path) -> None:
        raise NotImplementedError

    @classmethod
    def read(cls, directory: Path) -> "Predictions":
        raise NotImplementedError


FORMATS: dict[str, type[Predictions]] = {}


def register_format(cls: type[Predictions]) -> type[Predictions]:
    FORMATS[cls.format] = cls
    return cls


@register_format
@dataclass
class DavisFolders(Predictions):
    """Per video, (frame name, label map) in frame order (frame 0 is the given first mask)."""

    videos: dict[str, list[tuple[str, np.ndarray]]]
    format: ClassVar[str] = "davis"

    def write(self, directory: Path) -> None:
        for video, frames in self.videos.items():
            for frame, labels in frames:
                write_palette_png(directory / safe_name(video) / f"{safe_name(frame)}.png", labels)

    @classmethod
    def read(cls, directory: Path) -> "DavisFolders":
        videos = {}
        for vdir in sorted(p for p in Path(directory).iterdir() if p.is_dir()):
            frames = sorted(vdir.glob("*.png"), key=lambda f: (len(f.stem), f.stem))  # "2" before "10"
            videos[vdir.name] = [(f.stem, read_palette_png(f)) for f in frames]
        return cls(videos)


@dataclass
class MaskItem:
    name: str  # file name without .png (unique within the target)
    image_id: str
    labels: np.ndarray  # uint8 label map, 0 background
    info: dict[str, Any] = field(default_factory=dict)  # what the mask answers (class, sentence, ...)


@register_format
@dataclass
class MaskImages(Predictions):
    """Segmentation masks, one palette PNG each, and an index of what each one is."""

    items: list[MaskItem]
    format: ClassVar[str] = "masks"
    INDEX: ClassVar[str] = "masks.parquet"

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        files = []
        for item in self.items:
            rel = f"{safe_name(item.name)}.png"
            write_palette_png(directory / rel, item.labels)
            files.append(rel)
        table = pa.table({"name": [i.name for i in self.items], "image_id": [i.image_id for i in self.items],
                          "file": files, "info": [json.dumps(i.info, sort_keys=True) for i in self.items]})
        pq.write_table(table, directory / self.INDEX)

    @classmethod
    def read(cls, directory: Path) -> "MaskImages":
        rows = pq.read_table(Path(directory) / cls.INDEX).to_pylist()
        return cls([MaskItem(r["name"], r["image_id"], read_palette_png(Path(directory) / r["file"]),
                             json.loads(r["info"])) for r in rows])


POINT_COLUMNS = ("pair", "source", "target", "keypoint", "source_x", "source_y", "pred_x", "pred_y", "gt_x",
                 "gt_y", "threshold", "correct")


@register_format
@dataclass
class PointMatches(Predictions):
    """Transferred keypoints: one row per keypoint with the columns ``POINT_COLUMNS`` (pixels of
    the original images; ``threshold`` = alpha x the target box's size, ``correct`` = within it)."""

    table: pa.Table
    format: ClassVar[str] = "points"
    FILE: ClassVar[str] = "matches.parquet"

    def write(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        pq.write_table(self.table, directory / self.FILE)

    @classmethod
    def read(cls, directory: Path) -> "PointMatches":
        return cls(pq.read_table(Path(directory) / cls.FILE))


def read_predictions(directory: Path, fmt: str) -> Predictions:
    if fmt not in FORMATS:
        raise StoreError(f"{directory}: unknown prediction format {fmt!r} (known: {', '.join(FORMATS)})")
    return FORMATS[fmt].read(Path(directory))


# ----------------------------------------------------------------------------- what to save
@dataclass(frozen=True)
class SaveRequest:
    """``--save-predictions``: ``best`` (the best target of each representation), ``all``,
    ``none``, or explicit targets."""

    mode: str = "best"
    targets: tuple[Target, ...] = ()

    def text(self) -> str:
        if self.mode != "targets":
            return self.mode
        return ",".join(target_label(t) for t in self.targets)

    @classmethod
    def parse(cls, text: "str | SaveRequest | None", meta: FeatureSetMeta | None = None) -> "SaveRequest":
        """``best`` | ``all`` | ``none`` | ``L:H:K[,...]`` (``post_proj`` for the baseline), checked
        against what the store holds when ``meta`` is given."""
        if isinstance(text, SaveRequest):
            return text
        text = (text or "best").strip()
        if text in SAVE_MODES:
            return cls(text)
        targets = []
        for item in (x.strip() for x in text.split(",")):
            if not item:
                continue
            if item.replace("-", "_") == "post_proj":
                targets.append(Target("post_proj"))
                continue
            m = re.fullmatch(r"(\d+):(\d+):([A-Za-z_-]+)", item)
            if not m:
                raise UsageError(f"--save-predictions {text}: {item!r} is not best, all, none, post_proj or "
                                 f"LAYER:HEAD:KIND such as 12:3:values")
            targets.append(Target(m.group(3).replace("-", "_"), int(m.group(1)), int(m.group(2))))
        if not targets:
            raise UsageError(f"--save-predictions {text!r}: name best, all, none or targets like 12:3:values")
        if meta is not None:
            for t in targets:
                problem = _not_stored(t, meta)
                if problem:
                    raise UsageError(f"--save-predictions {text}: {target_label(t)}: {problem}")
        return cls("targets", tuple(targets))


def _not_stored(t: Target, meta: FeatureSetMeta) -> str:
    if t.kind not in meta.kinds:
        return f"the store holds no {t.kind} (it holds {', '.join(meta.kinds)})"
    if t.kind != "post_proj" and t.layer not in meta.layers:
        return f"layer {t.layer} is not stored (layers {min(meta.layers)}-{max(meta.layers)})"
    if t.kind != "post_proj" and t.head not in meta.heads:
        return f"KV head {t.head} is not stored (heads {', '.join(map(str, meta.heads))})"
    return ""


def target_label(t: Target) -> str:
    return "post_proj" if t.kind == "post_proj" else f"{t.layer}:{t.head}:{t.kind}"


def target_dir(t: Target) -> str:
    """The folder of a target's predictions under ``predictions/``."""
    return "post_proj" if t.kind == "post_proj" else f"{t.kind}-L{t.layer}-H{t.head}"


def chosen_targets(request: SaveRequest, rows: Iterable[dict[str, Any]], metric: str,
                   swept: list[Target]) -> list[tuple[Target, str]]:
    """(target, why) to save: the best-scoring target of each kind by ``metric`` (``best``),
    every swept target (``all``), the named ones, or none."""
    if request.mode == "none":
        return []
    if request.mode == "all":
        return [(t, "swept") for t in swept]
    if request.mode == "targets":
        return [(t, "requested") for t in request.targets]
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["metric"] != metric or not np.isfinite(r["value"]) or (r["kind"] != "post_proj" and r["layer"] < 0):
            continue
        if r["kind"] not in best or r["value"] > best[r["kind"]]["value"]:
            best[r["kind"]] = r
    return [(Target(r["kind"], r["layer"], r["head"]), f"best {r['kind']} by {metric} = {r['value']:.4g}")
            for r in best.values()]


def save_all(probe: Any, chosen: list[tuple[Target, str]], out_dir: Path) -> list[dict[str, Any]]:
    """Compute and write the predictions of ``chosen`` targets under ``out_dir/predictions``
    (replacing what an earlier run left there); the records run.json keeps."""
    root = Path(out_dir) / PREDICTIONS_DIR
    if root.exists():
        shutil.rmtree(root)
    saved = []
    for target, why in chosen:
        preds = probe.predictions(target)
        rel = f"{PREDICTIONS_DIR}/{target_dir(target)}"
        preds.write(Path(out_dir) / rel)
        saved.append({"kind": target.kind, "layer": target.layer, "head": target.head, "format": preds.format,
                      "path": rel, "why": why})
    return saved
