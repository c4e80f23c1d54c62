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
from kvpipe.store import FeatureStore

from fixtures.probe_stores import (grid_segments, refexp_images, seg_stores, semantic_images, write_feature_store,
                                   write_toy_store)

torch = pytest.importorskip("torch")


def rows_by_key(run):
    return {(r["kind"], r["layer"], r["head"], r["metric"]): r["value"] for r in run.table.to_pylist()}


def assert_same_scores(a, b, tol=1e-6):
    ra, rb = rows_by_key(a), rows_by_key(b)
    assert ra.keys() == rb.keys()
    for key, value in ra.items():
        assert value == pytest.approx(rb[key], abs=tol, nan_ok=True), key


def video_store(path, grid=(9, 12), mask_hw=(72, 96), lengths=(6, 9, 3), n_labels=(4, 3, 4), seed=0,
                store_dtype="float32"):
    """Videos of random blob objects (labels 1..3 or 1..2: videos differ in their number of
    objects, as DAVIS's do; some void) whose head-0 features are the token's label one-hot plus
    strong noise (propagation neither perfect nor chance)."""
    rng = np.random.default_rng(seed)
    images, masks = [], []
    for v, (n_frames, labels) in enumerate(zip(lengths, n_labels)):
        field = ndimage.gaussian_filter(rng.standard_normal((labels, *mask_hw)), (0, 8, 8))
        for t in range(n_frames):
            m = np.roll(field, (2 * t, 3 * t), axis=(1, 2)).argmax(0).astype(np.uint8)
            m[rng.random(mask_hw) < 0.001] = 255
            tok = m[:: mask_hw[0] // grid[0], :: mask_hw[1] // grid[1]][: grid[0], : grid[1]] % 4
            feat = np.eye(8, dtype=np.float32)[tok.ravel()] + 0.7 * rng.standard_normal((tok.size, 8)).astype(np.float32)
            images.append({"id": f"v{v}/{t:03d}", "h": mask_hw[0], "w": mask_hw[1], "group": f"v{v}", "frame": t,
                           "segments": grid_segments(*grid), "feat": feat})
            masks.append(m)
    return write_feature_store(path, images, {}, layers=2, heads=2, tasks=("temporal-corr",), masks=masks,
                               store_dtype=store_dtype)


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


def pair_store(path, n_images=12, n_pairs=30, grid=(6, 7), seed=0, store_dtype="float32"):
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
    return write_feature_store(path, images, {"pairs": pairs}, layers=2, heads=2, store_dtype=store_dtype)


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


def mixed_size_text_store(path, task, seed=0, store_dtype="float32"):
    """Images of three grids (one with a newline token per row) and many mask sizes, random
    features: semantic-seg images show 1-3 classes (classes 1 and 4 share a query, so their
    maps tie and the first must win), refexp-seg images 1-3 objects with 1-3 sentences each."""
    rng = np.random.default_rng(seed)
    dim, images, masks, queries = 12, [], [], []
    if task == "semantic-seg":
        queries = ["cat", "dog", "car"]
        structure = {"classes": ["background", "cat", "dog", "car", "kitten"],
                     "class_queries": {"1": 0, "2": 1, "3": 2, "4": 0}}
    else:
        structure = {"classes": ["background", "thing"]}
    for i in range(14):
        gh, gw = [(5, 6), (4, 4), (6, 7)][i % 3]
        segments = grid_segments(gh, gw)
        if i % 3 == 2:  # a newline token after every row, dropped by the grid read
            segments = [{"name": "base", "offset": 0, "rows": gh, "cols": gw, "newline": True}]
        n_tok = gh * (gw + int(segments[0]["newline"]))
        h, w = int(rng.integers(17, 60)), int(rng.integers(17, 60))
        k = 1 + i % 3
        yy, xx = np.mgrid[:h, :w]
        m = np.zeros((h, w), np.uint8)
        for label in range(1, k + 1):
            cy, cx, r = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w, rng.uniform(0.15, 0.4) * min(h, w)
            m[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = label
        m[rng.random((h, w)) < 0.03] = 255
        if task == "semantic-seg":
            classes = [[1], [2, 3], [1, 4, 2]][i % 3]
            meta = {"labels": {str(j + 1): c for j, c in enumerate(classes[:k])}}
        else:
            refs = []
            for label in range(1, k + 1):
                refs.append({"label": label, "queries": list(range(len(queries), len(queries) + 1 + (i + label) % 3))})
                queries += [f"image {i} object {label} sentence {s}" for s in range(len(refs[-1]["queries"]))]
            meta = {"labels": {str(j): j for j in range(1, k + 1)}, "refs": refs}
        images.append({"id": f"im{i}", "h": h, "w": w, "segments": segments, "meta": meta,
                       "feat": rng.standard_normal((n_tok, dim)).astype(np.float32)})
        masks.append(m)
    text = (queries, rng.standard_normal((len(queries), dim)).astype(np.float32))
    return write_feature_store(path, images, structure, layers=1, heads=2, tasks=(task,), masks=masks, text=text,
                               store_dtype=store_dtype)


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("task", ["semantic-seg", "refexp-seg"])
def test_text_grounded_batches_of_mixed_sizes_equal_the_reference(tmp_path, monkeypatch, task, device):
    """Images of different grids, mask sizes and query counts in one batch (padded), several
    batches per target: every image's predicted masks and every score equal the reference's."""
    import kvpipe.probes.grounding as grounding
    from kvpipe.probes.base import PROBES

    store = mixed_size_text_store(tmp_path / "s", task)
    ref = PROBES.get(task)(FeatureStore.open(store), {}, device="numpy")
    dev = PROBES.get(task)(FeatureStore.open(store), {}, device=device)
    items = dev.grounded()
    budget = 3 * grounding.item_bytes((6, 7), 3, (60, 60), 12)
    batches = grounding.plan_batches(items, 12, budget)
    assert 2 < len(batches) < len(items)
    assert any(len({items[i].truth.shape for i in b}) > 1 for b in batches)  # padded masks
    assert any(len({len(items[i].queries) for i in b}) > 1 for b in batches)  # padded queries
    monkeypatch.setattr(grounding, "batch_budget", lambda device: budget)
    for target in ref.targets():
        assert dev.compute(target, dev.read(target)) == ref.compute(target, ref.read(target)), target
        got, want = dev.predictions(target).items, ref.predictions(target).items
        assert [(g.name, g.info) for g in got] == [(w.name, w.info) for w in want]
        for g, w in zip(got, want):
            assert g.labels.dtype == w.labels.dtype and g.labels.shape == w.labels.shape
            np.testing.assert_array_equal(g.labels, w.labels, err_msg=f"{target} {g.name}")


def test_text_grounded_out_of_memory_retries_in_smaller_batches(tmp_path, monkeypatch):
    import kvpipe.probes.grounding as grounding

    store = mixed_size_text_store(tmp_path / "s", "refexp-seg")
    reference = run_probe(store, "refexp-seg", out_dir=tmp_path / "ref", use_cache=False, device="numpy")
    real, budgets = grounding.grounded_torch, []

    def tight(*args):  # only a quarter of the first budget fits
        budgets.append(args[6])
        if args[6] > 2**27:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return real(*args)

    monkeypatch.setattr(grounding, "batch_budget", lambda device: 2**29)
    monkeypatch.setattr(grounding, "grounded_torch", tight)
    again = run_probe(store, "refexp-seg", out_dir=tmp_path / "again", use_cache=False, device="cpu")
    assert_same_scores(reference, again, tol=0)
    assert budgets[0] == 2**29 and min(budgets) == 2**27


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


def fewshot_store(path, n_images=14, seed=0, store_dtype="float32"):
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
                               masks=masks, store_dtype=store_dtype)


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


@pytest.mark.parametrize("task, store_of, params", [("fg-seg", fewshot_store, {}),
                                                     ("semantic-corr", pair_store, {"search": "torch"}),
                                                     ("temporal-corr", video_store, {})])
def test_features_decoded_on_the_device_give_the_same_scores(tmp_path, monkeypatch, task, store_of, params):
    """The probes that take a target's features as one tensor read them decoded on their device
    (on a GPU; here the CPU stands in): the same scores as the reference."""
    from kvpipe.probes.base import Probe
    from kvpipe.store.reader import FeatureStore

    store = store_of(tmp_path / "s")
    ref = run_probe(store, task, dict(params, search="numpy") if params else {}, tmp_path / "ref", use_cache=False,
                    device="numpy")
    devices, read = [], FeatureStore.read

    def spy(self, *args, device=None, **kw):
        devices.append(device)
        return read(self, *args, device=device, **kw)

    monkeypatch.setattr(FeatureStore, "read", spy)
    monkeypatch.setattr(Probe, "decode_on", lambda self: "cpu")
    dev = run_probe(store, task, params, tmp_path / "dev", use_cache=False, device="cpu")
    assert devices and set(devices) == {"cpu"}  # every target was decoded by the device decoder
    assert_same_scores(ref, dev, tol=1e-12 if task != "temporal-corr" else 1e-6)



def coseg_store(path, store_dtype="float32"):
    return next(p for p in seg_stores(path, "random", store_dtype) if p.endswith("cosegmentation"))


@pytest.mark.parametrize("task, store_of, params, device", [
    ("fg-seg", fewshot_store, {}, "numpy"), ("fg-seg", fewshot_store, {}, "cpu"),
    ("semantic-corr", pair_store, {"search": "numpy"}, "numpy"), ("semantic-corr", pair_store, {"search": "torch"}, "cpu"),
    ("temporal-corr", video_store, {}, "numpy"), ("temporal-corr", video_store, {}, "cpu"),
    ("cosegmentation", coseg_store, {}, "numpy"),
    ("input-agnostic", video_store, {}, "numpy"), ("input-agnostic", video_store, {"estimator": "pooled"}, "cpu"),
    ("semantic-seg", lambda p, **kw: mixed_size_text_store(p, "semantic-seg", **kw), {}, "numpy"),
    ("refexp-seg", lambda p, **kw: mixed_size_text_store(p, "refexp-seg", **kw), {}, "cpu")])
def test_rotation_invariant_probes_read_int4_in_its_stored_basis(tmp_path, monkeypatch, task, store_of, params,
                                                                 device):
    """A probe whose scores see features only through inner products reads an int4 store in its
    rotated basis (no inverse rotation; text queries rotated alike): the scores of the model's
    vectors. The torch paths ("cpu") decode on the device, as on a GPU. temporal-corr: equal in
    exact arithmetic, but its bilinearly upsampled soft labels tie exactly between tokens, and a
    tie's argmax follows float32 rounding: 5 of 124,416 pixels differ here, J within 2e-5."""
    from kvpipe.probes.base import PROBES, Probe

    assert PROBES.get(task).rotation_invariant
    store = store_of(tmp_path / "s", store_dtype="int4")
    bases, read = [], FeatureStore.read

    def spy(self, *args, basis="model", **kw):
        bases.append(basis)
        return read(self, *args, basis=basis, **kw)

    monkeypatch.setattr(FeatureStore, "read", spy)
    if device == "cpu":
        monkeypatch.setattr(Probe, "decode_on", lambda self: "cpu")
    stored = run_probe(store, task, params, tmp_path / "stored", use_cache=False, device=device)
    assert bases and set(bases) == {"stored"}
    monkeypatch.setattr(Probe, "read_basis", lambda self: "model")
    model = run_probe(store, task, params, tmp_path / "model", use_cache=False, device=device)
    assert set(bases[bases.index("model"):]) == {"model"}
    assert_same_scores(stored, model, tol=1e-4 if task == "temporal-corr" else 1e-6)

def test_host_workers_one_per_core_on_the_host_one_on_a_gpu(monkeypatch):
    import kvpipe.probes.device as probe_device

    monkeypatch.setattr(probe_device.os, "cpu_count", lambda: 24)
    assert [probe_device.host_workers(n) for n in (0, 3, 40)] == [1, 3, 16]
    assert probe_device.host_workers(40, "cpu") == 16 and probe_device.host_workers(40, "cuda:1") == 1
