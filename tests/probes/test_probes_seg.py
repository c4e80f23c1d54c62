"""Segmentation probes (fg-seg, cosegmentation, semantic-seg, refexp-seg): hand-computed metric
cases, oracle features that must score 1.0, random features that must not, and bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fixtures.probe_stores import (ToyImage, coseg_images, fewshot_images, refexp_images, semantic_images, stripes,
                                   write_toy_store)

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes import PROBES, Target, run_probe
from kvpipe.probes.cosegmentation import elbow_kmeans, foreground_clusters
from kvpipe.probes.grounding import normalised_scores
from kvpipe.probes.logistic import fit_logistic
from kvpipe.probes.metrics.segmentation import ClassIoU, FewShotIoU, binary_areas, jaccard, precision
from kvpipe.probes.tokens import (border_tokens, class_map, classes_present, label_ids, token_fractions,
                                  upsample_bilinear)
from kvpipe.store import FeatureStore


# ------------------------------------------------------------------------ hand-computed metrics
def test_binary_areas_by_hand():
    gt = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 0], [1, 0, 0]], bool)
    # fg: I = {(0,0)} = 1, U = {(0,0),(0,1),(1,0)} = 3
    # bg: pred-bg = {(0,1),(0,2),(1,1),(1,2)}, gt-bg = {(0,2),(1,0),(1,1),(1,2)}: I = 3, U = 5
    inter, union = binary_areas(pred, gt)
    np.testing.assert_array_equal(inter, [3, 1])
    np.testing.assert_array_equal(union, [5, 3])
    valid = np.ones_like(gt)
    valid[1, 2] = False  # drop one pixel that was in both background sets
    inter, union = binary_areas(pred, gt, valid)
    np.testing.assert_array_equal(inter, [2, 1])
    np.testing.assert_array_equal(union, [4, 3])


def test_jaccard_and_precision_by_hand():
    gt = np.array([[1, 1, 0, 0]], bool)
    pred = np.array([[1, 0, 0, 1]], bool)
    assert jaccard(pred, gt) == pytest.approx(1 / 3)  # I = 1, U = 3
    assert precision(pred, gt) == pytest.approx(2 / 4)  # pixels 0 and 2 right
    valid = np.array([[1, 1, 1, 0]], bool)  # ignore the false positive
    assert jaccard(pred, gt, valid) == pytest.approx(1 / 2)
    assert precision(pred, gt, valid) == pytest.approx(2 / 3)
    empty = np.zeros((2, 2), bool)
    assert jaccard(empty, empty) == 1.0


def test_few_shot_miou_accumulates_per_class_like_hsnet():
    acc = FewShotIoU()
    acc.add(1, np.array([3, 1]), np.array([5, 3]))  # class 1, episode a: fg IoU 1/3
    acc.add(1, np.array([4, 2]), np.array([4, 2]))  # class 1, episode b: fg IoU 1
    acc.add(2, np.array([6, 0]), np.array([6, 2]))  # class 2: fg IoU 0
    # class 1: (1 + 2) / (3 + 2) = 0.6 (not the episode mean 2/3); class 2: 0 -> mIoU 0.3
    assert acc.miou() == pytest.approx(0.3)
    # FB-IoU: bg (3+4+6)/(5+4+6) = 13/15, fg (1+2+0)/(3+2+2) = 3/7, mean of the two
    assert acc.fb_iou() == pytest.approx((13 / 15 + 3 / 7) / 2)
    assert np.isnan(FewShotIoU().miou())


def test_class_iou_accumulates_over_images():
    acc = ClassIoU()
    acc.add(np.array([[0, 1, 1, 1]]), np.array([[0, 0, 1, 1]]), [0, 1])
    # image 1: class 0 I=1 U=2; class 1 I=2 U=3
    acc.add(np.array([[2, 0, 2, 0]]), np.array([[2, 2, -1, 0]]), [0, 2])
    # image 2 (pixel 2 ignored): class 2 I=1 U=2; class 0 I=1 U=2
    assert acc.ious() == pytest.approx({0: 2 / 4, 1: 2 / 3, 2: 1 / 2})
    assert acc.miou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert acc.miou(exclude=(0,)) == pytest.approx((2 / 3 + 0.5) / 2)


# ------------------------------------------------------------------------ token <-> pixel helpers
def test_token_fractions_by_hand():
    fg = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]], bool)
    valid = np.ones_like(fg)
    valid[0, 3] = False
    frac, weight = token_fractions(fg, valid, (2, 2))
    # token (0,0): 3 of 4 fg; (0,1): 0 of 3 valid (weight 3/4); (1,0): 0; (1,1): 1 of 4
    np.testing.assert_allclose(frac, [0.75, 0.0, 0.0, 0.25])
    np.testing.assert_allclose(weight, [1.0, 0.75, 1.0, 1.0])


def test_upsample_matches_torch_interpolate():
    torch = pytest.importorskip("torch")
    maps = np.random.default_rng(0).random((3, 5, 2))
    for out in [(12, 20), (7, 11), (3, 5)]:
        ref = torch.nn.functional.interpolate(torch.tensor(maps).permute(2, 0, 1)[None], size=out,
                                              mode="bilinear", align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(upsample_bilinear(maps, out), ref, atol=1e-12)


def test_labels_to_classes():
    meta = {"labels": {"1": 7, "2": 7, "3": 4}}
    mask = np.array([[0, 1, 2], [3, 255, 9]], np.uint8)
    np.testing.assert_array_equal(class_map(mask, meta), [[0, 7, 7], [4, -1, 0]])
    assert label_ids(meta, 7) == [1, 2] and label_ids({}, 5) == [5]
    assert classes_present(meta) == [4, 7] and classes_present({}, mask) == [1, 2, 3, 9]
    np.testing.assert_array_equal(border_tokens((3, 3)).reshape(3, 3), [[1, 1, 1], [1, 0, 1], [1, 1, 1]])


def test_normalised_scores_min_max_per_query():
    tokens = np.array([[1.0, 0.0], [3.0, 1.0], [2.0, 2.0]])
    queries = np.array([[1.0, 0.0], [0.0, 0.0]])
    # query 0 scores 1, 3, 2 -> 0, 1, 0.5; query 1 is constant -> 0 everywhere
    np.testing.assert_allclose(normalised_scores(tokens, queries), [[0, 0], [1, 0], [0.5, 0]])


def test_logistic_regression_reaches_the_optimum():
    from scipy.optimize import minimize

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 60, 3))
    y = rng.random((2, 60))  # soft targets
    w = rng.random((2, 60))
    w[1, 50:] = 0  # padding
    fit = fit_logistic(x, y, w, C=0.5, dev="cpu", tol=1e-10)
    for e in range(2):
        keep = w[e] > 0
        xs, ys, ws = x[e][keep], y[e][keep], w[e][keep]
        mu = (ws[:, None] * xs).sum(0) / ws.sum()
        sd = np.sqrt(((ws[:, None] * (xs - mu) ** 2).sum(0) / ws.sum()).mean())  # one scale
        z_ = (xs - mu) / sd

        def f(th):
            z = z_ @ th[:3] + th[3]
            return np.sum(ws * (np.logaddexp(0, z) - ys * z)) + np.sum(th[:3] ** 2) / (2 * 0.5)

        th = minimize(f, np.zeros(4), method="BFGS", options={"gtol": 1e-9}).x
        np.testing.assert_allclose(fit.coef[e], th[:3] / sd, atol=1e-3)
        np.testing.assert_allclose(fit.bias[e], th[3] - (th[:3] / sd) @ mu, atol=1e-3)


@pytest.mark.parametrize("n, dim", [(40, 100), (240, 1200), (60, 30)])
def test_logistic_newton_steps_in_token_space_equal_feature_space(n, dim):
    """The Woodbury step in the N-square system is the (D + 1)-square Newton step: the same
    iterations, the same optimum (soft targets, sample weights, padding, features far from
    centred), whichever space is smaller."""
    rng = np.random.default_rng(n)
    x = (3 * rng.standard_normal((3, n, dim)) + rng.standard_normal(dim)).astype(np.float32)
    y = rng.random((3, n)).astype(np.float32)
    y[:, : n // 2] = np.round(y[:, : n // 2])
    w = rng.random((3, n)).astype(np.float32)
    w[1, n - 9:] = 0  # padding
    a = fit_logistic(x, y, w, dev="cpu", space="features")
    b = fit_logistic(x, y, w, dev="cpu", space="tokens")
    auto = fit_logistic(x, y, w, dev="cpu")
    assert a.iterations == b.iterations
    np.testing.assert_allclose(b.coef, a.coef, atol=2e-4 * np.abs(a.coef).max())
    np.testing.assert_allclose(b.bias, a.bias, atol=2e-4 * max(1.0, np.abs(a.bias).max()))
    chosen = b if n < dim + 1 else a
    np.testing.assert_array_equal(auto.coef, chosen.coef)  # auto solves in the smaller space


def test_foreground_vote_by_hand():
    border = border_tokens((4, 4))  # 12 of 16 tokens on the ring
    a = np.zeros((4, 4), np.int64)
    a[1:3, 1:3] = 1  # cluster 1 fills the centre of image A: none on the ring -> salient
    b = np.zeros((4, 4), np.int64)
    b[1:3, 1:3] = 2  # cluster 2 in image B; cluster 0 is all ring in both
    labels = [a.ravel(), b.ravel()]
    assert foreground_clusters(labels, [border, border], 3, 75).tolist() == []  # needs ceil(1.5) = 2 votes
    assert foreground_clusters(labels, [border, border], 3, 50).tolist() == [1, 2]  # 1 vote suffices


def test_elbow_kmeans_finds_separated_groups():
    rng = np.random.default_rng(0)
    centres = np.eye(64)[:3] * 10
    descs = [centres[rng.integers(0, 3, 40)] + 0.01 * rng.standard_normal((40, 64)) for _ in range(3)]
    labels, k = elbow_kmeans(descs, sample_interval=1)
    assert 3 <= k <= 4  # the loop stops at the first k that barely helps (as the reference)
    truth = np.concatenate([np.argmax(d, axis=1) for d in descs])
    got = np.concatenate(labels)
    # every cluster is pure
    assert all(len(set(truth[got == c])) == 1 for c in np.unique(got))


# ------------------------------------------------------------------------ oracle / random stores
def value(run, kind, layer, head, metric):
    return next(r["value"] for r in run.table.to_pylist()
                if (r["kind"], r["layer"], r["head"], r["metric"]) == (kind, layer, head, metric))


def scores(store, task, target, params=None):
    return PROBES.get(task)(FeatureStore.open(store), params or {}).score(target)


@pytest.mark.plots
def test_fg_seg_oracle_and_random(tmp_path):
    images, structure = fewshot_images()
    oracle = run_probe(write_toy_store(tmp_path / "o", images, "oracle", structure), "fg-seg")
    for kind in ("values", "keys"):
        assert value(oracle, kind, 1, 0, "mIoU") == pytest.approx(1.0)
        assert value(oracle, kind, 1, 0, "FB_IoU") == pytest.approx(1.0)
    assert value(oracle, "post_proj", -1, -1, "mIoU") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 1, "mIoU") < 0.6  # the noise head
    assert len(oracle.table) == (2 * 2 * 2 + 1) * 2
    assert {p.name for p in oracle.plots} == {"fg-seg-keys-mIoU.png", "fg-seg-values-mIoU.png"}
    rand = write_toy_store(tmp_path / "r", images, "random", structure)
    assert scores(rand, "fg-seg", Target("values", 0, 0))["mIoU"] < 0.6
    # one shot: a query may show a class its single support lacks (class 1 next to class 2), so
    # even oracle features are not perfect there; the first support alone is used
    one_shot = scores(tmp_path / "o", "fg-seg", Target("values", 0, 0), {"shots": 1})
    assert 0.9 < one_shot["mIoU"] < 1.0


def test_fg_seg_batches_bound_the_solvers_hessians(tmp_path, monkeypatch):
    """Wide features of small images: the batch is bounded by the Newton solver's (D + 1)^2
    float64 Hessians, not only by the support features (3,585-wide post-proj features of
    48-token images had put 78 episodes, 24 GB of Hessians, in one batch). Every episode is in
    one batch, and the scores do not depend on how episodes are batched."""
    import kvpipe.probes.fg_seg as fg

    # 5 supports of 48 tokens: the 240-square token-space systems are small, the support
    # features bound the batch; 4,000 support tokens: the 3,585-square Hessians bound it
    for n, dim, most in ((240, 3584, 77), (4000, 3584, 3), (240, 128, 200)):
        sizes = np.full(200, n)
        plan = fg.batch_plan(sizes, dim)
        assert sorted(j for b in plan for j in b) == list(range(200))
        assert max(len(b) for b in plan) == most
        hessians = fg.HESSIAN_COPIES * min(n, dim + 1) ** 2 * 8 * max(len(b) for b in plan)
        assert hessians <= fg.HESSIAN_BYTES
    images, structure = fewshot_images()
    store = write_toy_store(tmp_path / "r", images, "random", structure)
    together = scores(store, "fg-seg", Target("values", 0, 0))
    monkeypatch.setattr(fg, "HESSIAN_BYTES", 1)  # one episode per batch
    assert fg.batch_plan(np.array([40, 40]), 8) == [[0], [1]]
    assert scores(store, "fg-seg", Target("values", 0, 0)) == pytest.approx(together, abs=1e-9)


def test_cosegmentation_oracle_and_random(tmp_path):
    images, structure = coseg_images()
    oracle = run_probe(write_toy_store(tmp_path / "o", images, "oracle", structure), "cosegmentation")
    assert value(oracle, "values", 0, 0, "J_m") == pytest.approx(1.0)  # the distractor loses the vote
    assert value(oracle, "keys", 1, 0, "P_m") == pytest.approx(1.0)
    assert value(oracle, "post_proj", -1, -1, "J_m") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 1, "J_m") < 0.6
    rand = write_toy_store(tmp_path / "r", images, "random", structure)
    assert scores(rand, "cosegmentation", Target("values", 0, 0))["J_m"] < 0.6


def test_semantic_seg_oracle_and_random(tmp_path):
    images, structure, queries, classes = semantic_images()
    oracle = run_probe(write_toy_store(tmp_path / "o", images, "oracle", structure, queries, classes),
                       "semantic-seg")
    for kind in ("values", "keys"):
        assert value(oracle, kind, 0, 0, "mIoU") == pytest.approx(1.0)
        assert value(oracle, kind, 1, 0, "mIoU_fg") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 1, "mIoU") < 0.6
    # the post-proj baseline: image post_proj against the text queries' post_proj
    assert value(oracle, "post_proj", -1, -1, "mIoU") == pytest.approx(1.0)
    rand = write_toy_store(tmp_path / "r", images, "random", structure, queries, classes)
    assert scores(rand, "semantic-seg", Target("values", 0, 0))["mIoU"] < 0.6
    assert scores(rand, "semantic-seg", Target("post_proj"))["mIoU"] < 0.6


def test_refexp_seg_oracle_and_random(tmp_path):
    images, structure, queries, classes = refexp_images()
    oracle = run_probe(write_toy_store(tmp_path / "o", images, "oracle", structure, queries, classes),
                       "refexp-seg")
    assert value(oracle, "values", 1, 0, "mIoU") == pytest.approx(1.0)
    assert value(oracle, "keys", 0, 0, "cIoU") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 1, "mIoU") < 0.6
    assert value(oracle, "post_proj", -1, -1, "mIoU") == pytest.approx(1.0)
    rand = write_toy_store(tmp_path / "r", images, "random", structure, queries, classes)
    assert scores(rand, "refexp-seg", Target("values", 0, 0))["mIoU"] < 0.6
    assert scores(rand, "refexp-seg", Target("post_proj"))["mIoU"] < 0.6


@pytest.mark.parametrize("task, build", [("semantic-seg", semantic_images), ("refexp-seg", refexp_images)])
def test_text_probes_skip_post_proj_of_a_store_whose_text_queries_lack_it(tmp_path, task, build):
    """A store made before text queries had post_proj: keys and values are scored as before,
    post_proj is left out with a note naming the fix."""
    images, structure, queries, classes = build()
    old = write_toy_store(tmp_path / "old", images, "oracle", structure, queries, classes, text_post_proj=False)
    run = run_probe(old, task)
    kinds = {r["kind"] for r in run.table.to_pylist()}
    assert "post_proj" not in kinds and {"keys", "values"} <= kinds
    assert len(run.skipped) == 1 and run.skipped[0].startswith("post_proj:") and "re-extract" in run.skipped[0]
    assert json.loads((run.out_dir / "run.json").read_text())["skipped"] == run.skipped
    cached = run_probe(old, task)
    assert cached.cached and cached.skipped == run.skipped
    with pytest.raises(StoreError, match="have no post_proj") as err:
        FeatureStore.open(old).text("post_proj")
    assert "\n" not in str(err.value)


def test_refexp_metrics_by_hand(tmp_path):
    """One image, object 1 rows 1-2, object 2 row 4 (6 x 8 tokens). Sentence 0 of object 1 points
    at object 1 (IoU 1); sentence 1 points at object 2 (I = 0); object 2's sentence at object 2."""
    image = ToyImage("x", stripes({1: (1, 3), 2: (4, 5)}),
                     {"labels": {"1": 1, "2": 2}, "refs": [{"label": 1, "queries": [0, 1]},
                                                           {"label": 2, "queries": [2]}]})
    store = write_toy_store(tmp_path / "s", [image], "oracle", {}, ["a", "b", "c"], [1, 2, 2])
    got = scores(store, "refexp-seg", Target("values", 0, 0))
    # sentences: IoU 1, 0, 1 -> mIoU (mean over sentences, LAVT / CRIS) 2/3
    # per object: ref 1 mean(1, 0) = 0.5; ref 2: 1 -> mIoU_per_object 0.75
    # cIoU: I = 16 + 0 + 8 tokens, U = 16 + 24 + 8 tokens -> 24 / 48
    assert got["mIoU"] == pytest.approx(2 / 3)
    assert got["mIoU_per_object"] == pytest.approx(0.75)
    assert got["cIoU"] == pytest.approx(0.5)


# ------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def bare_store(tmp_path_factory):
    """Images with masks but no dataset structure and no text queries."""
    images, _ = fewshot_images()
    return write_toy_store(tmp_path_factory.mktemp("bare") / "s", images, "oracle", {})


@pytest.mark.parametrize("task, fragment", [
    ("fg-seg", "has no episodes; fg-seg needs a dataset with few-shot episodes"),
    ("cosegmentation", "has no image sets; cosegmentation needs"),
    ("semantic-seg", "has no class queries; semantic-seg needs"),
    ("refexp-seg", "has no referring expressions"),
])
def test_missing_structure_is_a_one_line_store_error(bare_store, task, fragment):
    with pytest.raises(StoreError, match=fragment) as err:
        run_probe(bare_store, task)
    assert "\n" not in str(err.value)


def test_text_probes_need_text_queries(tmp_path):
    images, structure, _, _ = semantic_images()
    store = write_toy_store(tmp_path / "s", images, "oracle", structure)  # class_queries, no text
    with pytest.raises(StoreError, match="has no text queries; semantic-seg needs"):
        run_probe(store, "semantic-seg")


def test_bad_parameters_are_usage_errors(tmp_path):
    images, structure = fewshot_images()
    store = write_toy_store(tmp_path / "s", images, "oracle", structure)
    with pytest.raises(UsageError, match=r"shots=6 is more than the 5 support images .* use shots <= 5") as err:
        run_probe(store, "fg-seg", {"shots": 6})
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="shots=0"):
        run_probe(store, "fg-seg", {"shots": 0})
    with pytest.raises(UsageError, match="no parameter topk"):
        run_probe(store, "fg-seg", {"topk": 3})
    images, structure, queries, classes = semantic_images()
    store = write_toy_store(tmp_path / "t", images, "oracle", structure, queries, classes)
    with pytest.raises(UsageError, match="threshold"):
        run_probe(store, "semantic-seg", {"threshold": 1.5})
    images, structure = coseg_images()
    store = write_toy_store(tmp_path / "c", images, "oracle", structure)
    with pytest.raises(UsageError, match="elbow=2"):
        run_probe(store, "cosegmentation", {"elbow": 2})


def test_cosegmentation_sets_in_threads_equal_one_set_at_a_time(tmp_path, monkeypatch):
    """The sets are clustered on several threads (each k-means on one faiss thread); every
    predicted mask equals the one-set-at-a-time run's, on random features where k-means is
    sensitive to any change in its inputs or thread count."""
    import kvpipe.probes.cosegmentation as cs

    images, structure = coseg_images()
    rand = write_toy_store(tmp_path / "r", images, "random", structure)
    probe = PROBES.get("cosegmentation")(FeatureStore.open(rand), {})
    assert len(probe.sets) >= 2
    runs = {}
    for workers in (1, 4):
        monkeypatch.setattr(cs, "host_workers", lambda n, w=workers: w)
        runs[workers] = [(r.image_id, m) for r, m in probe._predicted(Target("values", 0, 0))]
    assert [i for i, _ in runs[1]] == [i for i, _ in runs[4]]
    for (_, a), (_, b) in zip(runs[1], runs[4]):
        np.testing.assert_array_equal(a, b)
