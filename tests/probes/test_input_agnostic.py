"""input-agnostic: the PCA of two images' keys (paper Figure 4): math by hand and the PNG."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.input_agnostic import pca, pick_pca_layer
from kvpipe.store import layout

from fixtures.probe_stores import grid_segments, write_feature_store
from fixtures.store_equality import recommit_checksums


def test_pca_hand_case():
    # points on the line y = x (+ offset): one component, coordinates = signed distance from the mean
    x = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]]) + [5.0, -2.0]
    coords, ratio = pca(x)
    assert ratio == pytest.approx([1.0, 0.0], abs=1e-12)
    assert coords[:, 0] == pytest.approx([-np.sqrt(2), 0.0, np.sqrt(2)])
    assert coords[:, 1] == pytest.approx([0.0, 0.0, 0.0], abs=1e-12)
    # variances 9 along x and 1 along y: PC1 = x axis with ratio 0.9
    pts = np.array([[-3.0, 0.0], [3.0, 0.0], [0.0, -1.0], [0.0, 1.0]])
    coords, ratio = pca(pts)
    assert ratio == pytest.approx([0.9, 0.1])
    assert np.abs(coords) == pytest.approx(np.abs(pts))


def test_pca_matches_covariance_eigendecomposition():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((200, 6)) @ rng.standard_normal((6, 6))
    coords, ratio = pca(x, 3)
    evals, evecs = np.linalg.eigh(np.cov(x, rowvar=False, bias=True))
    order = np.argsort(evals)[::-1]
    assert coords.var(axis=0) == pytest.approx(evals[order[:3]], rel=1e-9)
    assert ratio == pytest.approx(evals[order[:3]] / evals.sum(), rel=1e-9)
    for k in range(3):  # same axes up to sign; the sign rule makes the largest loading positive
        v = evecs[:, order[k]]
        v = v * np.sign(v[np.argmax(np.abs(v))])
        assert coords[:, k] == pytest.approx((x - x.mean(0)) @ v, abs=1e-9)


def test_pick_pca_layer():
    heads = (0, 1, 2, 3)
    flags = {(l, h): False for l in range(4) for h in heads}
    flags.update({(0, h): True for h in heads})  # layer 0: all agnostic (nothing to contrast)
    flags.update({(1, 0): True, (3, 0): True, (3, 1): True, (2, 3): True, (2, 2): True})
    assert pick_pca_layer(flags, (0, 1, 2, 3), heads) == 3  # 2 + 2 split, latest of layers 2 and 3
    only = {(l, h): l == 1 for l in range(3) for h in heads}
    assert pick_pca_layer(only, (0, 1, 2), heads) == 1


def agnostic_store(path, n_images: int = 6):
    """2 layers x 4 heads; heads 2 and 3 of every layer nearly the same in every image."""
    rng = np.random.default_rng(7)
    gh, gw, dim = 4, 5, 8
    images = [{"id": f"v{i % 2}/{i // 2}", "h": 40, "w": 50, "segments": grid_segments(gh, gw),
               "feat": rng.standard_normal((gh * gw, dim)).astype(np.float32), "group": f"v{i % 2}",
               "frame": i // 2} for i in range(n_images)]
    store = write_feature_store(path, images, {}, layers=2, heads=4, tasks=("input-agnostic",))
    arr = zarr.open_array(zarr.storage.LocalStore(layout.part_dir(store, 0) / "keys"), mode="r+")
    keys = np.asarray(arr[...])
    const = 3 * rng.standard_normal((gh * gw, dim))
    for h in (2, 3):
        keys[:, h] = np.tile(const, (n_images, 1)) + 0.05 * rng.standard_normal((n_images * gh * gw, dim))
    arr[...] = keys
    recommit_checksums(store, 0)  # reads check every chunk's recorded CRC32C
    return store


@pytest.mark.plots
def test_input_agnostic_writes_the_pca_figure(tmp_path):
    store = agnostic_store(tmp_path / "s")
    run = run_probe(store, "input-agnostic")
    png = run.out_dir / "input-agnostic-keys-pca.png"
    assert png in run.plots and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = {(r["metric"], r["layer"], r["head"]): r["value"] for r in run.table.to_pylist()}
    assert rows[("pca_layer", -1, -1)] == 1.0  # both layers split 2/2: the later one
    assert [rows[("input_agnostic", 1, h)] for h in range(4)] == [0.0, 0.0, 1.0, 1.0]
    chosen = run_probe(store, "input-agnostic", {"pca_layer": 0, "pca_images": ["v0/0", "v0/1"]}, use_cache=False)
    assert ("pca_layer", -1, -1) in {(r["metric"], r["layer"], r["head"]) for r in chosen.table.to_pylist()}
    with pytest.raises(UsageError, match="pca_images"):
        run_probe(store, "input-agnostic", {"pca_images": ["v0/0"]})
    with pytest.raises(UsageError, match="pca_layer"):
        run_probe(store, "input-agnostic", {"pca_layer": 7})
