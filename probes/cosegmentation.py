"""cosegmentation: segment the object an image set has in common by clustering its tokens (MSRC).

Protocol (paper Section 3.1: "we follow Amir et al. (2022) and perform spatial clustering to
segment objects across images"), after ShirAmir/dino-vit-features ``cosegmentation.py``
(``find_cosegmentation``), with token features in place of DINO descriptors:

1. all base-grid tokens of a set's images, L2-normalised; k-means (faiss, ``niter=300``,
   ``nredo=10``) for k = 1, 2, ... 14 on a subsample (every ``sample_interval``-th token of
   each image); the mean squared distance of *all* tokens to their centroid is the elbow
   objective, and the loop stops at the first k whose objective exceeds ``elbow`` (0.975)
   times the previous one; that k's assignment is the clustering;
2. each image votes for the clusters that are salient in it; a cluster is foreground when at
   least ``votes_percentage`` (75) percent of the set's images vote for it;
3. an image's foreground tokens are those of foreground clusters; the 0/1 token map is
   upsampled bilinearly to the mask and thresholded at 0.5.

Deviations, and why:

* saliency. The reference votes with a DINO ViT-S/8's CLS-attention saliency map (a second
  model; a cluster is salient in an image when its mean saliency exceeds 0.065). A store holds
  keys and values only, and probes never run a model, so the saliency here is the boundary
  prior of salient-object detection (Wei et al. 2012 "Geodesic saliency using background
  priors"; Zhu et al. 2014 "Saliency optimization from robust background detection"): tokens
  on the image border are background. A cluster is salient in an image when the share of its
  tokens there that lie on the border ring is smaller than the share of all the image's tokens
  that do (a cluster concentrated inside the frame). The cross-image vote is unchanged, so a
  foreground cluster must be both common to most images and away from their borders;
* ``sample_interval`` defaults to 10, not 100: the reference subsamples ~4000 stride-4
  descriptors per image; an MLM's image has a few hundred tokens, so 10 keeps a similar number
  of samples per image. Sets too small to sample use every token;
* no GrabCut refinement (it needs the image's pixels, which the store does not keep);
* the elbow loop also stops once the objective is zero (more clusters cannot help; the
  reference would keep splitting identical points);
* k-means runs on one thread: these problems are small and OpenMP start-up dominates.

Metrics (Rubinstein et al. 2013, as Amir et al. report them): per image, Jaccard ``J`` of the
foreground and precision ``P`` (share of correctly labelled pixels); ``J_m`` and ``P_m`` are
their means over all images of all sets. Ground-truth foreground = mask labels of the set's
class (every label 1..254 when the set has no class); 255 is ignored.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import host_workers
from kvpipe.probes.metrics.segmentation import jaccard, precision
from kvpipe.probes.predictions import MaskImages, MaskItem
from kvpipe.probes.tokens import IGNORE, border_tokens, label_ids, upsample_bilinear


@contextmanager
def _faiss_threads(n: int) -> Iterator[None]:
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(n)
    try:
        yield
    finally:
        faiss.omp_set_num_threads(before)


def elbow_kmeans(descriptors: Sequence[np.ndarray], *, elbow: float = 0.975, max_clusters: int = 14,
                 sample_interval: int = 10, niter: int = 300, nredo: int = 10,
                 seed: int = 1234) -> tuple[list[np.ndarray], int]:
    """Cluster the tokens of several images together; labels per image and the number of clusters.

    ``find_cosegmentation``'s loop: L2-normalise, train on every ``sample_interval``-th token
    of each image, assign all tokens, stop at the first k whose mean squared distance is above
    ``elbow`` times the previous k's (or is zero).
    """
    import faiss

    data = np.ascontiguousarray(np.concatenate(descriptors).astype(np.float32))
    faiss.normalize_L2(data)
    sample = np.ascontiguousarray(np.concatenate([_normalised(d[::sample_interval]) for d in descriptors]))
    if len(sample) < max_clusters:  # too few to sample: train on every token
        sample = data
    dim = data.shape[1]
    objectives: list[float] = []
    labels = np.zeros(len(data), np.int64)
    k = 1
    with _faiss_threads(1):
        for n_clusters in range(1, max_clusters + 1):
            if n_clusters > len(sample):
                break
            km = faiss.Kmeans(dim, n_clusters, niter=niter, nredo=nredo, seed=seed,
                              min_points_per_centroid=1)  # (silences faiss's "too few points" warning)
            km.train(sample)
            dist, assign = km.index.search(data, 1)
            labels, k = assign[:, 0].astype(np.int64), n_clusters
            objectives.append(float(dist.sum()) / len(data))
            if len(objectives) > 1 and objectives[-1] > elbow * objectives[-2]:
                break
            if objectives[-1] <= 0.0:
                break
    bounds = np.cumsum([len(d) for d in descriptors])[:-1]
    return np.split(labels, bounds), k


def _normalised(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def foreground_clusters(labels: Sequence[np.ndarray], borders: Sequence[np.ndarray], k: int,
                        votes_percentage: float = 75.0) -> np.ndarray:
    """Cluster ids voted foreground: salient (less on the border ring than the image's tokens as a
    whole) in at least ``ceil(n_images * votes_percentage / 100)`` images."""
    votes = np.zeros(k)
    for lab, border in zip(labels, borders):
        count = np.bincount(lab, minlength=k)
        on_border = np.bincount(lab, weights=border.astype(np.float64), minlength=k)
        share = np.divide(on_border, count, out=np.ones(k), where=count > 0)
        votes += (count > 0) & (share < border.mean())
    return np.flatnonzero(votes >= np.ceil(len(labels) * votes_percentage / 100))


@PROBES.register
class CoSegmentation(Probe):
    description = "co-segmentation of image sets by k-means over their tokens (Amir et al. 2022), J_m (MSRC)"
    primary_metric = "J_m"
    rotation_invariant = True  # k-means of L2-normalised tokens
    prediction_format = "masks"
    defaults = {"elbow": 0.975, "max_clusters": 14, "votes_percentage": 75, "sample_interval": 10,
                "niter": 300, "nredo": 10, "seed": 1234}
    version = 1

    def prepare(self) -> None:
        root = self.store.root
        sets = self.store.structure().get("image_sets") or {}
        if not sets:
            raise StoreError(f"store {root} has no image sets; cosegmentation needs a dataset with image sets "
                             f"such as msrc or synthetic")
        for key in ("max_clusters", "sample_interval", "niter", "nredo"):
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise UsageError(f"--param {key}={v!r} must be an integer >= 1")
        for key, high in (("elbow", 1.0), ("votes_percentage", 100.0)):
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < float(v) <= high:
                raise UsageError(f"--param {key}={v!r} must be a number in (0, {high:g}]")
        if isinstance(self.params["seed"], bool) or not isinstance(self.params["seed"], int):
            raise UsageError(f"--param seed={self.params['seed']!r} must be an integer")
        rows = {r.image_id: r for r in self.store.images()}
        self.sets: dict[str, list] = {}
        self.gt: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for name, spec in sorted(sets.items()):
            usable = [rows[i] for i in spec.get("images", []) if i in rows and rows[i].mask_offset >= 0]
            if len(usable) < 2:
                continue
            self.sets[name] = usable
            for r in usable:
                ann = self.store.annotation(r)
                if spec.get("class") is None:
                    fg = (ann.mask > 0) & (ann.mask != IGNORE)
                else:
                    fg = np.isin(ann.mask, label_ids(ann.meta, int(spec["class"])))
                self.gt[r.image_id] = (fg, ann.mask != IGNORE)
        if not self.sets:
            raise StoreError(f"store {root}: none of its {len(sets)} image sets has two or more images "
                             f"extracted with a mask; cosegmentation needs them")
        self.rows = sorted({r.index: r for rs in self.sets.values() for r in rs}.values(), key=lambda r: r.index)

    def score(self, target: Target) -> dict[str, float]:
        js, ps = [], []
        for r, pred in self._predicted(target):
            gt, valid = self.gt[r.image_id]
            js.append(jaccard(pred, gt, valid))
            ps.append(precision(pred, gt, valid))
        return {"J_m": float(np.mean(js)), "P_m": float(np.mean(ps))}

    def predictions(self, target: Target) -> MaskImages:
        """Each image's common-object mask: 1 on the foreground."""
        set_of = {r.image_id: name for name, rows in self.sets.items() for r in rows}
        return MaskImages([MaskItem(r.image_id, r.image_id, pred.astype(np.uint8), {"set": set_of[r.image_id]})
                           for r, pred in self._predicted(target)])

    def _predicted(self, target: Target) -> Iterator[tuple[Any, np.ndarray]]:
        """(row, predicted foreground at the mask's size) of every image of every set."""
        feats = self.store.read(target.kind, target.layer, target.head, images=self.rows, basis=self.read_basis())
        index = {r.image_id: i for i, r in enumerate(feats.rows)}
        p = self.params

        def segment(rows: list[Any]) -> list[tuple[Any, np.ndarray]]:
            grids = [feats.grid(index[r.image_id]) for r in rows]
            descs = [g.reshape(-1, g.shape[-1]) for g in grids]
            labels, k = elbow_kmeans(descs, elbow=float(p["elbow"]), max_clusters=p["max_clusters"],
                                     sample_interval=p["sample_interval"], niter=p["niter"], nredo=p["nredo"],
                                     seed=int(p["seed"]))
            borders = [border_tokens(g.shape[:2]) for g in grids]
            fg_ids = foreground_clusters(labels, borders, k, float(p["votes_percentage"]))
            return [(r, upsample_bilinear(np.isin(lab, fg_ids).reshape(g.shape[:2]).astype(np.float64),
                                          self.gt[r.image_id][0].shape) > 0.5)
                    for r, g, lab in zip(rows, grids, labels)]

        # the sets are independent and faiss and numpy release the GIL: one set per core, each
        # k-means on one thread as before, so every set's clusters are those of a serial run
        with ThreadPoolExecutor(max_workers=host_workers(len(self.sets))) as pool:
            for masks in pool.map(segment, self.sets.values()):
                yield from masks
