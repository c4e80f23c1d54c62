"""fg-seg: few-shot foreground segmentation with a linear classifier on token features (Pascal-5i).

Protocol (paper Section 3.1: "We train a linear classifier on top of each image value to perform
5-shot binary segmentation", Pascal-5i split 0; episodes and metrics as HSNet / PFENet):

* episodes come from the store's dataset.json (``structure()["episodes"]``: query, support
  ids, class); the first ``shots`` supports of each episode are used;
* training samples = the support images' base-grid tokens; target = share of the token's
  valid pixels that belong to the episode's class (labels through the annotation's "labels"
  map; 255 = ignore), sample weight = share of the token's pixels that are valid. This is
  per-pixel logistic loss on block-upsampled token scores, summed per token;
* classifier = L2-regularised logistic regression (C = 1, features centred and scaled per
  episode), solved exactly per episode, many episodes per batch (``probes/logistic.py``);
* the query's token probabilities are upsampled bilinearly to the mask resolution and
  thresholded at 0.5; foreground / background intersection and union per episode, 255 ignored;
* ``mIoU`` = mean over the fold's classes of (sum of intersections / sum of unions of that
  class's episodes); ``FB_IoU`` = mean of background and foreground IoU over all episodes
  (HSNet ``common/logger.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.device import batch_budget, uses_torch
from kvpipe.probes.logistic import fit_logistic, fit_logistic_torch
from kvpipe.probes.metrics.segmentation import FewShotIoU, binary_areas
from kvpipe.probes.predictions import MaskImages, MaskItem
from kvpipe.probes.tokens import IGNORE, bilinear_weights, base_grid_hw, label_ids, token_fractions, upsample_bilinear

BATCH_BYTES = 256 * 2**20  # padded support features per batch of episodes (float32)
# the Newton solver's float64 systems per batch: min(support tokens, dim + 1)^2 per episode
# (logistic.py solves in the smaller space), about three live at once (the system, its
# regularised copy, its Cholesky factor); 3,585-wide post-proj features of small images (few
# tokens, so many episodes under BATCH_BYTES) had reached 24 GB when every system was (dim + 1)^2
HESSIAN_BYTES = 2**30
HESSIAN_COPIES = 3


@dataclass
class Episode:
    query: str
    support: tuple[str, ...]
    class_id: int


@PROBES.register
class ForegroundSegmentation(Probe):
    description = "few-shot foreground segmentation: logistic regression on support tokens, mIoU (Pascal-5i)"
    primary_metric = "mIoU"
    rotation_invariant = True  # one L2-penalised logistic fit on centred features with one scale
    prediction_format = "masks"
    defaults = {"shots": 5, "C": 1.0, "threshold": 0.5, "max_iter": 50}
    version = 1

    def prepare(self) -> None:
        root = self.store.root
        episodes = self.store.structure().get("episodes") or []
        if not episodes:
            raise StoreError(f"store {root} has no episodes; fg-seg needs a dataset with few-shot episodes "
                             f"such as pascal5i or synthetic")
        shots = self.params["shots"]
        most = min(len(ep.get("support", [])) for ep in episodes)
        if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
            raise UsageError(f"--param shots={shots!r} must be an integer from 1 to {most}")
        if shots > most:
            raise UsageError(f"--param shots={shots} is more than the {most} support images per episode in "
                             f"store {root}; use shots <= {most}")
        for key, low, high in (("C", 0.0, float("inf")), ("threshold", 0.0, 1.0)):
            v = self.params[key]
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not low < float(v) < high:
                raise UsageError(f"--param {key}={v!r} must be a number in ({low:g}, {high:g})")
        if isinstance(self.params["max_iter"], bool) or not isinstance(self.params["max_iter"], int) \
                or self.params["max_iter"] < 1:
            raise UsageError(f"--param max_iter={self.params['max_iter']!r} must be an integer >= 1")
        rows = {r.image_id: r for r in self.store.images()}
        self.episodes: list[Episode] = []
        for ep in episodes:
            ids = (ep["query"], *ep["support"][:shots])
            if all(i in rows and rows[i].mask_offset >= 0 for i in ids):
                self.episodes.append(Episode(ep["query"], tuple(ep["support"][:shots]), int(ep["class"])))
        if not self.episodes:
            raise StoreError(f"store {root}: none of its {len(episodes)} episodes has all its images extracted "
                             f"with a mask; re-extract the failed images")
        needed = sorted({i for ep in self.episodes for i in (ep.query, *ep.support)}, key=lambda i: rows[i].index)
        self.rows = [rows[i] for i in needed]
        self.grids = {i: base_grid_hw(rows[i]) for i in needed}
        annotations = {i: self.store.annotation(rows[i]) for i in needed}
        # computed once: support targets (image, class) -> (fraction, weight) per token, and the
        # queries' ground truth (image, class) -> (foreground, valid) pixels
        self.support_labels = {}
        self.query_truth = {}
        for ep in self.episodes:
            for s in ep.support:
                if (s, ep.class_id) not in self.support_labels:
                    fg, valid = class_pixels(annotations[s], ep.class_id)
                    self.support_labels[(s, ep.class_id)] = token_fractions(fg, valid, self.grids[s])
            if (ep.query, ep.class_id) not in self.query_truth:
                self.query_truth[(ep.query, ep.class_id)] = class_pixels(annotations[ep.query], ep.class_id)

    def score(self, target: Target) -> dict[str, float]:
        acc = FewShotIoU()
        self._run(target, acc)
        return {"mIoU": acc.miou(), "FB_IoU": acc.fb_iou()}

    def predictions(self, target: Target) -> MaskImages:
        """Each episode's predicted query mask: the episode's class id on the foreground."""
        keep: dict[int, np.ndarray] = {}
        self._run(target, FewShotIoU(), keep)
        items = []
        for n, ep in enumerate(self.episodes):
            pred = keep[id(ep)]
            items.append(MaskItem(f"episode{n:04d}", ep.query, np.where(pred, ep.class_id, 0).astype(np.uint8),
                                  {"class": ep.class_id, "support": list(ep.support)}))
        return MaskImages(items)

    def _run(self, target: Target, acc: FewShotIoU, keep: dict[int, np.ndarray] | None = None) -> None:
        """Fit and score every episode into ``acc``; ``keep`` gets each episode's predicted mask."""
        feats = self.store.read(target.kind, target.layer, target.head, images=self.rows,
                                device=self.decode_on(), basis=self.read_basis())
        if uses_torch(self.device):
            self._run_torch(feats, acc, keep)
            return
        tokens = {r.image_id: feats.grid(i).reshape(-1, feats.data.shape[1]) for i, r in enumerate(feats.rows)}
        dim = feats.data.shape[1]
        sizes = np.array([sum(len(tokens[s]) for s in ep.support) for ep in self.episodes])
        for batch in batch_plan(sizes, dim):
            self._batch([self.episodes[j] for j in batch], tokens, dim, acc, keep)

    def _batch(self, episodes: list[Episode], tokens: dict[str, np.ndarray], dim: int, acc: FewShotIoU,
               keep: dict[int, np.ndarray] | None = None) -> None:
        n_max = max(sum(len(tokens[s]) for s in ep.support) for ep in episodes)
        x = np.zeros((len(episodes), n_max, dim), np.float32)
        y = np.zeros((len(episodes), n_max), np.float32)
        w = np.zeros((len(episodes), n_max), np.float32)
        for e, ep in enumerate(episodes):
            x_e = np.concatenate([tokens[s] for s in ep.support])
            fr = np.concatenate([self.support_labels[(s, ep.class_id)][0] for s in ep.support])
            wt = np.concatenate([self.support_labels[(s, ep.class_id)][1] for s in ep.support])
            x[e, : len(x_e)], y[e, : len(x_e)], w[e, : len(x_e)] = x_e, fr, wt
        models = fit_logistic(x, y, w, C=float(self.params["C"]), max_iter=int(self.params["max_iter"]))
        for e, ep in enumerate(episodes):
            logits = tokens[ep.query].astype(np.float64) @ models.coef[e].astype(np.float64) + models.bias[e]
            prob = 1.0 / (1.0 + np.exp(-np.clip(logits, -60, 60)))
            fg, valid = self.query_truth[(ep.query, ep.class_id)]
            up = upsample_bilinear(prob.reshape(self.grids[ep.query]), fg.shape)
            pred = up > float(self.params["threshold"])
            inter, union = binary_areas(pred, fg, valid)
            acc.add(ep.class_id, inter, union)
            if keep is not None:
                keep[id(ep)] = pred


    # ------------------------------------------------------------------ the torch path
    def _run_torch(self, feats, acc: FewShotIoU, keep: dict[int, np.ndarray] | None = None) -> None:
        """``_batch`` for every batch on ``self.device``, batched: the target's features go to the
        device once; each batch's padded supports and queries are gathered there with index tensors
        prepared once per sweep (with the support labels and the queries' ground truth), its
        queries' probabilities are upsampled and counted against the ground truth there, and the
        counts of every episode come back to the host together, once per target. Same batches,
        same solver and same float64 query scores as the reference, so the same scores."""
        import torch

        plan = self._device_plan(feats)
        T, dim = feats.data.shape
        buf = self._feature_buffer(T, dim)
        buf[:T].copy_(torch.as_tensor(feats.data, dtype=torch.float32))  # row T stays 0: padding
        threshold = float(self.params["threshold"])
        counts, order = [], []
        for b in plan["batches"][dim]:
            coef, bias, _ = fit_logistic_torch(buf[b["support"]], b["y"], b["w"], C=float(self.params["C"]),
                                               max_iter=int(self.params["max_iter"]))
            for ch in b["chunks"]:
                q = buf[ch["query"]].to(torch.float64)  # (B, h * w, D): padded grid cells read the zero row
                logits = torch.bmm(q, coef[ch["at"]].to(torch.float64)[..., None])[..., 0] \
                    + bias[ch["at"]].to(torch.float64)[:, None]
                prob = 1.0 / (1.0 + torch.exp(-logits.clamp(-60, 60)))
                # rows then columns, as upsample_bilinear; padded cells and pixels weigh 0
                up = torch.matmul(torch.matmul(ch["wy"], prob.view(len(ch["episodes"]), *ch["grid"])),
                                  ch["wx"].transpose(1, 2))
                pred = up > threshold
                code = plan["truth"][ch["pair"], : up.shape[1], : up.shape[2]]  # 0 void / pad, 1 bg, 2 fg
                counts.append(torch.stack([(pred & (code == 2)).sum((1, 2)), (pred & (code > 0)).sum((1, 2))], 1))
                order.extend(ch["episodes"])
                if keep is not None:
                    host = pred.cpu().numpy()
                    for k, j in enumerate(ch["episodes"]):
                        h, w = self.query_truth[self._pair(j)][0].shape
                        keep[id(self.episodes[j])] = host[k, :h, :w]
        got = torch.cat(counts).cpu().numpy().astype(np.float64)  # the one copy back: (episodes, 2)
        pairs = plan["pair_of"][order]
        add_counts(acc, np.array([self.episodes[j].class_id for j in order]), got[:, 0], got[:, 1],
                   plan["n_fg"][pairs], plan["n_valid"][pairs])

    def _pair(self, j: int) -> tuple[str, int]:
        return self.episodes[j].query, self.episodes[j].class_id

    def _feature_buffer(self, tokens: int, dim: int):
        """(tokens + 1, dim) float32 on the device, reused by every target of that shape; the last
        row is zeros (the padding that the index tensors point at)."""
        import torch

        bufs = self.__dict__.setdefault("_buffers", {})
        if (tokens, dim) not in bufs:
            bufs.clear()
            bufs[(tokens, dim)] = torch.zeros(tokens + 1, dim, dtype=torch.float32, device=self.device)
        return bufs[(tokens, dim)]

    def _device_plan(self, feats) -> dict:
        """What does not depend on the target, on the device, built at a sweep's first target
        (and per feature width): token positions, batches, labels, ground truth."""
        import torch

        plan = self.__dict__.get("_plan")
        if plan is None or not np.array_equal(plan["offsets"], feats.offsets):
            dev = self.device
            pos = {}
            for i, r in enumerate(feats.rows):  # positions of each image's base-grid tokens in feats.data
                seg = next(s for s in r.segment_list() if s["name"] == "base")
                width = seg["cols"] + int(seg["newline"])
                start = int(feats.offsets[i]) + seg["offset"]
                pos[r.image_id] = start + np.arange(seg["rows"])[:, None] * width + np.arange(seg["cols"])[None, :]
            pairs = sorted({self._pair(j) for j in range(len(self.episodes))})
            pair_id = {p: k for k, p in enumerate(pairs)}
            hw = np.array([self.query_truth[p][0].shape for p in pairs]).reshape(-1, 2)
            truth = np.zeros((len(pairs), *hw.max(0)), np.uint8)
            n_fg, n_valid = np.zeros(len(pairs)), np.zeros(len(pairs))
            for k, p in enumerate(pairs):
                fg, valid = self.query_truth[p]
                truth[k, : fg.shape[0], : fg.shape[1]] = valid * (1 + (fg & valid))
                n_fg[k], n_valid[k] = np.count_nonzero(fg & valid), np.count_nonzero(valid)
            plan = {"offsets": feats.offsets.copy(), "tokens": int(feats.offsets[-1]), "pos": pos,
                    "pair_of": np.array([pair_id[self._pair(j)] for j in range(len(self.episodes))]),
                    "n_fg": n_fg, "n_valid": n_valid, "truth": torch.from_numpy(truth).to(dev), "batches": {}}
            self._plan = plan
        dim = feats.data.shape[1]
        if dim not in plan["batches"]:
            plan["batches"][dim] = [self._device_batch(plan, batch, dim) for batch in
                                    batch_plan(np.array([sum(plan["pos"][s].size for s in ep.support)
                                                         for ep in self.episodes]), dim)]
        return plan

    def _device_batch(self, plan: dict, batch: list[int], dim: int) -> dict:
        """One batch's index tensors and labels (as ``_batch`` pads them), and its queries in
        chunks of similar mask sizes under the device's batch budget."""
        import torch

        dev, pad = self.device, plan["tokens"]
        n_max = max(sum(plan["pos"][s].size for s in self.episodes[j].support) for j in batch)
        support = np.full((len(batch), n_max), pad, np.int64)
        y = np.zeros((len(batch), n_max), np.float32)
        w = np.zeros((len(batch), n_max), np.float32)
        for e, j in enumerate(batch):
            ep = self.episodes[j]
            idx = np.concatenate([plan["pos"][s].ravel() for s in ep.support])
            support[e, : len(idx)] = idx
            y[e, : len(idx)] = np.concatenate([self.support_labels[(s, ep.class_id)][0] for s in ep.support])
            w[e, : len(idx)] = np.concatenate([self.support_labels[(s, ep.class_id)][1] for s in ep.support])
        shape = {e: (*self.query_truth[self._pair(j)][0].shape, *self.grids[self.episodes[j].query])
                 for e, j in enumerate(batch)}
        at = sorted(range(len(batch)), key=lambda e: shape[e])
        budget = batch_budget(dev) // 2
        chunks, group = [], []
        for e in at + [None]:
            if group and (e is None or (len(group) + 1) * chunk_bytes([shape[g] for g in group + [e]], dim) > budget):
                chunks.append(self._chunk(plan, [batch[g] for g in group], group, dim))
                group = []
            if e is not None:
                group.append(e)
        return {"support": torch.from_numpy(support).to(dev), "y": torch.from_numpy(y).to(dev),
                "w": torch.from_numpy(w).to(dev), "chunks": chunks}

    def _chunk(self, plan: dict, episodes: list[int], at: list[int], dim: int) -> dict:
        import torch

        dev, pad = self.device, plan["tokens"]
        shapes = np.array([(*self.query_truth[self._pair(j)][0].shape, *self.grids[self.episodes[j].query])
                           for j in episodes])
        big_h, big_w, h, w = (int(v) for v in shapes.max(0))
        query = np.full((len(episodes), h, w), pad, np.int64)
        wy = np.zeros((len(episodes), big_h, h))
        wx = np.zeros((len(episodes), big_w, w))
        for e, (j, (mh, mw, gh, gw)) in enumerate(zip(episodes, shapes)):
            query[e, :gh, :gw] = plan["pos"][self.episodes[j].query]
            wy[e, :mh, :gh] = bilinear_weights(int(gh), int(mh))
            wx[e, :mw, :gw] = bilinear_weights(int(gw), int(mw))
        return {"episodes": episodes, "at": torch.tensor(at, device=dev), "grid": (h, w),
                "query": torch.from_numpy(query.reshape(len(episodes), -1)).to(dev),
                "wy": torch.from_numpy(wy).to(dev), "wx": torch.from_numpy(wx).to(dev),
                "pair": torch.from_numpy(plan["pair_of"][episodes]).to(dev)}


def batch_plan(sizes: np.ndarray, dim: int) -> list[list[int]]:
    """Episode indices in batches of similar support sizes (less padding), each under
    BATCH_BYTES of padded float32 support features and HESSIAN_BYTES of the solver's systems;
    ascending: the newest episode is the largest."""
    out: list[list[int]] = []
    batch: list[int] = []
    for j in np.argsort(sizes, kind="stable"):
        n = int(sizes[j])
        if batch and ((len(batch) + 1) * n * (dim + 1) * 4 > BATCH_BYTES
                      or (len(batch) + 1) * HESSIAN_COPIES * min(n, dim + 1) ** 2 * 8 > HESSIAN_BYTES):
            out.append(batch)
            batch = []
        batch.append(int(j))
    if batch:
        out.append(batch)
    return out


def chunk_bytes(shapes: list[tuple[int, int, int, int]], dim: int) -> int:
    """Device bytes per query of a chunk padded to its largest (mask h, mask w, grid h, grid w):
    float64 upsampled scores and the masks compared with them, float64 query features."""
    big_h, big_w, h, w = np.array(shapes).max(0)
    return int(big_h) * int(big_w) * (8 + 4) + int(h) * int(w) * (dim + 2) * 8


def add_counts(acc: FewShotIoU, classes: np.ndarray, inter_fg: np.ndarray, predicted: np.ndarray,
               n_fg: np.ndarray, n_valid: np.ndarray) -> None:
    """Episodes' [bg, fg] intersections and unions into ``acc``, as ``binary_areas`` makes them
    from the foreground pixels both predicted and true (``inter_fg``), predicted (``predicted``),
    true (``n_fg``) and valid (``n_valid``), all over the valid pixels; per class at once (sums
    of whole numbers: exact in any order)."""
    union_fg = predicted + n_fg - inter_fg
    inter = np.stack([n_valid - union_fg, inter_fg], 1)
    union = np.stack([n_valid - inter_fg, union_fg], 1)
    for c in np.unique(classes):
        acc.add(int(c), inter[classes == c].sum(0), union[classes == c].sum(0))


def class_pixels(annotation, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(pixels of ``class_id``, valid pixels) of an annotation; 255 is not valid."""
    mask = annotation.mask
    return np.isin(mask, label_ids(annotation.meta, class_id)), mask != IGNORE
