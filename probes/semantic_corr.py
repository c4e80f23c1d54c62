"""semantic-corr: keypoint transfer by nearest token between two images, PCK (SPair-71k protocol).

The paper (Section 3.1): "We find nearest neighbors between images for each image value
corresponding to a keypoint." For every annotated pair (dataset.json "pairs"):

1. each source keypoint (original-image pixels) selects the token of the source image's base
   grid that contains it;
2. its nearest neighbour among all base-grid tokens of the target image, by cosine similarity
   (L2-normalised features, inner product), as DIFT ``eval_spair.py`` (``F.normalize`` + ``mm``)
   and Amir et al.'s / SD-DINO's ``chunk_cosine_sim`` do;
3. the prediction is that target token's centre, in the target's original pixels;
4. it is correct when its distance to the annotated target keypoint is at most
   ``alpha * max(bbox_w, bbox_h)`` of the target object's box -- the SPair-71k convention of the
   DHPF/CATs evaluators (``get_pckthres`` "bbox" on ``trg_bbox``, ``torch.le``) and DIFT
   (``dist / threshold <= 0.1``), alpha = 0.1.

Metrics: ``pck``, correct keypoints / all keypoints of all pairs (DIFT's "per point" PCK);
``pck_per_image``, the mean over pairs of each pair's PCK (DIFT's "per image" PCK, the
DHPF/CATs average). Summary rows: ``n_pairs``, ``n_keypoints``, ``n_pairs_skipped`` and
``pck_token_ceiling``, the PCK of predicting the centre of each target keypoint's own token --
the most any features can reach at this token resolution (small images with coarse grids cap
it well below 1).

Pixel convention: integer coordinates are pixel centres (SPair keypoints index pixels, as
``ft[..., y, x]`` in DIFT), so the image spans [-0.5, W - 0.5] and token j of a grid of
``n`` tokens over ``W`` pixels spans [j*s - 0.5, (j+1)*s - 0.5], s = W / n: a keypoint x falls in
token floor((x + 0.5) / s) and token j's centre is (j + 0.5) * s - 0.5 (SD-DINO's
``(nn_x_patch - 1) * stride + stride + patch_size // 2 - .5`` for stride = patch). The base
grid is assumed to cover the whole image (resized, not padded), as for Qwen2-VL/2.5-VL and
the LLaVA-OneVision / NeXT base view.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import batch_budget, uses_torch, with_smaller_batches
from kvpipe.probes.neighbours import BACKENDS, l2_normalise, nearest_in_groups, nearest_in_groups_torch, resolve_backend
from kvpipe.probes.predictions import POINT_COLUMNS, PointMatches
from kvpipe.store.manifest import ImageRow


# ------------------------------------------------------------------------------ geometry
def pixel_to_token(xy: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """(K, 2) pixel coordinates (x, y) -> (K, 2) token (row, col) of the grid over the image."""
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    (h, w), (gh, gw) = image_hw, grid_hw
    col = np.floor((xy[:, 0] + 0.5) * gw / w).astype(np.int64)
    row = np.floor((xy[:, 1] + 0.5) * gh / h).astype(np.int64)
    return np.stack([np.clip(row, 0, gh - 1), np.clip(col, 0, gw - 1)], axis=1)


def token_centre(rc: np.ndarray, image_hw: tuple[int, int], grid_hw: tuple[int, int]) -> np.ndarray:
    """(K, 2) token (row, col) -> (K, 2) pixel coordinates (x, y) of the token's centre."""
    rc = np.asarray(rc, dtype=np.float64).reshape(-1, 2)
    (h, w), (gh, gw) = image_hw, grid_hw
    return np.stack([(rc[:, 1] + 0.5) * w / gw - 0.5, (rc[:, 0] + 0.5) * h / gh - 0.5], axis=1)


def bbox_threshold(bbox: Any) -> float:
    """max(width, height) of an [x0, y0, x1, y1] box, as SPair-71k evaluators compute it."""
    x0, y0, x1, y1 = (float(v) for v in bbox)
    return max(x1 - x0, y1 - y0)


def correct_keypoints(pred_xy: np.ndarray, gt_xy: np.ndarray, threshold: np.ndarray, alpha: float) -> np.ndarray:
    """True where ||pred - gt|| <= alpha * threshold (per keypoint)."""
    dist = np.linalg.norm(np.asarray(pred_xy, np.float64) - np.asarray(gt_xy, np.float64), axis=-1)
    return dist <= alpha * np.asarray(threshold, np.float64)


def pck_scores(correct: np.ndarray, pair_of_keypoint: np.ndarray, n_pairs: int) -> dict[str, float]:
    """``pck`` over all keypoints and ``pck_per_image`` = mean over pairs of their own PCK."""
    correct = np.asarray(correct, dtype=np.float64)
    if correct.size == 0:
        return {"pck": float("nan"), "pck_per_image": float("nan")}
    counts = np.bincount(pair_of_keypoint, minlength=n_pairs)
    hits = np.bincount(pair_of_keypoint, weights=correct, minlength=n_pairs)
    has = counts > 0
    return {"pck": float(correct.mean()), "pck_per_image": float(np.mean(hits[has] / counts[has]))}


def base_segment(row: ImageRow) -> dict[str, Any]:
    seg = next((s for s in row.segment_list() if s["name"] == "base"), None)
    if seg is None:
        raise StoreError(f"image {row.image_id} has no 'base' token segment; the store is damaged")
    return seg


# ---------------------------------------------------------------------------------- probe
@PROBES.register
class SemanticCorrespondence(Probe):
    description = "keypoint transfer by nearest token (cosine), PCK@alpha of the target bbox (SPair-71k)"
    primary_metric = "pck"
    rotation_invariant = True  # cosine nearest neighbours
    prediction_format = "points"
    # search: the nearest-neighbour backend (probes/neighbours.py); every backend is exact
    defaults = {"alpha": 0.1, "search": "auto"}
    version = 2  # 2: pck_token_ceiling summary row

    def prepare(self) -> None:
        pairs = self.store.structure().get("pairs") or []
        if not pairs:
            raise StoreError(f"store {self.store.root} has no keypoint pairs (dataset.json \"pairs\"); "
                             f"semantic-corr needs a dataset with pairs such as spair")
        alpha = self.params["alpha"]
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
            raise UsageError(f"semantic-corr parameter alpha must be a positive number, not {alpha!r}")
        if self.params["search"] not in BACKENDS:
            raise UsageError(f"--param search={self.params['search']!r}: use one of {', '.join(BACKENDS)}")
        by_id = {r.image_id: r for r in self.store.images()}
        usable: list[tuple[ImageRow, ImageRow, np.ndarray, np.ndarray, float]] = []
        self.skipped_pairs = 0
        self.pair_keypoints: list[tuple[int, np.ndarray]] = []
        for n, p in enumerate(pairs):
            try:
                src_id, tgt_id = p["source"], p["target"]
                src_kps = np.array(p["source_kps"], dtype=np.float64).reshape(-1, 2)
                tgt_kps = np.array(p["target_kps"], dtype=np.float64).reshape(-1, 2)
                thr = bbox_threshold(p["target_bbox"])
            except (KeyError, TypeError, ValueError) as err:
                raise StoreError(f"pair {n} of {self.store.root}/dataset.json is malformed ({err!r}); "
                                 f"expected source, target, source_kps, target_kps, target_bbox") from None
            if src_kps.shape != tgt_kps.shape:
                raise StoreError(f"pair {n} ({src_id} -> {tgt_id}) has {len(src_kps)} source but "
                                 f"{len(tgt_kps)} target keypoints")
            keep = np.isfinite(src_kps).all(1) & np.isfinite(tgt_kps).all(1)
            if src_id not in by_id or tgt_id not in by_id or not keep.any() or not thr > 0:
                self.skipped_pairs += 1  # an image not extracted (failed / --limit), or nothing to score
                continue
            usable.append((by_id[src_id], by_id[tgt_id], src_kps[keep], tgt_kps[keep], thr))
            self.pair_keypoints.append((n, np.flatnonzero(keep)))  # dataset.json pair, keypoints kept
        if not usable:
            raise StoreError(f"none of the {len(pairs)} keypoint pairs of {self.store.root} has both images "
                             f"in the store; re-extract without --limit")
        self._index(usable)

    def _index(self, usable: list[tuple[ImageRow, ImageRow, np.ndarray, np.ndarray, float]]) -> None:
        """Precompute token indices, target candidates and thresholds (all independent of the target)."""
        images = sorted({r.index: r for s, t, *_ in usable for r in (s, t)}.values(), key=lambda r: r.index)
        offset, start = {}, 0
        for r in images:  # the layout of store.read(images=self.images).data
            offset[r.index] = start
            start += r.n_tokens
        self.images = images
        targets: dict[int, int] = {}  # image index -> group number
        cand_tokens, cand_xy, group_start = [], [], [0]
        q_tokens, q_group, gt, thr, kp_pair = [], [], [], [], []
        for n, (src, tgt, s_kps, t_kps, th) in enumerate(usable):
            seg = base_segment(src)
            rc = pixel_to_token(s_kps, (src.image_h, src.image_w), (seg["rows"], seg["cols"]))
            q_tokens.append(offset[src.index] + seg["offset"] + rc[:, 0] * (seg["cols"] + int(seg["newline"])) + rc[:, 1])
            if tgt.index not in targets:
                targets[tgt.index] = len(targets)
                tseg = base_segment(tgt)
                grid = np.stack(np.meshgrid(np.arange(tseg["rows"]), np.arange(tseg["cols"]), indexing="ij"), -1)
                grid = grid.reshape(-1, 2)
                width = tseg["cols"] + int(tseg["newline"])
                cand_tokens.append(offset[tgt.index] + tseg["offset"] + grid[:, 0] * width + grid[:, 1])
                cand_xy.append(token_centre(grid, (tgt.image_h, tgt.image_w), (tseg["rows"], tseg["cols"])))
                group_start.append(group_start[-1] + len(grid))
            q_group.append(np.full(len(s_kps), targets[tgt.index]))
            gt.append(t_kps)
            thr.append(np.full(len(s_kps), th))
            kp_pair.append(np.full(len(s_kps), n))
        # the best any features can do on these grids: the centre of the target keypoint's own token
        ceiling = []
        for src, tgt, s_kps, t_kps, th in usable:
            tseg = base_segment(tgt)
            hw, grid = (tgt.image_h, tgt.image_w), (tseg["rows"], tseg["cols"])
            ceiling.append(correct_keypoints(token_centre(pixel_to_token(t_kps, hw, grid), hw, grid), t_kps,
                                             np.full(len(t_kps), th), self.params["alpha"]))
        self.ceiling = float(np.concatenate(ceiling).mean())
        self.query_tokens = np.concatenate(q_tokens)
        self.query_group = np.concatenate(q_group)
        self.candidate_tokens = np.concatenate(cand_tokens)
        self.candidate_xy = np.concatenate(cand_xy)
        self.group_start = np.array(group_start)
        self.gt_xy = np.concatenate(gt)
        self.source_xy = np.concatenate([s_kps for _, _, s_kps, _, _ in usable])
        self.pair_images = [(src, tgt) for src, tgt, *_ in usable]
        self.threshold = np.concatenate(thr)
        self.keypoint_pair = np.concatenate(kp_pair)
        self.n_pairs = len(usable)

    def predict(self, data: np.ndarray) -> np.ndarray:
        """Predicted target pixel (x, y) of every keypoint, from features ``data`` laid out as read."""
        if self._search_on_device():
            best = self._nearest_torch(data)
        else:
            queries = l2_normalise(data[self.query_tokens])
            cands = l2_normalise(data[self.candidate_tokens])
            bases = [cands[a:b] for a, b in zip(self.group_start[:-1], self.group_start[1:])]
            best, _ = nearest_in_groups(queries, self.query_group, bases, backend=self.params["search"])
        return self.candidate_xy[self.group_start[self.query_group] + best]

    def _search_on_device(self) -> bool:
        """search=torch, or search=auto on a GPU without faiss-gpu: gather, normalise and search in
        torch on the probe's device. On the CPU, auto keeps faiss / numpy (faster there)."""
        search = self.params["search"]
        if not uses_torch(self.device) or search not in ("auto", "torch"):
            return False
        return search == "torch" or (self.device.startswith("cuda") and resolve_backend("auto") != "faiss-gpu")

    def _nearest_torch(self, data: np.ndarray) -> np.ndarray:
        import torch

        def run(budget: int) -> np.ndarray:
            x = torch.as_tensor(data, dtype=torch.float32, device=self.device)
            idx = {k: torch.from_numpy(v).to(self.device) for k, v in
                   (("q", self.query_tokens), ("c", self.candidate_tokens))}
            normalise = torch.nn.functional.normalize
            queries, cands = normalise(x[idx["q"]], dim=-1, eps=1e-12), normalise(x[idx["c"]], dim=-1, eps=1e-12)
            del x
            return nearest_in_groups_torch(queries, self.query_group, cands, self.group_start, budget)[0]

        return with_smaller_batches(run, batch_budget(self.device) // 4, self.device, "semantic-corr's search")

    def read(self, target: Target) -> np.ndarray:
        feats = self.store.read(target.kind, target.layer, target.head, images=self.images,
                                device=self.decode_on() if self._search_on_device() else None,
                                basis=self.read_basis())
        if len(feats) != len(self.images):
            raise StoreError(f"store {self.store.root} returned {len(feats)} of {len(self.images)} images; "
                             f"run kvpipe verify")
        return feats.data

    def predictions(self, target: Target) -> PointMatches:
        """Every keypoint's transfer: pair (its index in dataset.json), images, keypoint index,
        source, predicted and ground-truth pixels, threshold and whether it is correct."""
        pred = self.predict(self.read(target))
        correct = correct_keypoints(pred, self.gt_xy, self.threshold, self.params["alpha"])
        pair = np.array([n for n, _ in self.pair_keypoints])[self.keypoint_pair]
        images = [(s.image_id, t.image_id) for s, t in self.pair_images]
        cols = {"pair": pair, "source": [images[i][0] for i in self.keypoint_pair],
                "target": [images[i][1] for i in self.keypoint_pair],
                "keypoint": np.concatenate([k for _, k in self.pair_keypoints]),
                "source_x": self.source_xy[:, 0], "source_y": self.source_xy[:, 1], "pred_x": pred[:, 0],
                "pred_y": pred[:, 1], "gt_x": self.gt_xy[:, 0], "gt_y": self.gt_xy[:, 1],
                "threshold": self.params["alpha"] * self.threshold, "correct": correct}
        return PointMatches(pa.table({k: cols[k] for k in POINT_COLUMNS}))

    def compute(self, target: Target, data: np.ndarray) -> dict[str, float]:
        correct = correct_keypoints(self.predict(data), self.gt_xy, self.threshold, self.params["alpha"])
        return pck_scores(correct, self.keypoint_pair, self.n_pairs)

    def summarize(self, rows: list[dict[str, Any]], out_dir: Path) -> tuple[list[dict[str, Any]], list[Path]]:
        counts = {"n_pairs": self.n_pairs, "n_keypoints": len(self.gt_xy), "n_pairs_skipped": self.skipped_pairs,
                  "pck_token_ceiling": self.ceiling}
        return [{"layer": -1, "head": -1, "kind": "dataset", "metric": k, "value": float(v)}
                for k, v in counts.items()], []


def chance_pck(candidate_xy: np.ndarray, gt_xy: np.ndarray, threshold: float, alpha: float) -> float:
    """Expected PCK of one keypoint when the predicted token is uniform over the candidates."""
    d = np.linalg.norm(np.asarray(candidate_xy, np.float64) - np.asarray(gt_xy, np.float64), axis=-1)
    return float(np.mean(d <= alpha * threshold)) if len(d) else math.nan
