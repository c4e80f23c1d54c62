"""semantic-seg: zero-shot semantic segmentation by dot product with class-name tokens (ImageNet-S).

Protocol (paper Section 3.1): for each image and each class it contains (the ImageNet-S
setting, where the image's classes are known: the classes of its "labels" map), score every
base-grid token by its dot product with the class name's final-token feature of the same
(kind, layer, head) (``store.text(kind, layer, head)[class_queries[class]]``); turn the scores
into a mask as ``probes/grounding.py`` describes (per-image min-max, bilinear upsampling, a
pixel takes the best class whose normalised score is above ``threshold``, else background).

Metric (ImageNet-S ``evaluation/evaluator.py``; standard semantic-segmentation mIoU):
intersections and unions per class accumulated over the dataset; IoU per class; ``mIoU`` =
mean over the dataset's own classes that occur (union > 0); ``mIoU_fg`` leaves out the
background. Pixels labelled 255 are ignored.

Background: ImageNet-S has a background class (its label 0, "other category"), which counts in
``mIoU`` as in its evaluator. A dataset without one (BDD-10K: every pixel is one of its 19
classes or ignored) says so in its structure (``"has_background": false``); then the
background is not a class of the metric: pixels the mask rule leaves unassigned are misses of
their true class, and ``mIoU`` = ``mIoU_fg``. (Averaging a background that never occurs in
the ground truth would add an IoU of 0: a per-class IoU of 0.9 on two classes would read 0.6.)

post_proj (Table 1's post-proj baseline) scores the image tokens as they enter the LM against
each class name's final-token row of the LM's input embeddings; on a SigLIP store, its per-patch
image-text embeddings against its text tower's embeddings (``probes/grounding.py``).
"""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.base import PROBES, Target
from kvpipe.probes.device import uses_torch
from kvpipe.probes.grounding import Grounded, TextGroundedProbe, check_threshold
from kvpipe.probes.metrics.segmentation import ClassIoU, confusion
from kvpipe.probes.predictions import MaskImages, MaskItem
from kvpipe.probes.tokens import IGNORE, class_map, classes_present


@PROBES.register
class SemanticSegmentation(TextGroundedProbe):
    description = "zero-shot semantic segmentation: tokens . class-name token, mIoU (ImageNet-S)"
    example = "imagenet-s or synthetic"
    prediction_format = "masks"
    version = 3  # 3: post_proj scored against the text queries' post_proj

    def prepare(self) -> None:
        root = self.store.root
        self.threshold = check_threshold(self.params["threshold"])
        structure = self.store.structure()
        self.has_background = has_background(structure, self.store.meta.dataset)
        class_queries = structure.get("class_queries") or {}
        if not class_queries:
            raise StoreError(f"store {root} has no class queries; semantic-seg needs a dataset with class-name "
                             f"text queries such as imagenet-s or synthetic")
        self.class_queries = {int(c): int(q) for c, q in class_queries.items()}
        self.check_query_indices(self.class_queries.values(), "class query")
        self.items = []  # (row, local ground truth, classes present)
        for r in self.store.images():
            if r.mask_offset < 0:
                continue
            ann = self.store.annotation(r)
            present = classes_present(ann.meta, ann.mask)
            if not present:
                continue
            missing = [c for c in present if c not in self.class_queries]
            if missing:
                raise StoreError(f"store {root}: image {r.image_id} has class {missing[0]}, which has no class "
                                 f"query; the dataset's class_queries are incomplete")
            self.items.append((r, local_ground_truth(ann.mask, ann.meta, present), present))
        if not self.items:
            raise StoreError(f"store {root} has no image with a mask and a labelled class; semantic-seg needs "
                             f"annotated images")
        self.rows = [r for r, _, _ in self.items]

    def compute(self, target: Target, data: Any) -> dict[str, float]:
        acc = ClassIoU()
        if uses_torch(self.device):  # the confusion of each image, counted on the device
            for (r, gt, present), (conf, _) in zip(self.items, self.device_results(target, data, "classes")):
                acc.add_confusion(conf, [0, *present])
        else:
            for (r, gt, present), pred in zip(self.items, self._predicted(target, data)):
                keep = gt != IGNORE
                acc.add_confusion(confusion(gt[keep].astype(np.int64), pred[keep], len(present) + 1), [0, *present])
        fg = acc.miou(exclude=(0,))
        return {"mIoU": acc.miou() if self.has_background else fg, "mIoU_fg": fg}

    def predictions(self, target: Target) -> MaskImages:
        """Each image's predicted classes: class ids as indices (0 background; ids above 255,
        which a palette PNG cannot hold, are left out as background)."""
        items = []
        for (r, _, present), local in zip(self.items, self._predicted(target, self.read(target))):
            lut = np.array([0, *[c if c <= 255 else 0 for c in present]], np.uint8)
            items.append(MaskItem(r.image_id, r.image_id, lut[local], {"classes": present}))
        return MaskImages(items)

    def grounded(self) -> list[Grounded]:
        return [Grounded(r, tuple(self.class_queries[c] for c in present), gt) for r, gt, present in self.items]

    def _predicted(self, target: Target, data: Any) -> Iterator[np.ndarray]:
        """Per item, the predicted map of local classes (0 background, 1 + index in ``present``)."""
        if uses_torch(self.device):
            for _, local in self.device_results(target, data, "classes", keep_maps=True):
                yield local
            return
        scores = self.image_scores(target, data)
        for r, gt, present in self.items:
            up = scores(r, [self.class_queries[c] for c in present], gt.shape)
            yield np.where(up.max(axis=-1) > self.threshold, up.argmax(axis=-1) + 1, 0)  # local: 0 = bg


# Datasets whose stores predate the structure's "has_background" key and have no background class.
NO_BACKGROUND_DATASETS = ("bdd10k",)


def has_background(structure: dict, dataset_desc: dict) -> bool:
    """Whether class 0 (background) is one of the dataset's classes: the structure's
    ``has_background`` (default true), else false for the datasets known to have none."""
    if "has_background" in structure:
        return bool(structure["has_background"])
    return dataset_desc.get("name") not in NO_BACKGROUND_DATASETS


def local_ground_truth(mask: np.ndarray, meta: dict, present: list[int]) -> np.ndarray:
    """uint8 map of local class indices: 0 background, 1 + present.index(c) for class c, 255 ignore."""
    classes = class_map(mask, meta)  # class ids, -1 = ignore
    lut = np.zeros(max(int(classes.max(initial=0)), max(present)) + 2, np.uint8)  # unknown ids -> background
    lut[present] = np.arange(1, len(present) + 1)
    lut[-1] = IGNORE  # index -1: ignore
    return lut[classes]
