"""The paper's datasets as numbers: images a store holds and their typical size (no files read).

Why: ``kvpipe plan --dataset D`` without ``--data-root`` sizes a store before the data is even
downloaded. Counts are the evaluation splits kvpipe extracts (its adapters' defaults); sizes are
the splits' typical image (most images of PASCAL, SPair and ImageNet are 500 x 375 or close).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TypicalSet:
    images: int
    width: int
    height: int
    what: str
    queries: int = 0  # text queries the adapter makes (class names, referring sentences)


TYPICAL: dict[str, TypicalSet] = {
    "pascal5i": TypicalSet(346, 500, 375, "Pascal-5i fold 0, val images of classes 1-5"),
    "msrc": TypicalSet(240, 320, 213, "MSRC co-segmentation sets (7 classes)"),
    "imagenet-s": TypicalSet(752, 500, 375, "ImageNet-S50 val (variant 50, the adapter's default)", queries=50),
    # 10,834 sentences; identical ones are stored once, so this is an upper bound
    "refcoco": TypicalSet(1500, 640, 480, "RefCOCO (UNC) val images", queries=10834),
    "spair": TypicalSet(1800, 500, 375, "SPair-71k test pairs' images (about 1,800 of 12,234 pairs)"),
    "davis": TypicalSet(1999, 854, 480, "DAVIS-2017 val, 30 videos at 480p"),
    "coco": TypicalSet(1000, 640, 480, "COCO val2017, 1,000 images (input-agnostic keys)"),
    "bdd10k": TypicalSet(1000, 1280, 720, "BDD-10K val", queries=19),
}
PAPER_DATASETS = tuple(TYPICAL)
