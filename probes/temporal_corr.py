"""temporal-corr: propagate the first frame's object masks through each video (DAVIS J&F).

Protocol (DINO's DAVIS evaluation, used by the paper): token features of each frame on its
base-view grid, a memory of the first frame and the 7 most recent frames, top-5 neighbours
within a spatial window, affinities exp(cos / 0.1); soft labels upsampled bilinearly to the
annotation resolution; J (region IoU) and F (boundary F, bound_th 0.008) per object as in the
official DAVIS-2017 evaluation, averaged over objects: J_mean, F_mean and JF_mean.

The window. DINO's ``--size_mask_neighborhood 12`` counts cells of its 8-pixel patches on
frames scaled to 480 pixels on their short side (``read_frame``): a radius of 12 x 8 = 96
pixels of the 480p frame. kvpipe keeps that radius in pixels (``neighborhood_px=96``) and
converts it per video into the store's token grid: a memory token is inside the window of a
target token when their row distance times the token height, and their column distance times
the token width, are both at most the radius, token sizes measured in pixels of the frame
scaled to 480 on its short side (``image_h / grid rows`` and ``image_w / grid cols`` of the
manifest row, times 480 / min(image_h, image_w)). For 8-pixel tokens on a 480p frame that is
DINO's window exactly; for LLaVA-OneVision's 27 x 27 base grid of an 854 x 480 frame it is 5
rows and 3 columns. ``size_mask_neighborhood=N`` instead gives the radius in tokens (DINO's
flag read literally on the store's grid); a radius <= 0 disables the window, as in DINO.

Tokens: ``tokens=base`` (default) is the base view, the whole frame at the encoder's base
resolution (the only grid of fixed-resolution and native-resolution models); ``tokens=crops``
uses the any-resolution models' stitched crop grid (newline tokens dropped) where the store
holds one (the manifest row's segments), a finer grid of the same frame.

Where J and F are computed. On the torch devices (``--device cpu|cuda``) the soft labels never
leave the device: the scored frames are upsampled, argmaxed and counted there in batches
(``metrics/davis_torch.py``: intersections and unions, contour pixels, matches within the
evaluation's disk), against the ground truth's object masks, contours and contour dilations
prepared once per sweep (at the first target) and kept on the device within
``device.reference_budget``; a target's counts come to the host once, at the end, and give the
same J and F as the host code (``metrics/davis.py``), which the numpy reference still runs on
label maps copied to the host.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import batch_budget, host_workers, reference_budget, uses_torch, with_smaller_batches
from kvpipe.probes.metrics.davis import VOID_LABEL, VideoReference, summarize
from kvpipe.probes.metrics.davis_torch import DeviceVideoReference
from kvpipe.probes.metrics.davis_torch import per_object as davis_per_object
from kvpipe.probes.metrics.davis_torch import supported as metric_on_device
from kvpipe.probes.predictions import DavisFolders, frame_name
from kvpipe.probes.propagation import (labels_to_grid, propagate_video, propagate_videos_torch, upsample_batch,
                                       upsample_labels_torch, upsample_to_mask, upsample_to_masks_torch)

DINO_PATCH_PX, DINO_NEIGHBORHOOD, DINO_SHORT_SIDE = 8, 12, 480  # eval_video_segmentation.py defaults
TOKEN_GRIDS = ("base", "crops")


def token_radius(radius_px: float, image_hw: tuple[int, int], grid_hw: tuple[int, int],
                 short_side: int = DINO_SHORT_SIDE) -> tuple[int, int]:
    """A window radius in pixels of the frame scaled to ``short_side`` on its short side ->
    (rows, cols) in tokens of a ``grid_hw`` grid spanning an ``image_hw`` frame: the largest
    token distances whose extent in pixels is within the radius."""
    scale = short_side / min(image_hw)
    cell_h = image_hw[0] / grid_hw[0] * scale
    cell_w = image_hw[1] / grid_hw[1] * scale
    return math.floor(radius_px / cell_h + 1e-9), math.floor(radius_px / cell_w + 1e-9)


def same_size_runs(shapes: list[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """(start, stop) of the runs of consecutive equal shapes."""
    start = 0
    while start < len(shapes):
        stop = start + 1
        while stop < len(shapes) and shapes[stop] == shapes[start]:
            stop += 1
        yield start, stop
        start = stop


def segment_hw(row: Any, name: str) -> tuple[int, int] | None:
    """(rows, cols) of an image row's token segment ``name``; None when it has none."""
    seg = next((s for s in row.segment_list() if s["name"] == name), None)
    return None if seg is None else (int(seg["rows"]), int(seg["cols"]))


@PROBES.register
class TemporalCorrespondence(Probe):
    description = "video label propagation from frame 0, J&F (DAVIS protocol)"
    primary_metric = "JF_mean"
    rotation_invariant = True  # cosine affinities between frames
    prediction_format = "davis"
    version = 2
    defaults = {"n_last_frames": 7, "neighborhood_px": DINO_NEIGHBORHOOD * DINO_PATCH_PX,
                "size_mask_neighborhood": None, "topk": 5, "temperature": 0.1, "tokens": "base"}
    crop_params = {"tokens": ("crops",)}

    def prepare(self) -> None:
        tokens = self.params["tokens"]
        if tokens not in TOKEN_GRIDS:
            raise UsageError(f"temporal-corr parameter tokens={tokens!r} must be one of {', '.join(TOKEN_GRIDS)}")
        for key in ("neighborhood_px", "size_mask_neighborhood"):
            v = self.params[key]
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise UsageError(f"temporal-corr parameter {key}={v!r} must be a number")
        self.videos = {}
        self.radius: dict[str, tuple[int, int] | int] = {}
        self.objects: dict[str, list[int]] = {}
        self.references: dict[str, VideoReference] = {}  # ground-truth contours, once per frame and object
        self._device_refs: dict[str, Any] | None = None  # the same on the device, at the first target
        for name, rows in self.store.groups().items():
            if len(rows) < 2 or not name:
                continue
            masks = [self.store.annotation(r).mask for r in rows]
            if masks[0] is None:
                continue
            grid = segment_hw(rows[0], tokens)
            if grid is None:
                raise StoreError(f"store {self.store.root}: frame {rows[0].image_id} has no {tokens!r} token grid; "
                                 f"tokens=crops needs an any-resolution model's store with crops (use tokens=base)")
            self.videos[name] = (rows, masks)
            self.radius[name] = self._radius(rows[0], grid)
            objects = sorted(int(o) for o in np.unique(masks[0]) if 0 < o < 255)
            if objects:
                self.objects[name] = objects
                self.references[name] = VideoReference(
                    [m if m is not None else np.zeros_like(masks[0]) for m in masks], objects)
        if not self.videos:
            raise StoreError(f"store {self.store.root} has no videos with a first-frame mask; temporal-corr "
                             f"needs a video dataset such as davis or synthetic")

    def _radius(self, row: Any, grid: tuple[int, int]) -> tuple[int, int] | int:
        """The window radius of a video in tokens: the token override, else the pixel radius converted."""
        if self.params["size_mask_neighborhood"] is not None:
            return int(self.params["size_mask_neighborhood"])  # DINO: <= 0 disables the window
        px = float(self.params["neighborhood_px"])
        if px <= 0:
            return 0
        return token_radius(px, (int(row.image_h), int(row.image_w)), grid)

    def read(self, target: Target) -> Any:
        return self.store.read(target.kind, target.layer, target.head,
                               images=[r for rows, _ in self.videos.values() for r in rows],
                               device=self.decode_on(), basis=self.read_basis())

    def compute(self, target: Target, feats: Any) -> dict[str, float]:
        if uses_torch(self.device) and all(map(metric_on_device, self.references.values())):
            grids = self._grids(feats)
            results = with_smaller_batches(lambda budget: self._scores_torch(grids, budget), batch_budget(self.device),
                                           self.device, f"temporal-corr of {target.kind} L{target.layer} H{target.head}")
        else:
            preds = self._predicted(target, feats)
            # the videos' J and F in threads (numpy and the k-d tree release the GIL on whole frames)
            names = list(preds)
            with ThreadPoolExecutor(max_workers=host_workers(len(names))) as pool:
                results = dict(zip(names, pool.map(lambda n: self.references[n].evaluate(preds[n]), names)))
        per_object = {f"{name}/{obj}": res for name, res_v in results.items() for obj, res in res_v.items()}
        return summarize(per_object)

    def predictions(self, target: Target) -> DavisFolders:
        """Every scored video's label maps, frame 0 the given mask (void as background)."""
        preds = self._predicted(target, self.read(target))
        videos = {}
        for name, frames in preds.items():
            rows = self.videos[name][0]
            first = np.where(frames[0] == VOID_LABEL, 0, frames[0]).astype(np.uint8)
            videos[name] = [(frame_name(r), p.astype(np.uint8)) for r, p in zip(rows, [first, *frames[1:]])]
        return DavisFolders(videos)

    def _grids(self, feats: Any) -> dict[str, list[np.ndarray]]:
        index = {r.index: i for i, r in enumerate(feats.rows)}
        return {name: [feats.grid(index[r.index], self.params["tokens"]) for r in rows]
                for name, (rows, _) in self.videos.items() if name in self.objects}

    def _predicted(self, target: Target, feats: Any) -> dict[str, list[np.ndarray]]:
        """Per video with objects, the label map of every frame (frame 0: the given mask)."""
        grids = self._grids(feats)
        if uses_torch(self.device):
            preds = with_smaller_batches(lambda budget: self._predict_torch(grids, budget),
                                         batch_budget(self.device), self.device,
                                         f"temporal-corr of {target.kind} L{target.layer} H{target.head}")
        else:
            preds = {name: self._predict_numpy(name, g) for name, g in grids.items()}
        return preds

    def _first_labels(self, name: str, grid_hw: tuple[int, int]) -> np.ndarray:
        return labels_to_grid(self.videos[name][1][0], grid_hw, max(self.objects[name]) + 1)

    def _mask_shapes(self, name: str) -> list[tuple[int, int]]:
        masks = self.videos[name][1]
        return [m.shape if m is not None else masks[0].shape for m in masks[1:]]

    def _predict_numpy(self, name: str, grids: list[np.ndarray]) -> list[np.ndarray]:
        """The reference: ``propagate_video`` in numpy float64, ``upsample_to_mask`` per frame."""
        soft = propagate_video(grids, self._first_labels(name, grids[0].shape[:2]),
                               n_last_frames=self.params["n_last_frames"], size_mask_neighborhood=self.radius[name],
                               topk=self.params["topk"], temperature=self.params["temperature"])
        return [self.videos[name][1][0]] + [upsample_to_mask(s, hw) for s, hw in zip(soft, self._mask_shapes(name))]

    def _propagated_torch(self, grids: dict[str, list[np.ndarray]], budget: int) -> Iterator[tuple[str, Any]]:
        """(video, soft labels (T-1, h, w, C) on the device) of every video. Videos on one grid
        with one window propagate together (``propagate_videos_torch``), their features within
        4 x budget."""
        batches: dict[tuple, list[str]] = {}
        for name, g in grids.items():
            batches.setdefault((g[0].shape[:2], self.radius[name]), []).append(name)
        runs = []  # videos propagated together: one grid and window, their features within 4 x budget
        for (grid_hw, radius), names in batches.items():
            chunk, size = [], 0
            for name in names:
                frames = grids[name]
                nbytes = 8 * len(frames) * int(np.prod(frames[0].shape))  # float64 on the device
                if chunk and size + nbytes > 4 * budget:
                    runs.append((grid_hw, radius, chunk))
                    chunk, size = [], 0
                chunk.append(name)
                size += nbytes
            runs.append((grid_hw, radius, chunk))
        for grid_hw, radius, names in runs:
            soft = propagate_videos_torch([grids[n] for n in names], [self._first_labels(n, grid_hw) for n in names],
                                          device=self.device, n_last_frames=self.params["n_last_frames"],
                                          size_mask_neighborhood=radius, topk=self.params["topk"],
                                          temperature=self.params["temperature"], budget=budget)
            yield from zip(names, soft)

    def _predict_torch(self, grids: dict[str, list[np.ndarray]], budget: int) -> dict[str, list[np.ndarray]]:
        """Every video's label maps on the host: soft labels upsampled on the device, frames of
        one size at a time."""
        out: dict[str, list[np.ndarray]] = {}
        for name, s in self._propagated_torch(grids, budget):
            shapes = self._mask_shapes(name)
            preds = [self.videos[name][1][0]]
            for start, stop in same_size_runs(shapes):
                preds.extend(upsample_to_masks_torch(s[start:stop], shapes[start], budget))
            out[name] = preds
        return out

    def _scores_torch(self, grids: dict[str, list[np.ndarray]], budget: int) -> dict[str, dict[int, dict[str, float]]]:
        """Every video's per-object J and F with the metric on the device (``davis_torch``):
        the scored frames' soft labels upsampled and argmaxed, their J and F counts, in batches
        of frames of one size; one copy to the host per target, at the end."""
        import torch

        refs = self._device_references()

        def video_counts(item: tuple[str, Any]) -> list[Any]:
            name, s = item
            ref, out = refs[name], []
            for start, stop in same_size_runs(ref.shapes):
                hw = ref.shapes[start]
                per = max(1, min(upsample_batch(s.shape[-1], hw, budget), budget // ref.bytes_per_frame(hw)))
                for a in range(start, stop, per):
                    b = min(stop, a + per)
                    first, last = ref.frames[a] - 1, ref.frames[b - 1] - 1  # soft labels start at frame 1
                    out.append(ref.counts(upsample_labels_torch(s[first: last + 1], hw), a))
            return out

        # on the CPU the videos in threads, as the host metric's (torch releases the GIL in its
        # operations); on a GPU one after another
        workers = host_workers(len(grids), self.device)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            items = list(self._propagated_torch(grids, budget))
            counts = dict(zip([n for n, _ in items], pool.map(video_counts, items)))
        names = [n for n in counts if counts[n]]
        # videos differ in their number of objects: flattened for the one copy, reshaped per video
        host = torch.cat([torch.cat(counts[n]).reshape(-1) for n in names]).cpu().numpy() if names else None
        out, at = {}, 0
        for name in counts:
            shape = (len(refs[name].frames), len(refs[name].objects), 6)
            size = int(np.prod(shape))
            block = host[at: at + size].reshape(shape) if size else np.zeros(shape, np.int64)
            at += size
            out[name] = davis_per_object(block, refs[name].objects)
        return out

    def _device_references(self) -> dict[str, Any]:
        """The ground truth of every video on the device, prepared once (the first target) and
        reused by every target; the object masks and contour dilations kept while they fit in
        ``reference_budget``, rebuilt per batch beyond it."""
        if self._device_refs is None:
            left = reference_budget(self.device)
            keep = {}
            for name, ref in self.references.items():
                size = DeviceVideoReference.nbytes_kept(ref)
                keep[name] = size <= left
                left -= size if size <= left else 0
            workers = host_workers(len(keep), self.device)
            with ThreadPoolExecutor(max_workers=workers) as pool:
                made = pool.map(lambda n: DeviceVideoReference(self.references[n], self.device, keep=keep[n]), keep)
                self._device_refs = dict(zip(keep, made))
        return self._device_refs

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        """The window actually used, in tokens (rows and columns; smallest and largest over videos;
        -1 when the window is off)."""
        radii = [r if isinstance(r, tuple) else ((r, r) if r > 0 else (-1, -1)) for r in self.radius.values()]
        out = []
        for axis, name in ((0, "rows"), (1, "cols")):
            vals = [r[axis] for r in radii]
            out += [{"layer": -1, "head": -1, "kind": "dataset", "metric": f"neighborhood_{name}_min",
                     "value": float(min(vals))},
                    {"layer": -1, "head": -1, "kind": "dataset", "metric": f"neighborhood_{name}_max",
                     "value": float(max(vals))}]
        return out, []
