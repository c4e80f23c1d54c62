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


def test_temporal_corr_device_metric_equals_the_host_metric(tmp_path, monkeypatch):
    """J and F counted on the device (``davis_torch``; here in torch on the CPU, the code a GPU
    runs) equal the host's (k-d tree) on the same propagated labels: exactly, batches of one
    frame and the ground truth's maps rebuilt per batch included."""
    import kvpipe.probes.temporal_corr as tc

    store = video_store(tmp_path / "s")
    device = run_probe(store, "temporal-corr", out_dir=tmp_path / "dev", use_cache=False, device="cpu")
    monkeypatch.setattr(tc, "metric_on_device", lambda ref: False)  # the labels to the host, J and F there
    host = run_probe(store, "temporal-corr", out_dir=tmp_path / "host", use_cache=False, device="cpu")
    assert_same_scores(device, host, tol=0)
    monkeypatch.undo()
    monkeypatch.setattr(tc, "reference_budget", lambda device: 0)  # nothing kept: rebuilt per batch
    monkeypatch.setattr(tc, "batch_budget", lambda device: 1)  # one frame per batch
    tight = run_probe(store, "temporal-corr", out_dir=tmp_path / "tight", use_cache=False, device="cpu")
    assert_same_scores(device, tight, tol=0)


@pytest.mark.parametrize("window", [2, 0, (1, 2)])
def test_propagation_deferred_tie_test_equals_the_per_block_test(window, monkeypatch):
    """``defer_ties`` (a GPU's default: no wait for the device per block) gives the labels of the
    per-block test; with exact ties among the affinities (features of a few integer values) it
    redoes the propagation with the per-block test."""
    import kvpipe.probes.propagation as prop

    rng = np.random.default_rng(1)
    h, w = 9, 12
    noisy = [[rng.standard_normal((h, w, 8)).astype(np.float32) for _ in range(n)] for n in (6, 9, 3)]
    tied = [[np.round(rng.standard_normal((h, w, 4))).astype(np.float32) for _ in range(n)] for n in (5, 7)]
    for videos, redone in ((noisy, False), (tied, True)):
        first = [prop.labels_to_grid(rng.integers(0, 4, (h, w)), (h, w), 4) for _ in videos]
        calls = []
        real = prop.propagate_videos_torch

        def counted(*args, **kw):
            calls.append(kw.get("defer_ties"))
            return real(*args, **kw)

        monkeypatch.setattr(prop, "propagate_videos_torch", counted)
        exact = counted(videos, first, device="cpu", size_mask_neighborhood=window, defer_ties=False)
        deferred = counted(videos, first, device="cpu", size_mask_neighborhood=window, defer_ties=True)
        monkeypatch.undo()
        assert all(torch.equal(a, b) for a, b in zip(exact, deferred))
        assert calls == ([False, True, False] if redone else [False, True])


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
