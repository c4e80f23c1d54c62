"""Build small feature stores for probe tests, with features that must succeed or must fail.

``write_toy_store`` writes images given as token-level label grids (one label per token,
expanded to PATCH x PATCH pixels), their annotation meta, the dataset structure and text
queries. Head 0 of every layer carries the chosen features, head 1 noise; post_proj equals
head 0. "oracle" token features are the one-hot of the token's class (mask label -> class id
through meta["labels"]; 255 and unmapped labels -> class 0) plus small noise; oracle text
features are the one-hot of the class each query names (``text_classes``). "random" draws
both from a normal distribution.

Masks made of full-width, token-aligned stripes have no corners, so bilinear upsampling of
perfect token scores reproduces them exactly and an oracle must score 1.0.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from kvpipe.store import FeatureSetMeta
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter

GH, GW, PATCH = 6, 8, 8  # token grid and pixels per token
DIM = 32  # head_dim (and hidden size): one-hot classes, and noise in enough dimensions that
# k-means (cosegmentation) does not gain by splitting it (in 8 dimensions it would)


@dataclass
class ToyImage:
    image_id: str
    tokens: np.ndarray  # (GH, GW) uint8 mask labels, one per token
    meta: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    frame: int = -1

    @property
    def mask(self) -> np.ndarray:
        return np.kron(self.tokens, np.ones((PATCH, PATCH), np.uint8))

    def token_classes(self) -> np.ndarray:
        lut = np.zeros(256, np.int64)
        labels = self.meta.get("labels")
        if labels:
            for k, v in labels.items():
                lut[int(k)] = int(v)
        else:
            lut[:] = np.arange(256)
        lut[255] = 0
        return lut[self.tokens.ravel()]


def stripes(rows: dict[int, tuple[int, int]], fill: int = 0) -> np.ndarray:
    """(GH, GW) labels: ``{label: (first_row, end_row)}`` full-width stripes on ``fill``."""
    m = np.full((GH, GW), fill, np.uint8)
    for label, (a, b) in rows.items():
        m[a:b] = label
    return m


def write_toy_store(path: Path, images: Sequence[ToyImage], features: str, structure: dict | None = None,
                    text_queries: Sequence[str] = (), text_classes: Sequence[int] = (), layers: int = 2,
                    heads: int = 2, noise: float = 0.01, seed: int = 0) -> Path:
    """Write the store; returns ``path``. ``features``: "oracle" or "random"."""
    if features not in ("oracle", "random"):
        raise ValueError(f"features must be 'oracle' or 'random', not {features!r}")
    rng = np.random.default_rng(seed)
    n_tok = GH * GW
    meta = FeatureSetMeta(model={"name": "toy-features"}, dataset={"name": "toy", "tasks": []},
                          layers=tuple(range(layers)), heads=tuple(range(heads)),
                          kinds=("keys", "values", "post_proj"), keys_rope="post-rope", n_layers=layers,
                          n_kv_heads=heads, head_dim=DIM, hidden_size=DIM, compute_dtype="float32",
                          store_dtype="float32", template="none", prefix="", prefix_token_ids=(),
                          image_token_id=0, part_size=len(images), n_images=len(images), image_ids_sha256="toy",
                          text_queries=tuple(text_queries))
    seg = json.dumps([{"name": "base", "offset": 0, "rows": GH, "cols": GW, "newline": False}])
    rows, feats, masks, mask_offset = [], [], [], 0
    for i, im in enumerate(images):
        if features == "oracle":
            f = np.eye(DIM, dtype=np.float32)[im.token_classes()]
            f = f + noise * rng.standard_normal(f.shape).astype(np.float32)
        else:
            f = rng.standard_normal((n_tok, DIM)).astype(np.float32)
        feats.append(f)
        mask = im.mask
        masks.append(mask.ravel())
        rows.append(ImageRow(index=i, image_id=im.image_id, part=0, token_offset=i * n_tok, n_tokens=n_tok,
                             grid_h=GH, grid_w=GW, segments=seg, image_h=mask.shape[0], image_w=mask.shape[1],
                             group=im.group, frame=im.frame, mask_offset=mask_offset, mask_h=mask.shape[0],
                             mask_w=mask.shape[1], meta=json.dumps(im.meta)))
        mask_offset += mask.size
    tokens = np.concatenate(feats)
    kv = rng.standard_normal((layers, heads) + tokens.shape).astype(np.float32)
    kv[:, 0] = tokens
    writer = StoreWriter.create_or_resume(path, meta, structure or {})
    writer.write_part(0, rows, {"keys": kv, "values": kv, "post_proj": tokens, "masks": np.concatenate(masks)})
    if text_queries:
        q = len(text_queries)
        text = rng.standard_normal((layers, heads, q, DIM)).astype(np.float32)
        if features == "oracle":
            text[:, 0] = np.eye(DIM, dtype=np.float32)[np.asarray(text_classes, np.int64)]
        writer.write_text(list(text_queries), [[0]] * q, {"keys": text, "values": text})
    return path


# ------------------------------------------------------------------ ready-made datasets
def fewshot_images(n_per_class: int = 7) -> tuple[list[ToyImage], dict]:
    """Images with stripes of classes 1 and 2 (some with both, one with an ignore row) and
    episodes: every (image, class) pair as a query with the next 5 images of that class."""
    images = []
    for i in range(n_per_class):
        a = 1 + i % 3  # class 1 stripe rows
        tok = stripes({1: (a, a + 2)})
        if i % 2 == 0:
            tok[5] = 2  # class 2 on the bottom row of every other image
        if i == 3:
            tok[0] = 255  # an ignore row: never counted
        images.append(ToyImage(f"a{i}", tok, {"labels": {"1": 1, "2": 2}}))
    for i in range(n_per_class):
        b = i % 4
        tok = stripes({2: (b, b + 2)})
        images.append(ToyImage(f"b{i}", tok, {"labels": {"2": 2}}))
    by_class: dict[int, list[str]] = {1: [], 2: []}
    for im in images:
        for c in sorted(set(im.token_classes().tolist()) - {0}):
            by_class[c].append(im.image_id)
    episodes = []
    for c, ids in by_class.items():
        for j, q in enumerate(ids):
            others = [x for x in ids[j + 1:] + ids[:j]][:5]
            episodes.append({"query": q, "support": others, "class": c})
    return images, {"classes": ["background", "one", "two"], "episodes": episodes}


def coseg_images() -> tuple[list[ToyImage], dict]:
    """Two image sets of 4 images: set s1's common object is class 1, s2's class 2 (labelled
    1 in its masks through "labels"); one image per set also shows class 3, a distractor that
    appears in too few images to win the vote."""
    images, sets = [], {"s1": {"images": [], "class": 1}, "s2": {"images": [], "class": 2}}
    for i in range(4):
        tok = stripes({1: (1 + i % 3, 3 + i % 3)})
        if i == 2:
            tok[1] = 3
        images.append(ToyImage(f"s1/{i}", tok, {"labels": {"1": 1, "3": 3}}, group="s1", frame=i))
        sets["s1"]["images"].append(f"s1/{i}")
    for i in range(4):
        tok = stripes({1: (2 + i % 2, 4 + i % 2)})
        if i == 1:
            tok[1] = 3
        images.append(ToyImage(f"s2/{i}", tok, {"labels": {"1": 2, "3": 3}}, group="s2", frame=i))
        sets["s2"]["images"].append(f"s2/{i}")
    return images, {"classes": ["background", "one", "two", "three"], "image_sets": sets}


def semantic_images() -> tuple[list[ToyImage], dict, list[str], list[int]]:
    """Images with one or two classes out of 1..5 on local labels 1..K (ImageNet-S style
    "labels" maps), one ignore row; class-name queries for classes 1..5."""
    specs = [({1: (1, 3)}, {"1": 3}), ({1: (0, 2), 2: (4, 6)}, {"1": 1, "2": 5}), ({1: (2, 5)}, {"1": 2}),
             ({1: (3, 4), 2: (1, 2)}, {"1": 4, "2": 3}), ({1: (1, 4)}, {"1": 5}), ({1: (2, 3)}, {"1": 1})]
    images = []
    for i, (rows, labels) in enumerate(specs):
        tok = stripes(rows)
        if i == 2:
            tok[5] = 255
        images.append(ToyImage(f"im{i}", tok, {"labels": labels}))
    names = ["cat", "dog", "car", "tree", "boat"]
    structure = {"classes": ["background", *names], "class_queries": {str(c): c - 1 for c in range(1, 6)}}
    return images, structure, names, list(range(1, 6))


def refexp_images() -> tuple[list[ToyImage], dict, list[str], list[int]]:
    """Images with two objects (mask labels 1, 2 of different classes) and referring
    expressions: object 1 has two sentences, object 2 one."""
    images, queries, classes = [], [], []
    layouts = [({1: (1, 3), 2: (4, 5)}, (1, 4)), ({1: (0, 1), 2: (2, 5)}, (2, 5)), ({1: (3, 5), 2: (1, 2)}, (3, 1))]
    for i, (rows, (c1, c2)) in enumerate(layouts):
        refs = []
        for label, cls, n in ((1, c1, 2), (2, c2, 1)):
            idx = []
            for s in range(n):
                idx.append(len(queries))
                queries.append(f"image {i} object {label} sentence {s}")
                classes.append(cls)
            refs.append({"label": label, "queries": idx})
        images.append(ToyImage(f"ref{i}", stripes(rows), {"labels": {"1": c1, "2": c2}, "refs": refs}))
    return images, {"classes": ["background", "a", "b", "c", "d", "e"]}, queries, classes


def seg_stores(root: Path, features: str) -> list[str]:
    """One toy store per segmentation task (1 layer x 2 heads), its dataset listing that task."""
    builders = {"fg-seg": lambda: (*fewshot_images(), (), ()), "cosegmentation": lambda: (*coseg_images(), (), ()),
                "semantic-seg": semantic_images, "refexp-seg": refexp_images}
    paths = []
    for task, build in builders.items():
        images, structure, queries, classes = build()
        path = write_toy_store(root / task, images, features, structure, queries, classes, layers=1)
        meta_file = path / "zarr.json"
        data = json.loads(meta_file.read_text())
        data["attributes"]["kvpipe"]["dataset"]["tasks"] = [task, "input-agnostic"]
        meta_file.write_text(json.dumps(data))
        paths.append(str(path))
    return paths
