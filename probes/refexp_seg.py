"""refexp-seg: referring-expression segmentation by dot product with the expression's token (RefCOCO).

Protocol (paper Section 3.1: "the same method as semantic segmentation, but with text of the
referring expression rather than the class name"): every sentence of every ref (the image's
"refs": mask label of the referred object + indices of its sentences in the text queries) is a
query; its final-token feature of the same (kind, layer, head) scores the image's base-grid
tokens; per-image min-max normalisation, bilinear upsampling and the ``threshold`` give the
predicted mask (``probes/grounding.py``). Ground truth = the ref's mask label; 255 ignored.

Metrics (the RefCOCO conventions of LAVT / CRIS; the unit is the sentence): IoU per sentence;
``mIoU`` = mean IoU over all sentences (LAVT ``train.py`` ``evaluate``: ``mean_IoU`` appended
per sentence, ``mIoU = np.mean(mean_IoU)``; CRIS ``engine/engine.py`` ``inference``: the mean
of per-sentence IoUs); ``cIoU`` (overall IoU) = sum of intersections / sum of unions over all
sentences (LAVT ``cum_I / cum_U``). ``mIoU_per_object``, a further metric of kvpipe's, is the
mean over referred objects (refs) of the mean IoU of each ref's sentences.

post_proj (Table 1's post-proj and SigLIP cells) scores against each sentence's post_proj, as
semantic-seg does (``probes/grounding.py``).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.base import PROBES, Target
from kvpipe.probes.device import uses_torch
from kvpipe.probes.grounding import Grounded, TextGroundedProbe, check_threshold
from kvpipe.probes.predictions import MaskImages, MaskItem
from kvpipe.probes.tokens import IGNORE


@PROBES.register
class ReferringExpressionSegmentation(TextGroundedProbe):
    description = "referring-expression segmentation: tokens . expression token, mIoU (RefCOCO)"
    example = "refcoco or synthetic"
    prediction_format = "masks"
    version = 3  # 3: post_proj scored against the text queries' post_proj

    def prepare(self) -> None:
        root = self.store.root
        self.threshold = check_threshold(self.params["threshold"])
        self.items = []  # (row, mask, [(label, [query indices])])
        n_refs = 0
        for r in self.store.images():
            refs = r.meta_dict().get("refs") or []
            if not refs or r.mask_offset < 0:
                continue
            n_refs += len(refs)
            self.items.append((r, None, [(int(ref["label"]), [int(q) for q in ref["queries"]]) for ref in refs
                                         if ref.get("queries")]))
        if not self.items:
            raise StoreError(f"store {root} has no referring expressions (no image has 'refs' and a mask); "
                             f"refexp-seg needs a dataset such as refcoco or synthetic")
        self.check_query_indices((q for _, _, refs in self.items for _, qs in refs for q in qs),
                                 "referring expression")
        self.items = [(r, self.store.annotation(r).mask, refs) for r, _, refs in self.items]
        self.rows = [r for r, _, _ in self.items]

    def compute(self, target: Target, data: Any) -> dict[str, float]:
        per_sentence, per_ref, inter_total, union_total = [], [], 0.0, 0.0
        for refs, inter, union in self._areas(target, data):
            iou = np.divide(inter, union, out=np.ones_like(inter), where=union > 0)
            bounds = np.cumsum([len(qs) for _, qs in refs])[:-1]
            per_sentence.extend(iou.tolist())
            per_ref.extend(float(np.mean(x)) for x in np.split(iou, bounds))
            inter_total += inter.sum()
            union_total += union.sum()
        return {"mIoU": float(np.mean(per_sentence)) if per_sentence else float("nan"),
                "cIoU": float(inter_total / union_total) if union_total > 0 else float("nan"),
                "mIoU_per_object": float(np.mean(per_ref)) if per_ref else float("nan")}

    def _areas(self, target: Target, data: Any) -> Iterator[tuple[list, np.ndarray, np.ndarray]]:
        """(refs, intersection per sentence, union per sentence) of each image that has sentences:
        counted on the device on a torch device, else from the reference's masks."""
        if uses_torch(self.device):
            with_refs = [item for item in self.items if item[2]]
            for (_, _, refs), (counts, _) in zip(with_refs, self.device_results(target, data, "objects")):
                yield refs, counts[:, 0].astype(np.float64), counts[:, 1].astype(np.float64)
            return
        for (r, mask, refs), (queries, owner, pred) in self._predicted(target, data):
            pred = pred.reshape(len(queries), -1)  # (Q, pixels)
            flat = mask.ravel()
            valid = flat != IGNORE
            objects = {label: (flat == label) & valid for label, _ in refs}
            inter = np.array([np.count_nonzero(p & objects[o]) for p, o in zip(pred, owner)], np.float64)
            union = np.array([np.count_nonzero((p & valid) | objects[o]) for p, o in zip(pred, owner)], np.float64)
            yield refs, inter, union

    def predictions(self, target: Target) -> MaskImages:
        """Each sentence's predicted mask (1 on the referred region), named image/sentence-N."""
        texts = self.store.text_queries()
        items = []
        for (r, _, _), (queries, owner, pred) in self._predicted(target, self.read(target)):
            for q, label, p in zip(queries, owner, pred):
                items.append(MaskItem(f"{r.image_id}/sentence-{q}", r.image_id, p.astype(np.uint8),
                                      {"sentence": texts[q], "query": int(q), "object_label": int(label)}))
        return MaskImages(items)

    def _predicted(self, target: Target, data: Any) -> Iterator[tuple[tuple, tuple[list[int], np.ndarray, np.ndarray]]]:
        """(item, (query indices, owning mask label per query, (Q, H, W) predicted masks)) per
        image that has sentences."""
        if uses_torch(self.device):
            with_refs = [item for item in self.items if item[2]]
            for item, g, (_, masks) in zip(with_refs, self.grounded(),
                                           self.device_results(target, data, "objects", keep_maps=True)):
                yield item, (list(g.queries), np.asarray(g.labels), masks)
            return
        scores = self.image_scores(target, data)
        for item in self.items:
            r, mask, refs = item
            if not refs:
                continue
            queries = [q for _, qs in refs for q in qs]
            owner = np.repeat([label for label, _ in refs], [len(qs) for _, qs in refs])
            up = scores(r, queries, mask.shape)
            yield item, (queries, owner, np.moveaxis(up, -1, 0) > self.threshold)

    def grounded(self) -> list[Grounded]:
        """The images with sentences: each sentence a query, labelled with its object's mask label."""
        return [Grounded(r, tuple(q for _, qs in refs for q in qs), mask,
                         tuple(label for label, qs in refs for _ in qs)) for r, mask, refs in self.items if refs]
