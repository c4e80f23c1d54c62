"""The fast DAVIS boundary measure equals the literal port of the official evaluation.

``boundary_f`` / ``evaluate_video`` / ``VideoReference`` (ground-truth contours prepared once,
"inside the other contour's dilation" answered by the nearest contour pixel) against
``boundary_f_dilation`` / ``evaluate_video_dilation`` (both contours dilated by the whole disk
with ``binary_dilation``, as ``cv2.dilate`` in davis2017-evaluation): exactly equal numbers.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from kvpipe.probes.metrics.davis import (BoundaryRef, Contour, VideoReference, boundary_f, boundary_f_dilation, disk,
                                         evaluate_video, evaluate_video_dilation)


def blobs(shape, rng, n=3, smooth=4.0):
    """Random smooth-edged objects: thresholded blurred noise, labels 0..n."""
    field = ndimage.gaussian_filter(rng.standard_normal((n + 1, *shape)), (0, smooth, smooth))
    labels = field.argmax(0).astype(np.uint8)
    labels[rng.random(shape) < 0.002] = 255  # a little void
    return labels


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8, 12])
def test_nearest_contour_pixel_test_is_the_disk_dilation(radius):
    """A pixel has a contour pixel within the disk exactly where the contour's dilation by
    ``disk`` (as skimage builds it, the official code's structuring element) is set."""
    rng = np.random.default_rng(radius)
    selem = disk(float(radius))
    assert selem.shape == (2 * radius + 1,) * 2 and selem[radius].all() and selem[:, radius].all()
    assert not selem[0, 0] and selem.sum() == sum(1 for x in range(-radius, radius + 1)
                                                  for y in range(-radius, radius + 1) if x * x + y * y <= radius ** 2)
    for density in (0.0005, 0.01, 0.2):
        mask = rng.random((61, 97)) < density
        mask[0, 5] = mask[-1, -1] = True  # touches the borders
        dilated = ndimage.binary_dilation(mask, structure=selem)
        contour = Contour(mask)
        ys, xs = np.nonzero(np.ones_like(mask))
        for y, x, inside in zip(ys[::7], xs[::7], dilated.ravel()[::7]):
            assert contour.count_within(np.array([y]), np.array([x]), float(radius)) == int(inside)
        assert contour.count_within(ys, xs, float(radius)) == int(dilated.sum())
    assert Contour(np.zeros((5, 5), bool)).count_within(np.array([1]), np.array([1]), float(radius)) == 0


def test_half_integer_radius_keeps_scipys_placement():
    rng = np.random.default_rng(0)
    mask = rng.random((30, 40)) < 0.02
    ys, xs = np.nonzero(np.ones_like(mask))
    dilated = ndimage.binary_dilation(mask, structure=disk(2.5))
    assert Contour(mask).count_within(ys, xs, 2.5) == int(dilated.sum())


@pytest.mark.parametrize("shape", [(480, 854), (64, 91)])
def test_boundary_f_equals_the_literal_port(shape):
    rng = np.random.default_rng(1)
    for trial in range(6):
        gt, pred = blobs(shape, rng, smooth=3 + trial), blobs(shape, rng, smooth=2 + trial)
        for obj in (1, 2):
            g, p = gt == obj, pred == obj
            assert boundary_f(g, p) == boundary_f_dilation(g, p)
            assert BoundaryRef(g).f_measure(p) == boundary_f_dilation(g, p)
        void = gt == 255
        assert boundary_f(gt == 1, pred == 1, void) == boundary_f_dilation(gt == 1, pred == 1, void)
        assert boundary_f(gt == 1, pred == 1, bound_th=3) == boundary_f_dilation(gt == 1, pred == 1, bound_th=3)
    empty = np.zeros(shape, bool)
    full = np.ones(shape, bool)
    some = blobs(shape, rng) == 1
    for g, p in [(empty, empty), (empty, some), (some, empty), (full, some), (some, full)]:
        assert boundary_f(g, p) == boundary_f_dilation(g, p)


def davis_sized_video(rng):
    """Six 480p frames (854 x 480, objects 1..3) and predictions: shifted copies of the truth, one
    random frame, one frame missing object 2."""
    gts = [blobs((480, 854), rng, n=3, smooth=12) for _ in range(6)]
    preds = [np.roll(g, (3 * t, -5 * t), axis=(0, 1)) for t, g in enumerate(gts)]
    preds[2] = blobs((480, 854), rng, n=3, smooth=6)
    preds[3] = np.where(preds[3] == 2, 0, preds[3])
    return gts, preds, [1, 2, 3]


def test_video_evaluation_equals_the_literal_port_on_a_davis_sized_video():
    """A 480p video (DAVIS layout: 854 x 480 frames, objects 1..3, void 255); predictions that
    are a shifted/perturbed copy of the truth, random noise, and one missing object."""
    rng = np.random.default_rng(2)
    gts, preds, objects = davis_sized_video(rng)
    ref = evaluate_video_dilation(gts, preds, objects)
    assert evaluate_video(gts, preds, objects) == ref
    prepared = VideoReference(gts, objects)
    assert prepared.evaluate(preds) == ref
    assert prepared.evaluate(gts) == evaluate_video_dilation(gts, gts, objects)  # reused: same again


# ------------------------------------------------------------------ the device path (davis_torch)
torch = pytest.importorskip("torch")


@pytest.mark.parametrize("radius", [1, 2, 3, 5, 8, 12])
def test_device_dilation_is_the_disk_dilation(radius):
    from kvpipe.probes.metrics.davis_torch import dilate

    rng = np.random.default_rng(radius)
    maps = rng.random((4, 61, 97)) < np.array([0.0005, 0.01, 0.2, 0.0])[:, None, None]
    maps[:3, 0, 5] = maps[:3, -1, -1] = True  # touches the borders
    got = dilate(torch.from_numpy(maps), radius).numpy()
    for m, g in zip(maps, got):
        assert np.array_equal(g, ndimage.binary_dilation(m, structure=disk(float(radius))))


def test_device_contour_is_seg2bmap():
    from kvpipe.probes.metrics.davis import seg2bmap
    from kvpipe.probes.metrics import davis_torch

    rng = np.random.default_rng(3)
    segs = np.stack([blobs((37, 53), rng) == 1, rng.random((37, 53)) < 0.5, np.ones((37, 53), bool)])
    got = davis_torch.seg2bmap(torch.from_numpy(segs)).numpy()
    for s, g in zip(segs, got):
        assert np.array_equal(g, seg2bmap(s))


def device_scores(gts, preds, objects, keep=True, batch=2):
    """``VideoReference.evaluate`` through ``DeviceVideoReference`` on the CPU, in batches."""
    from kvpipe.probes.metrics.davis_torch import DeviceVideoReference, per_object

    ref = DeviceVideoReference(VideoReference(gts, objects), "cpu", keep=keep)
    labels = torch.from_numpy(np.stack([preds[i] for i in ref.frames]))
    counts = [ref.counts(labels[a:a + batch], a) for a in range(0, len(ref.frames), batch)]
    return per_object(torch.cat(counts).numpy(), objects)


@pytest.mark.parametrize("keep", [True, False])
def test_device_video_evaluation_equals_the_literal_port(keep):
    """J and F of the device path equal the literal port's on the DAVIS-sized video above, on
    a small one with objects touching the borders, and with a missing object, in batches."""
    rng = np.random.default_rng(2)
    gts, preds, objects = davis_sized_video(rng)
    assert device_scores(gts, preds, objects, keep) == evaluate_video_dilation(gts, preds, objects)
    assert device_scores(gts, gts, objects, keep, batch=4) == evaluate_video_dilation(gts, gts, objects)
    small = [blobs((64, 91), rng, n=4, smooth=3) for _ in range(7)]
    guess = [blobs((64, 91), rng, n=4, smooth=2) for _ in range(7)]
    guess[4][:] = 0  # every object missing
    guess[5][:] = 2  # one object everywhere (a contour only along the last row and column: none)
    for objects in ([1, 2, 3, 4], [2]):
        assert device_scores(small, guess, objects, keep, batch=3) == evaluate_video_dilation(small, guess, objects)
