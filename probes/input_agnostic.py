"""input-agnostic: per (layer, head) L2 variance of image keys across images (paper A.6).

Keys whose variance across images is low barely depend on the input. The per-head variances
form a bimodal distribution; the threshold is the valley between the two modes (the paper
reads 450 off its histogram), or the user's ``threshold``. Outputs: variance per head, a
0/1 input-agnostic flag per head, the threshold, a histogram (Figure 14), a heatmap
(Figure 15) and a PCA of the image keys of two images (Figure 4).

Figure 4 ("PCA visualization of all image keys ... for two COCO images. The input-agnostic
image keys (highlighted) alone are nearly constant across images") is drawn for one layer:
every key token of every KV head of the two images, projected jointly on the first two
principal components (numpy SVD of the centred keys), coloured by image, input-agnostic heads
highlighted; small panels repeat the PCA per head. Input-agnostic heads show the two images'
points on top of each other. ``pca_layer`` (default: the layer whose heads split most evenly
into input-agnostic and input-dependent, the latest on ties) and ``pca_images`` (two image
ids; default: the first image and the first one of another group/video, else the second)
choose what is drawn.

The estimator (``estimator``). The paper's quantity is the variance of each key token across
images: position by position, which needs one token layout shared by every image.
``position`` (default) compares the base view (``base`` segment: the whole image at the
encoder's base resolution; for any-resolution models the crops and newline tokens are left
out, so every image has the same grid) token by token. Native-resolution models (Qwen2.5-VL)
give each image its own grid: extract with ``kvpipe extract --image-size WxH`` so every image
has one size. Stores whose base grids still differ are refused with a one-line error naming
that option and the other estimator, ``pooled``: every key token of every image (crops and
newlines too) in one pool, which also counts the variation between positions within an image
(larger values; compare heads within one estimator only). The results table records the
estimator (a row ``estimator_position`` or ``estimator_pooled``), and run.json its parameters.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import batch_budget, uses_torch, with_smaller_batches
from kvpipe.probes.variance import (bimodal_threshold, l2_variance, l2_variance_pooled, l2_variance_pooled_torch,
                                    l2_variance_torch)
from kvpipe.store.manifest import ImageRow

# The results table's metric names: written here, read by the knock-out's head sets
# (pipeline.evaluation.head_sets), which import them from this module.
VARIANCE = "l2_variance"  # per (layer, head) of the keys: the estimator's value
FLAG = "input_agnostic"  # 1.0 where the variance is below the threshold
THRESHOLD_PREFIX = "threshold_"  # + how it was chosen (user, valley, ...): one row, layer = head = -1
ESTIMATOR_PREFIX = "estimator_"  # + the estimator (position, pooled): one row, layer = head = -1
ESTIMATORS = ("position", "pooled")
PCA_LAYER = "pca_layer"


@PROBES.register
class InputAgnostic(Probe):
    description = "L2 variance of image keys across images per head; bimodal threshold"
    kinds = ("keys",)
    baseline = False
    primary_metric = VARIANCE
    ranked = False  # a statistic of the keys, not a score to maximise
    version = 2
    defaults = {"max_images": 1000, "threshold": None, "pca_layer": None, "pca_images": None,
                "estimator": "position"}
    crop_params = {"estimator": ("pooled",)}  # every key token of every image, crops and newlines too
    rotation_invariant = True  # squared distances to the mean key (Figure 4's PCA reads the model's basis)

    def prepare(self) -> None:
        rows = self.store.images()[: int(self.params["max_images"])]
        if len(rows) < 2:
            raise StoreError(f"store {self.store.root} has {len(rows)} usable image(s); input-agnostic "
                             f"needs at least 2 to measure variance across images")
        if "keys" not in self.store.meta.kinds:
            raise StoreError(f"store {self.store.root} has no keys; re-extract with --kinds keys")
        self.rows = rows
        self.estimator = self.params["estimator"]
        if self.estimator not in ESTIMATORS:
            raise UsageError(f"input-agnostic parameter estimator={self.estimator!r} must be one of "
                             f"{', '.join(ESTIMATORS)}")
        if self.estimator == "position":
            check_shared_layout(rows)
        self.pca_rows = self._pca_rows()  # checked before the sweep, drawn after it
        layer = self.params["pca_layer"]
        if layer is not None and layer not in self.store.meta.layers:
            raise UsageError(f"input-agnostic parameter pca_layer={layer!r} is not a stored layer "
                             f"(stored: {list(self.store.meta.layers)})")

    def read(self, target: Target) -> Any:
        return self.store.read("keys", target.layer, target.head, images=self.rows, basis=self.read_basis())

    def compute(self, target: Target, feats: Any) -> dict[str, float]:
        on_device = uses_torch(self.device)
        if self.estimator == "position":
            stacked = np.stack([feats.grid(i, "base") for i in range(len(feats))])
            stacked = stacked.reshape(len(feats), -1, stacked.shape[-1])
            if on_device:
                return {VARIANCE: with_smaller_batches(lambda b: l2_variance_torch(stacked, self.device, b),
                                                       batch_budget(self.device), self.device, "input-agnostic")}
            return {VARIANCE: l2_variance(stacked)}
        images = [feats.image(i) for i in range(len(feats))]
        if on_device:
            return {VARIANCE: with_smaller_batches(lambda b: l2_variance_pooled_torch(images, self.device, b),
                                                   batch_budget(self.device), self.device, "input-agnostic")}
        return {VARIANCE: l2_variance_pooled(images)}

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        from kvpipe.probes.plots import plot_variance_heatmap, plot_variance_histogram
        from kvpipe.probes.runner import layer_head_matrix
        import pyarrow as pa

        values = np.array([r["value"] for r in rows if r["metric"] == VARIANCE])
        if self.params["threshold"] is not None:
            threshold, method = float(self.params["threshold"]), "user"
        else:
            th = bimodal_threshold(values)
            threshold, method = th.value, th.method
        extra = [{"layer": r["layer"], "head": r["head"], "kind": "keys", "metric": FLAG,
                  "value": float(r["value"] < threshold)} for r in rows if r["metric"] == VARIANCE]
        extra.append({"layer": -1, "head": -1, "kind": "keys", "metric": THRESHOLD_PREFIX + method,
                      "value": threshold})
        extra.append({"layer": -1, "head": -1, "kind": "keys", "metric": ESTIMATOR_PREFIX + self.estimator,
                      "value": 1.0})
        meta = self.store.meta
        matrix = layer_head_matrix(pa.Table.from_pylist(rows), VARIANCE, "keys", meta.layers, meta.heads)
        title = f"{meta.model.name} on {meta.dataset.name} ({len(self.rows)} images)"
        flags = {(r["layer"], r["head"]): bool(r["value"]) for r in extra if r["metric"] == FLAG}
        pca_layer = self.pca_layer(flags)
        plots = []
        if self.draw_plots:
            plots = [Path(plot_variance_histogram(values, threshold, out_dir / "input-agnostic-histogram.png", title)),
                     Path(plot_variance_heatmap(matrix, threshold, out_dir / "input-agnostic-heatmap.png", title)),
                     self.plot_pca(flags, out_dir / "input-agnostic-keys-pca.png")]
        extra.append({"layer": -1, "head": -1, "kind": "keys", "metric": PCA_LAYER, "value": float(pca_layer)})
        return extra, plots

    def _pca_rows(self) -> list[ImageRow]:
        wanted = self.params["pca_images"]
        if wanted is not None:
            by_id = {r.image_id: r for r in self.store.images()}
            if (not isinstance(wanted, (list, tuple)) or len(wanted) != 2
                    or any(w not in by_id for w in wanted)):
                raise UsageError(f"input-agnostic parameter pca_images must name two image ids of the store, "
                                 f"e.g. pca_images='[\"{self.rows[0].image_id}\", \"{self.rows[1].image_id}\"]'")
            return [by_id[w] for w in wanted]
        first = self.rows[0]
        other = next((r for r in self.rows[1:] if r.group != first.group), self.rows[1])
        return [first, other]

    def pca_layer(self, flags: dict[tuple[int, int], bool]) -> int:
        """Figure 4's layer: ``--param pca_layer``, else the one ``pick_pca_layer`` chooses."""
        layer = self.params["pca_layer"]
        return int(pick_pca_layer(flags, self.store.meta.layers, self.store.meta.heads) if layer is None else layer)

    def plot_pca(self, flags: dict[tuple[int, int], bool], path: Path) -> Path:
        """Figure 4 for ``pca_layer``: keys of two images, all heads jointly and per head."""
        from kvpipe.probes.plots import plot_key_pca

        meta = self.store.meta
        layer = self.pca_layer(flags)
        images = self.pca_rows
        keys, image_of, head_of, per_head = [], [], [], {}
        for h in meta.heads:
            feats = self.store.read("keys", layer, h, images=images)
            img = np.repeat(np.arange(len(feats)), np.diff(feats.offsets))
            per_head[h] = (*pca(feats.data), img)
            keys.append(feats.data)
            image_of.append(img)
            head_of.append(np.full(len(img), h))
        coords, ratio = pca(np.concatenate(keys))
        agnostic = [h for h in meta.heads if flags.get((layer, h))]
        title = (f"image keys of layer {layer}, {meta.model.name}: "
                 f"{images[0].image_id} vs {images[1].image_id}")
        path = plot_key_pca((coords, ratio, np.concatenate(image_of), np.concatenate(head_of)), per_head,
                            agnostic, [r.image_id for r in images], path, title)
        return Path(path)


def check_shared_layout(rows: list[ImageRow]) -> None:
    """The per-position estimator's precondition: every image's base view has one grid."""
    grids: dict[tuple[int, int], str] = {}
    for r in rows:
        seg = next((s for s in r.segment_list() if s["name"] == "base"), None)
        if seg is None:
            raise StoreError(f"image {r.image_id} has no 'base' token segment; the store is damaged "
                             f"(run kvpipe verify)")
        grids.setdefault((int(seg["rows"]), int(seg["cols"])), r.image_id)
    if len(grids) > 1:
        (a, ia), (b, ib) = list(grids.items())[:2]
        raise UsageError(f"input-agnostic: images have different token grids ({a[0]}x{a[1]} for {ia}, {b[0]}x{b[1]} "
                         f"for {ib}), so token positions do not line up across images; re-extract with "
                         f"kvpipe extract --image-size WxH (one input size), or pass --param estimator=pooled "
                         f"(all tokens pooled: also counts variation across positions)")


def pick_pca_layer(flags: dict[tuple[int, int], bool], layers: tuple[int, ...], heads: tuple[int, ...]) -> int:
    """The layer whose heads split most evenly into input-agnostic / -dependent (latest on ties);
    if no layer has both, the latest layer with the most input-agnostic heads."""
    def counts(layer: int) -> tuple[int, int]:
        n = sum(bool(flags.get((layer, h))) for h in heads)
        return n, len(heads) - n

    mixed = [l for l in layers if min(counts(l)) > 0]
    if mixed:
        return max(mixed, key=lambda l: (min(counts(l)), l))
    return max(layers, key=lambda l: (counts(l)[0], l))


def pca(x: np.ndarray, n_components: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``x`` projected on their first principal components, and each one's share of variance.

    numpy SVD of the centred data ``x - mean = U S Vt``: coordinates ``(x - mean) @ Vt[:k].T``,
    explained-variance ratio ``S[:k]**2 / sum(S**2)``. Signs are fixed so that each component's
    largest-magnitude loading is positive (deterministic across runs and machines).
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"pca needs a (n >= 2, d) array; got {x.shape}")
    xc = x - x.mean(axis=0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    k = min(n_components, vt.shape[0])
    vt = vt[:k]
    sign = np.sign(vt[np.arange(k), np.argmax(np.abs(vt), axis=1)])
    vt = vt * np.where(sign == 0, 1.0, sign)[:, None]
    total = float(np.sum(s ** 2))
    ratio = s[:k] ** 2 / total if total > 0 else np.zeros(k)
    return xc @ vt.T, ratio
