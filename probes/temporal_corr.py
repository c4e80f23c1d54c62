"""temporal-corr: propagate the first frame's object masks through each video (DAVIS J&F).

Protocol (DINO's DAVIS evaluation, used by the paper): token features of each frame on its
base-view grid, a memory of the first frame and the 7 most recent frames, top-5 neighbours
within a 12-token neighbourhood, affinities exp(cos / 0.1); soft labels upsampled bilinearly to the
annotation resolution; J (region IoU) and F (boundary F, bound_th 0.008) per object as in the
official DAVIS-2017 evaluation, averaged over objects: J_mean, F_mean and JF_mean.
"""

from __future__ import annotations

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.metrics.davis import evaluate_video, summarize
from kvpipe.probes.propagation import labels_to_grid, propagate_video, upsample_to_mask


@PROBES.register
class TemporalCorrespondence(Probe):
    description = "video label propagation from frame 0, J&F (DAVIS protocol)"
    primary_metric = "JF_mean"
    defaults = {"n_last_frames": 7, "size_mask_neighborhood": 12, "topk": 5, "temperature": 0.1}

    def prepare(self) -> None:
        self.videos = {}
        for name, rows in self.store.groups().items():
            if len(rows) < 2 or not name:
                continue
            masks = [self.store.annotation(r).mask for r in rows]
            if masks[0] is None:
                continue
            self.videos[name] = (rows, masks)
        if not self.videos:
            raise StoreError(f"store {self.store.root} has no videos with a first-frame mask; temporal-corr "
                             f"needs a video dataset such as davis or synthetic")

    def score(self, target: Target) -> dict[str, float]:
        feats = self.store.read(target.kind, target.layer, target.head,
                                images=[r for rows, _ in self.videos.values() for r in rows])
        index = {r.index: i for i, r in enumerate(feats.rows)}
        per_object: dict[str, dict[str, float]] = {}
        for name, (rows, masks) in self.videos.items():
            grids = [feats.grid(index[r.index]) for r in rows]
            objects = sorted(int(o) for o in np.unique(masks[0]) if 0 < o < 255)
            if not objects:
                continue
            n_classes = max(objects) + 1
            first = labels_to_grid(masks[0], grids[0].shape[:2], n_classes)
            soft = propagate_video(grids, first, n_last_frames=self.params["n_last_frames"],
                                   size_mask_neighborhood=self.params["size_mask_neighborhood"],
                                   topk=self.params["topk"], temperature=self.params["temperature"])
            preds = [masks[0]] + [upsample_to_mask(s, m.shape if m is not None else masks[0].shape)
                                  for s, m in zip(soft, masks[1:])]
            gts = [m if m is not None else np.zeros_like(masks[0]) for m in masks]
            for obj, res in evaluate_video(gts, preds, objects).items():
                per_object[f"{name}/{obj}"] = res
        return summarize(per_object)
