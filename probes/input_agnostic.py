"""input-agnostic: per (layer, head) L2 variance of image keys across images (paper A.6).

Keys whose variance across images is low barely depend on the input. The per-head variances
form a bimodal distribution; the threshold is the valley between the two modes (the paper
reads 450 off its histogram), or the user's ``threshold``. Outputs: variance per head, a
0/1 input-agnostic flag per head, the threshold, a histogram (Figure 14) and a heatmap
(Figure 15).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from kvpipe.errors import StoreError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.variance import bimodal_threshold, l2_variance, l2_variance_pooled


@PROBES.register("input-agnostic")
class InputAgnostic(Probe):
    name = "input-agnostic"
    description = "L2 variance of image keys across images per head; bimodal threshold"
    kinds = ("keys",)
    baseline = False
    primary_metric = "l2_variance"
    defaults = {"max_images": 1000, "threshold": None}

    def prepare(self) -> None:
        rows = self.store.images()[: int(self.params["max_images"])]
        if len(rows) < 2:
            raise StoreError(f"store {self.store.root} has {len(rows)} usable image(s); input-agnostic "
                             f"needs at least 2 to measure variance across images")
        if "keys" not in self.store.meta.kinds:
            raise StoreError(f"store {self.store.root} has no keys; re-extract with --kinds keys")
        self.rows = rows
        # Per-position variance needs every image to have the same token layout.
        self.same_layout = len({r.segments for r in rows}) == 1

    def score(self, target: Target) -> dict[str, float]:
        feats = self.store.read("keys", target.layer, target.head, images=self.rows)
        if self.same_layout:
            stacked = feats.data.reshape(len(feats), -1, feats.data.shape[-1])
            return {"l2_variance": l2_variance(stacked)}
        return {"l2_variance": l2_variance_pooled([feats.image(i) for i in range(len(feats))])}

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        from kvpipe.probes.plots import plot_variance_heatmap, plot_variance_histogram
        from kvpipe.probes.runner import layer_head_matrix
        import pyarrow as pa

        values = np.array([r["value"] for r in rows if r["metric"] == "l2_variance"])
        if self.params["threshold"] is not None:
            threshold, method = float(self.params["threshold"]), "user"
        else:
            th = bimodal_threshold(values)
            threshold, method = th.value, th.method
        extra = [{"layer": r["layer"], "head": r["head"], "kind": "keys", "metric": "input_agnostic",
                  "value": float(r["value"] < threshold)} for r in rows if r["metric"] == "l2_variance"]
        extra.append({"layer": -1, "head": -1, "kind": "keys", "metric": f"threshold_{method}",
                      "value": threshold})
        meta = self.store.meta
        matrix = layer_head_matrix(pa.Table.from_pylist(rows), "l2_variance", "keys", meta.layers, meta.heads)
        title = f"{meta.model.get('name')} on {meta.dataset.get('name')} ({len(self.rows)} images)"
        plots = [Path(plot_variance_histogram(values, threshold, out_dir / "input-agnostic-histogram.png", title)),
                 Path(plot_variance_heatmap(matrix, threshold, out_dir / "input-agnostic-heatmap.png", title))]
        return extra, plots
