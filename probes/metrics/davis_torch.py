"""DAVIS-2017 J and F on a torch device, every frame and object of a batch at once.

The same numbers as ``davis.VideoReference.evaluate`` (and so as the literal port of the
official code, ``davis.evaluate_video_dilation``), computed where the soft labels already are:

* J: intersection and union counts of ``pred == obj`` and ``gt == obj`` (void is background);
* F: the prediction's contour (``seg2bmap``, the official ``_seg2bmap``), and the two counts of
  ``f_measure``: prediction contour pixels inside the ground truth contour's dilation by
  ``disk(r)`` (``fg_boundary & gt_dil``), and ground truth contour pixels inside the
  prediction contour's dilation (``gt_boundary & fg_dil``).

How the dilation is done, exactly and cheaply on a GPU and a CPU alike. ``disk(r)`` for an
integer r is the union over dy in -r..r of the row segments |dx| <= a(dy) = isqrt(r^2 - dy^2).
A pixel is in a map's dilation when, for some dy, the row dy away holds a set pixel within
a(dy) columns: a difference of two entries of the row-wise cumulative sum (integers, exact).
The ground truth's dilations are whole maps (``dilate``: one cumulative sum, one difference per
distinct a, one OR per dy), prepared once per sweep; the prediction's dilation is only ever
asked at the ground truth's contour pixels, so ``gt_matched`` gathers 2 x (2r + 1) entries of
the prediction contour's cumulative sums per ground truth contour pixel.

Every count stays on the device: ``DeviceVideoReference.counts`` returns a (frames, objects, 6)
integer tensor, and a target's J and F need one copy to the host (``per_object``) at the end.
torch is imported inside the functions only.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np

from kvpipe.probes.metrics.davis import VideoReference, f_from_counts, nanmean, bound_radius

COUNTS = ("inter", "union", "n_fg", "n_gt", "fg_matched", "gt_matched")  # the last axis of ``counts``


def supported(ref: VideoReference, bound_th: float = 0.008) -> bool:
    """Whether the device path computes this video's F: one integer disk radius over its scored
    frames (every ``bound_th < 1``, the evaluation's 0.008 included, on frames of one size). A
    fractional radius (a disk not centred on a pixel) is left to the host code."""
    radii = {float(bound_radius(bound_th, ref.gt[i].shape)) for i in ref.frames}
    return len(radii) <= 1 and all(r.is_integer() for r in radii)


def seg2bmap(seg: Any) -> Any:
    """``davis.seg2bmap`` on (..., H, W) bool tensors."""
    import torch

    b = torch.zeros_like(seg)
    # (seg ^ east) | (seg ^ south) | (seg ^ south-east), the neighbours outside the map are 0
    b[..., :-1, :-1] = (seg[..., :-1, :-1] ^ seg[..., :-1, 1:]) | (seg[..., :-1, :-1] ^ seg[..., 1:, :-1]) \
        | (seg[..., :-1, :-1] ^ seg[..., 1:, 1:])
    b[..., -1, :-1] = seg[..., -1, :-1] ^ seg[..., -1, 1:]  # last row: east only
    b[..., :-1, -1] = seg[..., :-1, -1] ^ seg[..., 1:, -1]  # last column: south only
    b[..., -1, -1] = False
    return b


def half_widths(radius: int) -> list[int]:
    """a(dy) for dy = -r..r: the disk's row half-widths, x^2 + y^2 <= r^2 in integers."""
    return [math.isqrt(radius * radius - dy * dy) for dy in range(-radius, radius + 1)]


def row_cumsum(maps: Any, radius: int) -> Any:
    """(M, H, W) bool -> (M, H + 2r, W + 2r + 1) int32: each row's inclusive cumulative sum of
    the map padded by r zero rows above and below, r + 1 zero columns left and r right. The set
    pixels of original row y, columns x - a .. x + a: ``C[y + r, x + a + r + 1] - C[y + r, x - a + r]``."""
    import torch

    padded = torch.nn.functional.pad(maps.to(torch.int32), (radius + 1, radius, radius, radius))
    return padded.cumsum(-1, dtype=torch.int32)


def dilate(maps: Any, radius: int) -> Any:
    """(M, H, W) bool -> its binary dilation by ``disk(radius)`` (outside the map is 0), as
    ``scipy.ndimage.binary_dilation(structure=disk(radius))`` and the official ``cv2.dilate``."""
    import torch

    m, h, w = maps.shape
    r = int(radius)
    c = row_cumsum(maps, r)
    widths = half_widths(r)
    rows = {a: (c[:, :, a + r + 1: a + r + 1 + w] - c[:, :, r - a: r - a + w]) > 0 for a in sorted(set(widths))}
    out = torch.zeros((m, h, w), dtype=torch.bool, device=maps.device)
    for dy, a in zip(range(-r, r + 1), widths):
        out |= rows[a][:, r + dy: r + dy + h]
    return out


def count(maps: Any) -> Any:
    """Set pixels of (..., H, W) bool maps, as int64 (..., ): summed as bytes into int32,
    several times faster on a CPU than ``bool.sum``."""
    import torch

    return maps.contiguous().view(torch.uint8).flatten(-2).sum(-1, dtype=torch.int32).to(torch.int64)


class DeviceVideoReference:
    """One video's ground truth on the device, prepared once per sweep: per scored frame and
    object the object's mask, its area, its contour's pixel count and pixels (flat indices into
    the prediction's ``row_cumsum``) and, when ``keep``, the masks and the contours' dilations
    as (frames, objects, H, W) maps (else rebuilt from the label maps per batch).
    ``counts(labels, start)`` scores a batch of predicted label maps."""

    def __init__(self, ref: VideoReference, device: str, bound_th: float = 0.008, keep: bool = True):
        import torch

        if not supported(ref, bound_th):
            raise ValueError("the device path needs one integer disk radius per video (davis_torch.supported)")
        self.device = torch.device(device)
        self.frames = list(ref.frames)  # scored frame indices
        self.objects = list(ref.objects)
        self.shapes = [tuple(ref.gt[i].shape) for i in self.frames]
        self.radius = r = int(bound_radius(bound_th, self.shapes[0])) if self.frames else 0
        self.widths = half_widths(r)
        self._dys = torch.arange(-r, r + 1, device=self.device, dtype=torch.int64)
        self._a = torch.tensor(self.widths, device=self.device, dtype=torch.int64)
        self.gt = [torch.as_tensor(np.asarray(ref.gt[i])).to(self.device) for i in self.frames]
        self.obj = torch.tensor(self.objects, dtype=torch.int64, device=self.device)
        self.keep = keep
        n_obj = len(self.objects)
        masks, dils, areas, n_gt, q_all, seg_all, self.first = [], [], [], [], [], [], [0]
        for pos in range(len(self.frames)):  # frame by frame: bounded memory, once per sweep
            h, w = self.shapes[pos]
            gt = self._object_masks(pos, pos + 1)[0]  # (O, H, W)
            gt_b = seg2bmap(gt)
            areas.append(count(gt))
            n_gt.append(count(gt_b))
            if keep:
                masks.append(gt)
                dils.append(dilate(gt_b, r))
            o, y, x = torch.nonzero(gt_b, as_tuple=True)  # a host sync per frame, at preparation only
            wc = w + 2 * r + 1
            q_all.append(o * ((h + 2 * r) * wc) + (y + r) * wc + x)
            seg_all.append(pos * n_obj + o)
            self.first.append(self.first[-1] + int(o.numel()))
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        self.q = torch.cat(q_all) if q_all else empty  # contour pixels, frame by frame, object by object
        self.seg = torch.cat(seg_all) if seg_all else empty  # their frame position x objects + object index
        self.areas = torch.stack(areas) if areas else empty.reshape(0, n_obj)
        self.n_gt = torch.stack(n_gt) if n_gt else empty.reshape(0, n_obj)
        # kept maps: one tensor per run of frames of one size, (frames, O, H, W); views per batch
        self.masks, self.dils, self.run_of = {}, {}, {}
        if keep:
            start = 0
            while start < len(self.frames):
                stop = start + 1
                while stop < len(self.frames) and self.shapes[stop] == self.shapes[start]:
                    stop += 1
                self.masks[start] = torch.stack(masks[start:stop])
                self.dils[start] = torch.stack(dils[start:stop])
                self.run_of.update({p: start for p in range(start, stop)})
                start = stop

    def _object_masks(self, start: int, stop: int) -> Any:
        """(B, O, H, W) bool: ``gt == obj`` of the scored frames at positions start..stop-1."""
        import torch

        return torch.stack(self.gt[start:stop])[:, None] == self.obj.to(self.gt[start].dtype)[None, :, None, None]

    @staticmethod
    def nbytes_kept(ref: VideoReference) -> int:
        """The bytes of a video's kept maps (object masks and dilations: bool, per scored frame and object)."""
        return 2 * sum(int(np.prod(ref.gt[i].shape)) * len(ref.objects) for i in ref.frames)

    def bytes_per_frame(self, hw: tuple[int, int]) -> int:
        """About the device memory ``counts`` takes per frame of a batch."""
        h, w = hw
        r = self.radius
        n_obj = max(1, len(self.objects))
        contour = 1 + (self.first[-1] // max(1, len(self.frames)))  # mean contour pixels per frame (all objects)
        return n_obj * (8 * h * w + 4 * (h + 2 * r) * (w + 2 * r + 1)) + contour * (2 * r + 1) * 8 * 4

    def counts(self, labels: Any, start: int) -> Any:
        """(B, O, 6) int64 counts (``COUNTS``) of the predicted label maps ``labels`` (B, H, W) of the
        scored frames at positions start..start+B-1 (positions in ``self.frames``, one size). No
        host sync."""
        import torch

        b, h, w = labels.shape
        n_obj = len(self.objects)
        r = self.radius
        stop = start + b
        if self.keep:
            at = start - self.run_of[start]
            gt = self.masks[self.run_of[start]][at: at + b]
            gt_dil = self.dils[self.run_of[start]][at: at + b]
        else:
            gt = self._object_masks(start, stop)
            gt_dil = dilate(seg2bmap(gt).reshape(b * n_obj, h, w), r).reshape(b, n_obj, h, w)
        pred = labels[:, None] == self.obj.to(labels.dtype)[None, :, None, None]  # (B, O, H, W)
        inter = count(pred & gt)
        union = count(pred) + self.areas[start:stop] - inter
        pb = seg2bmap(pred)
        del pred, gt
        n_fg = count(pb)
        fg_matched = count(pb & gt_dil)
        del gt_dil
        # gt_matched: ground-truth contour pixels with a prediction contour pixel within the disk
        c = row_cumsum(pb.reshape(b * n_obj, h, w), r).reshape(-1)
        del pb
        hc, wc = h + 2 * r, w + 2 * r + 1
        lo, hi = self.first[start], self.first[stop]
        seg = self.seg[lo:hi] - start * n_obj  # the map of each contour pixel in the batch
        q = self.q[lo:hi] + (seg // n_obj) * (n_obj * hc * wc)
        dys, a = self._dys * wc, self._a
        gt_matched = torch.zeros(b * n_obj, dtype=torch.int64, device=labels.device)
        step = max(1, 2**22 // (2 * r + 1))
        for s in range(0, q.numel(), step):  # contour pixels in chunks (bounded memory)
            qs = q[s:s + step, None] + dys[None]
            near = ((c[qs + (r + 1) + a] - c[qs + (r - a)]) > 0).any(1)
            gt_matched.index_add_(0, seg[s:s + step], near.to(torch.int64))
        return torch.stack([inter, union, n_fg, self.n_gt[start:stop], fg_matched,
                            gt_matched.reshape(b, n_obj)], dim=-1)


def per_object(counts: np.ndarray, objects: Sequence[int]) -> dict[int, dict[str, float]]:
    """``VideoReference.evaluate``'s result from a video's (frames, objects, 6) counts on the
    host: J and F per frame as ``davis.jaccard`` and ``f_measure`` compute them, their nanmean."""
    out = {}
    for k, obj in enumerate(objects):
        js, fs = [], []
        for inter, union, n_fg, n_gt, fg_m, gt_m in counts[:, k].tolist():
            js.append(1.0 if union == 0 else float(inter / union))
            fs.append(f_from_counts(n_fg, n_gt, fg_m, gt_m))
        out[int(obj)] = {"J_mean": nanmean(js), "F_mean": nanmean(fs)}
    return out
