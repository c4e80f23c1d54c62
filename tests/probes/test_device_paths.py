"""The torch device path of each probe (run on the CPU, device="cpu") against the numpy
reference (device="numpy"): the same scores on the test stores.

temporal-corr: propagation in float64 on both paths; the soft labels are upsampled in float32
on the device and in float64 by the reference, so a pixel whose two best classes are within
float32 rounding of each other may flip (3 of 2 million pixels on random soft labels, none on
these stores); the tolerance is 1e-6 on J and F. semantic-corr: float32 products on both, in a
different summation order, so an exact tie between two candidates could resolve differently (none
on these stores). semantic-seg, refexp-seg, input-agnostic: float64 on both paths.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.device import DeviceMemoryError, resolve_device

from fixtures.probe_stores import grid_segments, refexp_images, semantic_images, write_feature_store, write_toy_store

torch = pytest.importorskip("torch")


def rows_by_key(run):
    return {(r["kind"], r["layer"], r["head"], r["metric"]): r["value"] for r in run.table.to_pylist()}


def assert_same_scores(a, b, tol=1e-6):
    ra, rb = rows_by_key(a), rows_by_key(b)
    assert ra.keys() == rb.keys()
    for key, value in ra.items():
        assert value == pytest.approx(rb[key], abs=tol, nan_ok=True), key


def video_store(path, grid=(9, 12), mask_hw=(72, 96), lengths=(6, 9, 3), seed=0):
    """Videos of random blob objects (labels 1..3, some void) whose head-0 features are the
    token's label one-hot plus strong noise (propagation neither perfect nor chance)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for v, n_frames in enumerate(lengths):
        field = ndimage.gaussian_filter(rng.standard_normal((4, *mask_hw)), (0, 8, 8))
        for t in range(n_frames):
            m = np.roll(field, (2 * t, 3 * t), axis=(1, 2)).argmax(0).astype(np.uint8)
            m[rng.random(mask_hw) < 0.001] = 255
            tok = m[:: mask_hw[0] // grid[0], :: mask_hw[1] // grid[1]][: grid[0], : grid[1]] % 4
            feat = np.eye(8, dtype=np.float32)[tok.ravel()] + 0.7 * rng.standard_normal((tok.size, 8)).astype(np.float32)
            images.append({"id": f"v{v}/{t:03d}", "h": mask_hw[0], "w": mask_hw[1], "group": f"v{v}", "frame": t,
                           "segments": grid_segments(*grid), "feat": feat})
            masks.append(m)
    return write_feature_store(path, images, {}, layers=2, heads=2, tasks=("temporal-corr",), masks=masks)


@pytest.mark.parametrize("params", [{}, {"size_mask_neighborhood": 0}, {"n_last_frames": 2, "topk": 3}])
def test_temporal_corr_device_path_equals_the_reference(tmp_path, params):
    store = video_store(tmp_path / "s")
    ref = run_probe(store, "temporal-corr", params, tmp_path / "ref", use_cache=False, device="numpy")
    dev = run_probe(store, "temporal-corr", params, tmp_path / "dev", use_cache=False, device="cpu")
    assert_same_scores(ref, dev)
    assert json.loads((tmp_path / "dev" / "run.json").read_text())["device"] == "cpu"
    assert json.loads((tmp_path / "ref" / "run.json").read_text())["device"] == "numpy"


def pair_store(path, n_images=12, n_pairs=30, grid=(6, 7), seed=0):
    rng = np.random.default_rng(seed)
    images = [{"id": f"im{i}", "h": int(rng.integers(40, 90)), "w": int(rng.integers(40, 90)),
               "segments": grid_segments(*grid), "feat": rng.standard_normal((grid[0] * grid[1], 16))}
              for i in range(n_images)]
    pairs = []
    for _ in range(n_pairs):
        s, t = rng.choice(n_images, 2, replace=False)
        k = int(rng.integers(2, 9))
        (hs, ws), (ht, wt) = (images[s]["h"], images[s]["w"]), (images[t]["h"], images[t]["w"])
        pairs.append({"source": f"im{s}", "target": f"im{t}",
                      "source_kps": np.c_[rng.uniform(0, ws, k), rng.uniform(0, hs, k)].tolist(),
                      "target_kps": np.c_[rng.uniform(0, wt, k), rng.uniform(0, ht, k)].tolist(),
                      "target_bbox": [0, 0, wt * 0.8, ht * 0.7], "category": "c"})
    return write_feature_store(path, images, {"pairs": pairs}, layers=2, heads=2)


def test_semantic_corr_device_search_equals_the_reference(tmp_path):
    store = pair_store(tmp_path / "s")
    ref = run_probe(store, "semantic-corr", {"search": "numpy"}, tmp_path / "ref", use_cache=False, device="numpy")
    dev = run_probe(store, "semantic-corr", {"search": "torch"}, tmp_path / "dev", use_cache=False, device="cpu")
    assert_same_scores(ref, dev, tol=0)


def test_text_grounded_probes_device_path_equals_the_reference(tmp_path):
    for task, build in (("semantic-seg", semantic_images), ("refexp-seg", refexp_images)):
        images, structure, queries, classes = build()
        for features in ("oracle", "random"):
            store = write_toy_store(tmp_path / f"{task}-{features}", images, features, structure, queries, classes)
            ref = run_probe(store, task, out_dir=tmp_path / f"{task}-{features}-ref", use_cache=False, device="numpy")
            dev = run_probe(store, task, out_dir=tmp_path / f"{task}-{features}-dev", use_cache=False, device="cpu")
            assert_same_scores(ref, dev, tol=1e-9)


def test_key_variance_device_path_equals_the_reference(tmp_path):
    store = video_store(tmp_path / "s")
    for estimator in ("position", "pooled"):
        ref = run_probe(store, "input-agnostic", {"estimator": estimator}, tmp_path / f"r{estimator}",
                        use_cache=False, device="numpy")
        dev = run_probe(store, "input-agnostic", {"estimator": estimator}, tmp_path / f"d{estimator}",
                        use_cache=False, device="cpu")
        ra, rd = rows_by_key(ref), rows_by_key(dev)
        assert ra.keys() == rd.keys()
        for key, value in ra.items():
            assert value == pytest.approx(rd[key], rel=1e-12), key


# ------------------------------------------------------------------------------- bad input
def test_cuda_without_a_gpu_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="torch sees no CUDA device") as err:
        resolve_device("cuda")
    assert "\n" not in str(err.value)
    assert resolve_device("auto") == "cpu"
    with pytest.raises(UsageError, match="not a device"):
        resolve_device("tpu")


def test_out_of_memory_retries_in_smaller_batches_then_one_line(tmp_path, monkeypatch):
    import kvpipe.probes.temporal_corr as tc

    store = video_store(tmp_path / "s", lengths=(4, 3))
    reference = run_probe(store, "temporal-corr", out_dir=tmp_path / "ref", use_cache=False, device="cpu")
    real, budgets = tc.propagate_videos_torch, []

    def tight(*args, budget, **kw):  # only a quarter of the first budget fits
        budgets.append(budget)
        if budget > 2**27:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args, budget=budget, **kw)

    monkeypatch.setattr(tc, "batch_budget", lambda device: 2**30)
    monkeypatch.setattr(tc, "propagate_videos_torch", tight)
    again = run_probe(store, "temporal-corr", out_dir=tmp_path / "again", use_cache=False, device="cpu")
    assert_same_scores(reference, again, tol=0)
    assert budgets[0] == 2**30 and min(budgets) == 2**26

    def never(*args, **kw):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(tc, "propagate_videos_torch", never)
    with pytest.raises(DeviceMemoryError, match="does not fit in the memory") as err:
        run_probe(store, "temporal-corr", out_dir=tmp_path / "oom", use_cache=False, device="cpu")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "oom" / "results.parquet").exists()


def fewshot_store(path, n_images=14, seed=0):
    """Images of different token grids (some with a crops row before the base grid, some with
    newline tokens) and mask sizes, labels 1 and 2 with void (255) pixels, features = the token's
    class one-hot plus strong noise; episodes of a query and 5 supports of its class."""
    rng = np.random.default_rng(seed)
    images, masks, by_class = [], [], {1: [], 2: []}
    for i in range(n_images):
        gh, gw = int(rng.integers(4, 8)), int(rng.integers(4, 8))
        mh, mw = int(rng.integers(30, 70)), int(rng.integers(30, 70))
        field = ndimage.gaussian_filter(rng.standard_normal((3, mh, mw)), (0, 6, 6))
        m = field.argmax(0).astype(np.uint8)
        m[rng.random((mh, mw)) < 0.02] = 255
        newline, lead = i % 3 == 0, 3 if i % 4 == 1 else 0
        width = gw + int(newline)
        tok = m[((np.arange(gh) + 0.5) * mh // gh).astype(int)][:, ((np.arange(gw) + 0.5) * mw // gw).astype(int)]
        cls = np.where(tok == 255, 0, tok)
        feat = np.zeros((lead + (1 if lead else 0) + gh * width, 12), np.float32)
        grid = np.eye(12, dtype=np.float32)[cls] + 1.2 * rng.standard_normal((gh, gw, 12)).astype(np.float32)
        base = feat[lead + (1 if lead else 0):].reshape(gh, width, 12)
        base[:, :gw] = grid
        if newline:
            base[:, gw:] = 7.0  # newline tokens: never read
        segs = [{"name": "base", "offset": lead + 1 if lead else 0, "rows": gh, "cols": gw, "newline": newline}]
        if lead:
            segs.insert(0, {"name": "crops", "offset": 0, "rows": 1, "cols": lead, "newline": True})
        images.append({"id": f"im{i:02d}", "h": mh, "w": mw, "segments": segs, "feat": feat})
        masks.append(m)
        for c in (1, 2):
            if (m == c).any():
                by_class[c].append(f"im{i:02d}")
    episodes = []
    for c, ids in by_class.items():
        for j, q in enumerate(ids):
            others = [ids[(j + k) % len(ids)] for k in range(1, 6)]
            episodes.append({"query": q, "support": others, "class": c})
    return write_feature_store(path, images, {"episodes": episodes}, layers=1, heads=2, tasks=("fg-seg",),
                               masks=masks)


@pytest.mark.parametrize("small", [False, True])
def test_fg_seg_device_path_equals_the_reference(tmp_path, monkeypatch, small):
    """Several batches of episodes, several chunks of queries per batch (padded to their largest
    grid and mask), grids with newline tokens and crops before them: the same scores and masks."""
    import kvpipe.probes.fg_seg as fg
    from kvpipe.probes.base import PROBES, Target
    from kvpipe.store.reader import FeatureStore

    store = fewshot_store(tmp_path / "s")
    if small:
        monkeypatch.setattr(fg, "BATCH_BYTES", 6 * 40 * 13 * 4)  # about 6 episodes per batch
        monkeypatch.setattr(fg, "batch_budget", lambda device: 2 * 3 * 40000)  # a few queries per chunk
    ref = run_probe(store, "fg-seg", out_dir=tmp_path / "ref", use_cache=False, device="numpy")
    dev = run_probe(store, "fg-seg", out_dir=tmp_path / "dev", use_cache=False, device="cpu")
    assert_same_scores(ref, dev, tol=1e-12)
    miou = rows_by_key(ref)[("values", 0, 0, "mIoU")]
    assert 0.1 < miou < 0.95  # neither nothing nor perfect: the comparison means something
    opened = FeatureStore.open(store)
    a = PROBES.get("fg-seg")(opened, {}, device="numpy").predictions(Target("values", 0, 0))
    b = PROBES.get("fg-seg")(opened, {}, device="cpu").predictions(Target("values", 0, 0))
    assert [i.name for i in a.items] == [i.name for i in b.items]
    for x, y in zip(a.items, b.items):
        assert np.array_equal(x.labels, y.labels), x.name
