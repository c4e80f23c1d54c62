"""Hand-computed checks of the probe math: DAVIS J/F, label propagation, L2 variance, plots."""

from __future__ import annotations

import numpy as np
import pytest

from kvpipe.probes.metrics.davis import boundary_f, disk, evaluate_video, jaccard, seg2bmap, summarize
from kvpipe.probes.plots import plot_layer_head, plot_variance_heatmap, plot_variance_histogram
from kvpipe.probes.propagation import (bilinear_matrix, labels_to_grid, propagate_video, resize_nearest,
                                       upsample_to_mask)
from kvpipe.probes.variance import Threshold, bimodal_threshold, l2_variance, l2_variance_pooled

from fixtures.davis_reference import brute_force_f  # the official formula written out, independently


def square(shape, rows, cols):
    m = np.zeros(shape, bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


# ------------------------------------------------------------------------------------------ J
def test_jaccard_hand_made():
    gt = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 1, 1], [0, 0, 0]], bool)
    assert jaccard(gt, pred) == pytest.approx(2 / 3)
    void = np.array([[0, 0, 1], [0, 0, 0]], bool)
    assert jaccard(gt, pred, void) == 1.0  # the extra pixel is void
    assert jaccard(np.zeros((4, 4), bool), np.zeros((4, 4), bool)) == 1.0  # both empty, as official
    assert jaccard(gt, ~gt) == 0.0


# ------------------------------------------------------------------------------------------ F
def test_disk_matches_skimage():
    cross = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], bool)
    np.testing.assert_array_equal(disk(1), cross)
    d2 = np.array([[0, 0, 1, 0, 0], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 1, 0, 0]], bool)
    np.testing.assert_array_equal(disk(2.0), d2)


def test_seg2bmap_is_ring_offset_to_origin():
    # a square on rows/cols 2..5 has its boundary on the ring of the box 1..5 x 1..5
    b = seg2bmap(square((10, 10), (2, 6), (2, 6)))
    ring = square((10, 10), (1, 6), (1, 6)) & ~square((10, 10), (2, 5), (2, 5))
    np.testing.assert_array_equal(b, ring)
    assert b.sum() == 16


def test_boundary_f_hand_made():
    a = square((10, 10), (2, 6), (2, 6))
    assert boundary_f(a, a) == 1.0
    far = np.zeros((100, 100), bool)
    assert boundary_f(square(far.shape, (5, 15), (5, 15)), square(far.shape, (60, 80), (60, 80))) == 0.0
    # shift right by 2 px; radius ceil(0.008 * 14.1) = 1 (a cross). Rings 1..5 x 1..5 and 1..5 x 3..7:
    # pred ring pixels within 1 px of the gt ring: top 4 + bottom 4 + left column 2 + right 0 = 10 of 16;
    # recall is the mirror image: 10 of 16. F = 0.625.
    b = square((10, 10), (2, 6), (4, 8))
    assert boundary_f(a, b) == pytest.approx(0.625)
    assert boundary_f(a, np.zeros_like(a)) == 0.0  # precision 1, recall 0
    assert boundary_f(np.zeros_like(a), np.zeros_like(a)) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_boundary_f_matches_direct_formula(seed):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:120, :160]
    gt = (yy - 60) ** 2 + (xx - 80) ** 2 < 40 ** 2
    pred = (yy - 60 - rng.integers(-6, 7)) ** 2 / 1.3 + (xx - 80 - rng.integers(-6, 7)) ** 2 < 38 ** 2
    assert boundary_f(gt, pred) == pytest.approx(brute_force_f(gt, pred))


# ------------------------------------------------------------------------------- video metrics
def test_evaluate_video_skips_first_and_last_frame():
    shape = (10, 10)
    gt = np.zeros(shape, np.uint8)
    gt[2:6, 2:6] = 1
    gt[7:9, 7:9] = 2
    gt[0, :] = 255  # void counts as background
    half = gt.copy()
    half[2:6, 4:6] = 0  # object 1 half predicted: J = 8/16
    wrong = np.zeros(shape, np.uint8)
    gts = [gt] * 4
    preds = [wrong, np.where(gt == 255, 0, gt), half, wrong]  # frames 0 and 3 must not count
    res = evaluate_video(gts, preds, [1, 2])
    assert res[1]["J_mean"] == pytest.approx((1 + 0.5) / 2)
    assert res[2]["J_mean"] == 1.0 and res[2]["F_mean"] == 1.0
    f_half = boundary_f(gt == 1, half == 1)
    assert 0 < f_half < 1
    assert res[1]["F_mean"] == pytest.approx((1 + f_half) / 2)
    s = summarize({"v/1": res[1], "v/2": res[2]})
    assert s["J_mean"] == pytest.approx((0.75 + 1) / 2)
    assert s["F_mean"] == pytest.approx(((1 + f_half) / 2 + 1) / 2)
    assert s["JF_mean"] == pytest.approx((s["J_mean"] + s["F_mean"]) / 2)


# --------------------------------------------------------------------------------- propagation
def test_labels_to_grid_is_pil_nearest_then_one_hot():
    Image = pytest.importorskip("PIL.Image")
    rng = np.random.default_rng(0)
    for (H, W), (h, w) in [((480, 854), (30, 53)), ((37, 41), (5, 7)), ((64, 64), (8, 8))]:
        mask = rng.integers(0, 4, (H, W)).astype(np.uint8)
        ref = np.array(Image.fromarray(mask).resize((w, h), 0))
        np.testing.assert_array_equal(resize_nearest(mask, (h, w)), ref)
    mask = np.kron(np.array([[0, 1], [2, 255]], np.uint8), np.ones((8, 8), np.uint8))
    g = labels_to_grid(mask, (2, 2), 3)
    assert g.shape == (2, 2, 3) and g.dtype == np.float32
    np.testing.assert_array_equal(g.argmax(-1), [[0, 1], [2, 0]])  # void -> background
    np.testing.assert_array_equal(g.sum(-1), 1)


def test_upsampling_matches_torch_bilinear():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    soft = rng.random((5, 7, 3))
    for out_hw in [(40, 56), (33, 50)]:
        ref = torch.nn.functional.interpolate(torch.from_numpy(soft).permute(2, 0, 1)[None], size=out_hw,
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        wy = bilinear_matrix(5, out_hw[0], 5 / out_hw[0])
        wx = bilinear_matrix(7, out_hw[1], 7 / out_hw[1])
        mine = np.einsum("Yy,yxc,Xx->YXc", wy, soft, wx)
        np.testing.assert_allclose(mine, ref, atol=1e-12)
    # DINO's "scale by the patch size" path and the direct resize agree on an integer ratio
    np.testing.assert_array_equal(upsample_to_mask(soft, (40, 56), patch_size=8), upsample_to_mask(soft, (40, 56)))
    assert upsample_to_mask(soft, (33, 50)).shape == (33, 50)


def dino_reference(feats, first_seg, n_last_frames, size, topk):
    """DINO eval_video_segmentation.py (eval_video_tracking_davis + label_propagation), transcribed."""
    import queue

    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    h, w, _ = feats[0].shape
    mask = torch.zeros(h, w, h, w, dtype=torch.float64)
    for i in range(h):
        for j in range(w):
            for p in range(2 * size + 1):
                for q in range(2 * size + 1):
                    if 0 <= i - size + p < h and 0 <= j - size + q < w:
                        mask[i, j, i - size + p, j - size + q] = 1
    mask = mask.reshape(h * w, h * w)
    tens = [torch.from_numpy(f.reshape(h * w, -1)).double() for f in feats]
    first = torch.from_numpy(first_seg).double().permute(2, 0, 1)[None]
    que = queue.Queue(n_last_frames)
    frame1_feat = tens[0].T
    outs = []
    for cnt in range(1, len(feats)):
        used_feats = [frame1_feat] + [pair[0] for pair in list(que.queue)]
        used_segs = [first] + [pair[1] for pair in list(que.queue)]
        feat_tar = tens[cnt]
        ret = feat_tar.T
        ncontext = len(used_feats)
        src = F.normalize(torch.stack(used_feats), dim=1, p=2)
        tar = F.normalize(feat_tar, dim=1, p=2).unsqueeze(0).repeat(ncontext, 1, 1)
        aff = torch.exp(torch.bmm(tar, src) / 0.1)
        aff *= mask.unsqueeze(0).repeat(ncontext, 1, 1)
        aff = aff.transpose(2, 1).reshape(-1, h * w)
        tk_val, _ = torch.topk(aff, dim=0, k=topk)
        tk_val_min, _ = torch.min(tk_val, dim=0)
        aff[aff < tk_val_min] = 0
        aff = aff / torch.sum(aff, keepdim=True, axis=0)
        segs = torch.cat(used_segs)
        nc, C, _, _ = segs.shape
        segs = segs.reshape(nc, C, -1).transpose(2, 1).reshape(-1, C).T
        seg = torch.mm(segs, aff).reshape(1, C, h, w)
        if que.qsize() == n_last_frames:
            que.get()
        que.put([ret, seg.clone()])
        outs.append(seg[0].permute(1, 2, 0).numpy())
    return outs


@pytest.mark.parametrize("features, n_last, size, topk, h, w", [
    ("gauss", 3, 2, 5, 5, 6), ("gauss", 7, 12, 5, 5, 6), ("gauss", 7, 3, 5, 14, 17),
    ("gauss", 2, 1, 20, 5, 6),  # window smaller than k: keep the whole window
    ("ties", 3, 2, 5, 5, 6), ("ties", 1, 12, 3, 9, 11),  # one-hot features: exact ties with the k-th value
])
def test_propagation_matches_dino_transcription(features, n_last, size, topk, h, w):
    rng = np.random.default_rng(0)
    T = 7
    if features == "gauss":
        feats = [rng.standard_normal((h, w, 4)).astype(np.float32) for _ in range(T)]
    else:
        feats = [np.eye(4, dtype=np.float32)[rng.integers(0, 4, (h, w))] for _ in range(T)]
    first = np.eye(3, dtype=np.float32)[rng.integers(0, 3, (h, w))]
    ref = dino_reference(feats, first, n_last_frames=n_last, size=size, topk=topk)
    mine = propagate_video(feats, first, n_last_frames=n_last, size_mask_neighborhood=size, topk=topk,
                           temperature=0.1)
    assert len(mine) == T - 1
    for a, b in zip(mine, ref):
        np.testing.assert_allclose(a, b, atol=1e-5)


def stripe_video(T=5, h=6, w=10, patch=8):
    """Two full-height stripes moving one token per frame (no corners: bilinear + argmax is exact)."""
    grids = []
    for t in range(T):
        g = np.zeros((h, w), np.int64)
        g[:, 1 + t:3 + t] = 1
        g[:, 8 - t // 2:10 - t // 2] = 2
        grids.append(g)
    masks = [np.kron(g, np.ones((patch, patch), np.int64)) for g in grids]
    return grids, masks


def run_video(feats, masks, grid_hw):
    first = labels_to_grid(masks[0], grid_hw, 3)
    soft = propagate_video(feats, first)
    preds = [masks[0]] + [upsample_to_mask(s, masks[0].shape) for s in soft]
    return summarize(evaluate_video(masks, preds, [1, 2]))


def test_oracle_features_give_perfect_j_and_random_do_not():
    grids, masks = stripe_video()
    oracle = [np.eye(3, dtype=np.float32)[g] for g in grids]
    res = run_video(oracle, masks, grids[0].shape)
    assert res["J_mean"] == 1.0 and res["F_mean"] == 1.0
    soft = propagate_video(oracle, oracle[0])
    for s, g in zip(soft, grids[1:]):
        np.testing.assert_allclose(s, np.eye(3)[g], atol=1e-6)  # sharp one-hot labels
    rng = np.random.default_rng(0)
    noise = [rng.standard_normal((*g.shape, 8)).astype(np.float32) for g in grids]
    assert run_video(noise, masks, grids[0].shape)["J_mean"] < 0.7


# ------------------------------------------------------------------------------------ variance
def test_l2_variance_hand_computed():
    keys = np.array([[[0, 0], [1, 1]],
                     [[2, 0], [1, 5]]], np.float32)  # (2 images, 2 tokens, 2 dims)
    # position 0: mean (1, 0), squared deviations 1, 1 -> 1; position 1: mean (1, 3), 4, 4 -> 4
    assert l2_variance(keys) == pytest.approx((1 + 4) / 2)
    # pooled: mean (1, 1.5); squared deviations 3.25, 0.25, 3.25, 12.25 -> 19 / 4
    assert l2_variance_pooled([keys[0], keys[1]]) == pytest.approx(4.75)
    assert l2_variance_pooled([keys[0], keys[1, :1]]) == pytest.approx(np.var(
        np.array([[0, 0], [1, 1], [2, 0]]), axis=0).sum())


def test_bimodal_threshold_valley_and_otsu():
    rng = np.random.default_rng(0)
    values = np.r_[rng.normal(200, 60, 600), rng.normal(600, 60, 400), [np.nan]]
    th = bimodal_threshold(values)
    assert isinstance(th, Threshold) and th.method == "valley"
    assert 350 < th.value < 500
    uni = bimodal_threshold(rng.normal(400, 50, 1000))
    assert uni.method == "otsu" and 300 < uni.value < 500
    const = bimodal_threshold(np.full(5, 3.0))
    assert const == Threshold(3.0, "otsu")
    # two tight clusters of a few heads (the probe's tiny case) are split between them
    small = bimodal_threshold(np.r_[np.full(6, 0.04) + rng.random(6) * 1e-3, 16 + rng.random(6)])
    assert 0.05 < small.value < 16


# --------------------------------------------------------------------------------------- plots
def check_png(path):
    Image = pytest.importorskip("PIL.Image")
    assert path.stat().st_size > 1024
    with Image.open(path) as im:
        im.verify()


def test_plots_write_pngs_with_nans(tmp_path):
    rng = np.random.default_rng(0)
    scores = rng.random((6, 4))
    scores[2, :] = np.nan  # a layer with no score
    scores[0, 1] = np.nan
    check_png(plot_layer_head(scores, "toy", "JF_mean", tmp_path / "a" / "fig2.png", baseline=0.5))
    check_png(plot_layer_head(np.full((3, 2), np.nan), "all nan", "JF_mean", tmp_path / "nan.png"))
    values = np.r_[rng.normal(200, 50, 40), rng.normal(600, 50, 40), np.nan]
    check_png(plot_variance_histogram(values, 450.0, tmp_path / "hist.png", "variance"))
    matrix = values[:24].reshape(6, 4).copy()
    matrix[1, 1] = np.nan
    check_png(plot_variance_heatmap(matrix, 450.0, tmp_path / "heat.png", "variance"))
