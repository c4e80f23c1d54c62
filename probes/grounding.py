"""Text-grounded segmentation shared by semantic-seg and refexp-seg.

Paper Section 3.1: the text (class name / referring expression) goes through the MLM on its
own; its final token's value (key, for the keys kind) at the same (layer, head) is the query,
and "image values with highest dot product with this text token" are the segmented region.

How "highest" becomes a mask (the paper gives no rule; this one is fixed, documented and a
parameter): per image and query, the dot products over the image's base-grid tokens are
min-max normalised to [0, 1]; the normalised maps are upsampled bilinearly to the mask and a
pixel belongs to a query when its normalised score is above ``threshold`` (0.5: the upper half
of the image's score range) and, among several queries of one image (semantic-seg's classes),
to the one scoring highest. Min-max normalisation per image is the usual way to turn
unnormalised localisation maps into masks with one threshold (CAM-style evaluation); it makes
the rule independent of the feature scale, which differs by orders of magnitude across layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes.base import Probe, Target
from kvpipe.probes.device import batch_budget, with_smaller_batches
from kvpipe.probes.tokens import IGNORE, bilinear_weights, base_grid_hw, upsample_bilinear


def require_text(store, task: str, example: str) -> list[str]:
    """The store's text queries, or a one-line StoreError naming what the task needs."""
    queries = store.text_queries()
    if not queries:
        raise StoreError(f"store {store.root} has no text queries; {task} needs a dataset whose text queries "
                         f"are extracted, such as {example}")
    return queries


def check_threshold(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= float(value) < 1:
        raise UsageError(f"--param threshold={value!r} must be a number in [0, 1)")
    return float(value)


def normalised_scores(tokens: np.ndarray, queries: np.ndarray) -> np.ndarray:
    """(N, D) image tokens x (Q, D) query features -> (N, Q) dot products, min-max normalised per
    query over the image's tokens (a constant map becomes 0: nothing stands out)."""
    s = tokens.astype(np.float64) @ queries.astype(np.float64).T
    lo, hi = s.min(axis=0), s.max(axis=0)
    span = hi - lo
    return np.divide(s - lo, span, out=np.zeros_like(s), where=span > 0)


def upsampled_scores(tokens: np.ndarray, queries: np.ndarray, grid_hw: tuple[int, int],
                     out_hw: tuple[int, int]) -> np.ndarray:
    """Normalised scores of every query, upsampled bilinearly to ``out_hw``: (H, W, Q)."""
    norm = normalised_scores(tokens, queries).reshape(int(grid_hw[0]), int(grid_hw[1]), -1)
    return upsample_bilinear(norm, out_hw)


class TextGroundedProbe(Probe):
    """Base of semantic-seg and refexp-seg: a threshold on normalised scores, query indices
    checked against the store's text queries, and each image's scores of its queries.

    A kind is scored when the text queries have features of it too (``store.text_kinds()``):
    an MLM's keys and values; post_proj, the image tokens as they enter the LM against each
    query's final-token input-embedding row (Table 1's post-proj baseline); for SigLIP,
    post_proj is the per-patch embedding in its image-text space against its text tower's
    embedding. A store made before text queries had post_proj skips that kind with a note."""

    kinds = ("keys", "values")  # an encoder's block outputs (hidden) have no text counterpart
    baseline = True
    needs_text = True
    primary_metric = "mIoU"
    rotation_invariant = True  # dot products with text queries rotated alike
    defaults = {"threshold": 0.5}
    example: ClassVar[str] = ""  # datasets with the text queries this probe needs, for errors

    def check_query_indices(self, indices: Iterable[int], what: str) -> None:
        """Every index must name one of the store's text queries (else the store is damaged)."""
        n_queries = len(require_text(self.store, self.name, self.example))
        bad = [q for q in indices if not 0 <= q < n_queries]
        if bad:
            raise StoreError(f"store {self.store.root}: {what} index {bad[0]} is outside its {n_queries} "
                             f"text queries; the store is damaged (re-extract it)")

    def targets(self) -> list[Target]:
        """The swept targets whose kind the text queries have (``skipped`` says which are left out)."""
        text = self.store.text_kinds()
        return [t for t in super().targets() if t.kind in text]

    def skipped(self) -> list[str]:
        text = self.store.text_kinds()
        missing = [k for k in (*self.kinds, "post_proj") if k in self.store.meta.kinds and k not in text
                   and self.selection.has_kind(k)]
        return [f"{k}: the store's text queries have no {k} features (a store made before text queries stored "
                f"them); re-extract the store to score it" for k in missing]

    def read(self, target: Target) -> tuple[np.ndarray, Any]:
        """The text queries' and ``self.rows``' features of ``target``."""
        basis = self.read_basis()
        if target.kind == "post_proj":
            return (self.store.text("post_proj", basis=basis),
                    self.store.read("post_proj", images=self.rows, basis=basis))
        return (self.store.text(target.kind, target.layer, target.head, basis=basis),
                self.store.read(target.kind, target.layer, target.head, images=self.rows, basis=basis))

    def image_scores(self, target: Target, data: tuple[np.ndarray, Any] | None = None) -> Callable[..., np.ndarray]:
        """Scores of ``target`` (``read(target)``'s result, read here when not given) as a function:
        scores(row, query indices, out_hw) -> (H, W, Q) normalised, upsampled scores of those text
        queries on that image (the reference code; a torch device takes ``device_results``)."""
        text, feats = data if data is not None else self.read(target)
        index = {r.image_id: i for i, r in enumerate(feats.rows)}

        def scores(row, queries: list[int], out_hw: tuple[int, int]) -> np.ndarray:
            grid = feats.grid(index[row.image_id])
            return upsampled_scores(grid.reshape(-1, grid.shape[-1]), text[queries], grid.shape[:2], out_hw)

        return scores

    def grounded(self) -> list["Grounded"]:
        """The images ``device_results`` scores, in the order of its results (subclasses)."""
        raise NotImplementedError

    def device_results(self, target: Target, data: tuple[np.ndarray, Any] | None, rule: str,
                       keep_maps: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
        """Per image of ``grounded()``, its counts and (``keep_maps``) its predicted maps, computed on
        the torch device many images at a time (``grounded_torch``); a batch that runs out of GPU
        memory is retried in smaller ones."""
        text, feats = data if data is not None else self.read(target)
        items = self.grounded()
        return with_smaller_batches(
            lambda budget: grounded_torch(feats, text, items, rule, self.threshold, self.device, budget, keep_maps),
            batch_budget(self.device), self.device, f"{self.name} at {target.kind} {target.layer}:{target.head}")


# ------------------------------------------------------------------ the batched device path
@dataclass(frozen=True)
class Grounded:
    """One image of the batched device path: its row, the text queries scored on it, its ground
    truth (uint8, 255 = ignore) and, per query, the mask label of the object it refers to
    (refexp-seg; empty for semantic-seg, whose truth is the map of local classes 0..Q)."""

    row: Any
    queries: tuple[int, ...]
    truth: np.ndarray
    labels: tuple[int, ...] = ()


# Device bytes per pixel and query (the float64 scores, boolean masks) and per pixel (best
# score, its index, the prediction, the confusion index): what sizes a batch.
BYTES_PER_MAP_PIXEL = 16
BYTES_PER_PIXEL = 64


def item_bytes(grid_hw: tuple[int, int], n_queries: int, mask_hw: tuple[int, int], dim: int) -> int:
    """Device bytes one image of a batch padded to these sizes takes."""
    (gh, gw), (h, w) = grid_hw, mask_hw
    return (h * w * (n_queries * BYTES_PER_MAP_PIXEL + BYTES_PER_PIXEL) + gh * gw * (12 * dim + 32 * n_queries)
            + 8 * n_queries * h * gw + 8 * (h * gh + w * gw))


def plan_batches(items: list[Grounded], dim: int, budget: int) -> list[list[int]]:
    """Indices of ``items`` in batches whose padded size fits ``budget`` bytes (at least one image
    each): sorted by grid, number of queries and mask size, so that padding stays small."""
    def shape(i: int) -> tuple[int, int, int, int, int]:
        it = items[i]
        return (*base_grid_hw(it.row), len(it.queries), *it.truth.shape)

    batches: list[list[int]] = []
    current: list[int] = []
    top = (0, 0, 0, 0, 0)
    for i in sorted(range(len(items)), key=shape):
        grown = tuple(max(a, b) for a, b in zip(top, shape(i)))
        if current and (len(current) + 1) * item_bytes(grown[:2], grown[2], grown[3:], dim) > budget:
            batches.append(current)
            current, grown = [], shape(i)
        current.append(i)
        top = grown
    if current:
        batches.append(current)
    return batches


def grounded_torch(feats: Any, text: np.ndarray, items: list[Grounded], rule: str, threshold: float,
                   device: str, budget: int, keep_maps: bool = False) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """The reference's scores, masks and counts for many images per call, on a torch device.

    Per batch (images padded to its largest grid, query count and mask): one upload of its
    tokens, queries' indices, interpolation matrices and ground truth; on the device the float64
    products, the per-query min-max over each image's own tokens, the bilinear upsampling as two
    products with the reference's matrices (``tokens.upsample_bilinear``: PyTorch's
    ``align_corners=False`` weights; padded rows and columns weigh 0), the threshold and then
    ``rule``'s counts:

    * "classes" (semantic-seg): a pixel takes 1 + the index of its best query when that score is
      above ``threshold``, else 0; counts = the (n, n) confusion of truth and prediction over
      non-ignored pixels, n = 1 + the batch's most queries (an image's own block is its first
      1 + Q rows and columns); maps = the (H, W) uint8 prediction;
    * "objects" (refexp-seg): per query, intersection and union of its mask (score above
      ``threshold``, on valid pixels) with its object (truth == label): counts (Q, 2); maps =
      the (Q, H, W) boolean masks.

    Nothing returns to the host until every batch is queued, except the maps (``keep_maps``,
    one transfer per batch). Results are in the order of ``items``."""
    import torch

    if rule not in ("classes", "objects"):
        raise ValueError(f"rule {rule!r} is not 'classes' or 'objects'")
    cuda = str(device).startswith("cuda")
    index = {r.image_id: i for i, r in enumerate(feats.rows)}
    dim = int(feats.data.shape[-1])
    queries_all = torch.from_numpy(np.ascontiguousarray(text)).to(device, torch.float64)
    results: list[Any] = [None] * len(items)
    pending: list[tuple[list[int], Any]] = []

    def host(shape: tuple[int, ...], dtype: Any, fill: float) -> tuple[Any, np.ndarray]:
        t = torch.empty(shape, dtype=dtype, pin_memory=cuda)
        t.fill_(fill)
        return t, t.numpy()

    def upload(t: Any) -> Any:
        return t.to(device, non_blocking=True) if cuda else t

    for batch in plan_batches(items, dim, budget):
        grids = [feats.grid(index[items[i].row.image_id]) for i in batch]
        gh, gw = max(g.shape[0] for g in grids), max(g.shape[1] for g in grids)
        nq = max(len(items[i].queries) for i in batch)
        big_h = max(items[i].truth.shape[0] for i in batch)
        big_w = max(items[i].truth.shape[1] for i in batch)
        b = len(batch)
        tok_t, tok = host((b, gh, gw, dim), torch.float32, 0)
        valid_t, valid = host((b, gh, gw), torch.bool, 0)
        q_t, q = host((b, nq), torch.int64, 0)
        qv_t, qv = host((b, nq), torch.bool, 0)
        wy_t, wy = host((b, big_h, gh), torch.float64, 0)
        wx_t, wx = host((b, big_w, gw), torch.float64, 0)
        truth_t, truth = host((b, big_h, big_w), torch.uint8, IGNORE)
        lab_t, lab = host((b, nq), torch.int16, -1)  # -1: no object (padding, or a label no mask holds)
        for j, (i, g) in enumerate(zip(batch, grids)):
            it = items[i]
            h, w = g.shape[:2]
            tok[j, :h, :w] = g
            valid[j, :h, :w] = True
            q[j, : len(it.queries)] = it.queries
            qv[j, : len(it.queries)] = True
            H, W = it.truth.shape
            wy[j, :H, :h] = bilinear_weights(h, H)
            wx[j, :W, :w] = bilinear_weights(w, W)
            truth[j, :H, :W] = it.truth
            if it.labels:
                lab[j, : len(it.labels)] = [x if 0 <= x < IGNORE else -1 for x in it.labels]
        tokens, tok_valid, qidx = upload(tok_t), upload(valid_t), upload(q_t)
        q_valid, wy_d, wx_d, gt = upload(qv_t), upload(wy_t), upload(wx_t), upload(truth_t)

        s = tokens.reshape(b, gh * gw, dim).to(torch.float64) @ queries_all[qidx].transpose(1, 2)  # (B, N, Q)
        tv = tok_valid.reshape(b, gh * gw, 1)
        lo = s.masked_fill(~tv, float("inf")).amin(dim=1, keepdim=True)
        hi = s.masked_fill(~tv, float("-inf")).amax(dim=1, keepdim=True)
        span = hi - lo
        norm = torch.where(span > 0, (s - lo) / torch.where(span > 0, span, 1), 0).masked_fill_(~tv, 0)
        maps = norm.transpose(1, 2).reshape(b, nq, gh, gw)
        up = (wy_d[:, None] @ maps) @ wx_d[:, None].transpose(-1, -2)  # (B, Q, H, W), rows first as the reference
        del s, norm, maps
        if rule == "classes":
            # the first best query on ties, as numpy's argmax; a pixel keeps 1 + its index, or 0
            # (background) unless the best score is above the threshold; padded queries never win
            best, pred = up[:, 0], torch.ones(up.shape[:1] + up.shape[2:], dtype=torch.int32, device=up.device)
            for k in range(1, nq):
                better = up[:, k] > best
                if not bool(qv[:, k].all()):
                    better &= q_valid[:, k, None, None]
                best = torch.where(better, up[:, k], best)
                pred = torch.where(better, k + 1, pred)
            pred = torch.where(best > threshold, pred, 0)
            del up, best
            maps_out = pred.to(torch.uint8) if keep_maps else None
            n = nq + 1
            cell = torch.where(gt != IGNORE, pred.add_(gt.to(torch.int32), alpha=n), n * n)  # n * n: not counted
            if cuda:  # bincount would wait for the device (it sizes its output from the largest value)
                counts = torch.zeros((b, n * n + 1), dtype=torch.int64, device=cell.device)
                one = torch.ones((), dtype=torch.int64, device=cell.device)
                counts.scatter_add_(1, cell.reshape(b, -1).to(torch.int64), one.expand(b, cell[0].numel()))
            else:
                counts = torch.stack([torch.bincount(c.reshape(-1), minlength=n * n + 1) for c in cell])
            counts = counts[:, :-1].reshape(b, n, n)
        else:
            # a sentence's object is its label's pixels (never 255: ignored and padded pixels are
            # no object's); its mask counts on valid pixels only, so union = mask + object - both
            mask = up > threshold
            del up
            obj = gt.to(torch.int16)[:, None] == upload(lab_t)[:, :, None, None]
            inter = (mask & obj).count_nonzero(dim=(2, 3))
            union = (mask & (gt != IGNORE)[:, None]).count_nonzero(dim=(2, 3)) + obj.count_nonzero(dim=(2, 3)) - inter
            counts = torch.stack([inter, union], dim=-1)  # (B, Q, 2)
            maps_out = mask if keep_maps else None
        if keep_maps:
            _store(results, items, batch, rule, counts.cpu().numpy(), maps_out.cpu().numpy())
        else:
            pending.append((batch, counts))
    for batch, counts in pending:
        _store(results, items, batch, rule, counts.cpu().numpy(), None)
    return results


def _store(results: list, items: list[Grounded], batch: list[int], rule: str, counts: np.ndarray,
           maps: np.ndarray | None) -> None:
    """Each image's own share of a batch's counts and maps (padding cut off)."""
    for j, i in enumerate(batch):
        nq = len(items[i].queries)
        H, W = items[i].truth.shape
        if rule == "classes":
            own = counts[j, : nq + 1, : nq + 1]
            results[i] = (own, None if maps is None else maps[j, :H, :W])
        else:
            results[i] = (counts[j, :nq], None if maps is None else maps[j, :nq, :H, :W])
