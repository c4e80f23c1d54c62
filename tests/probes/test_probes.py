"""Probes through the store with features that must succeed (oracle) or must fail (random)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes import run_probe
from kvpipe.store import FeatureSetMeta
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter

GH, GW, PATCH = 6, 8, 8  # token grid and pixels per token


def video_masks(n_frames: int, seed: int) -> list[np.ndarray]:
    """Two full-width stripes moving one token per frame, token-aligned, at PATCH px per token.

    Full-width stripes have no corners, so bilinear upsampling of perfect token labels
    reproduces the pixel mask exactly and oracle features must score J = F = 1.
    """
    rng = np.random.default_rng(seed)
    y0 = int(rng.integers(0, 2))
    out = []
    for t in range(n_frames):
        m = np.zeros((GH, GW), np.uint8)
        m[y0 + t % 2: y0 + t % 2 + 2] = 1
        m[4 + t % 2: 5 + t % 2] = 2
        out.append(np.kron(m, np.ones((PATCH, PATCH), np.uint8)))
    return out


def write_store(path: Path, features: str, n_videos: int = 2, n_frames: int = 5, heads: int = 2,
                layers: int = 2) -> Path:
    """A store whose head 0 carries `features` (oracle / random) and head 1 noise."""
    D = 8
    masks = [m for v in range(n_videos) for m in video_masks(n_frames, v)]
    meta = FeatureSetMeta(model={"name": "synthetic-features"}, dataset={"name": "toy", "tasks": []},
                          layers=tuple(range(layers)), heads=tuple(range(heads)),
                          kinds=("keys", "values", "post_proj"), keys_rope="post-rope", n_layers=layers,
                          n_kv_heads=heads, head_dim=D, hidden_size=D, compute_dtype="float32",
                          store_dtype="float32", template="none", prefix="", prefix_token_ids=(),
                          image_token_id=0, part_size=len(masks), n_images=len(masks), image_ids_sha256="t")
    rng = np.random.default_rng(0)
    rows, per_image = [], []
    seg = json.dumps([{"name": "base", "offset": 0, "rows": GH, "cols": GW, "newline": False}])
    for i, m in enumerate(masks):
        labels = m[::PATCH, ::PATCH].ravel()
        oracle = np.eye(D, dtype=np.float32)[labels] + 0.01 * rng.standard_normal((labels.size, D)).astype(np.float32)
        feat = oracle if features == "oracle" else rng.standard_normal((labels.size, D)).astype(np.float32)
        per_image.append(feat)
        rows.append(ImageRow(index=i, image_id=f"v{i // n_frames}/{i % n_frames}", part=0,
                             token_offset=i * GH * GW, n_tokens=GH * GW, grid_h=GH, grid_w=GW, segments=seg,
                             image_h=GH * PATCH, image_w=GW * PATCH, group=f"v{i // n_frames}",
                             frame=i % n_frames, mask_offset=i * m.size, mask_h=m.shape[0], mask_w=m.shape[1]))
    tokens = np.concatenate(per_image)  # [N, D]
    noise = rng.standard_normal((layers, heads) + tokens.shape).astype(np.float32)
    kv = noise.copy()
    kv[:, 0] = tokens
    w = StoreWriter.create_or_resume(path, meta)
    w.write_part(0, rows, {"keys": kv, "values": kv, "post_proj": tokens,
                           "masks": np.concatenate([m.ravel() for m in masks])})
    return path


def value(run, kind, layer, head, metric):
    return next(r["value"] for r in run.table.to_pylist()
                if (r["kind"], r["layer"], r["head"], r["metric"]) == (kind, layer, head, metric))


@pytest.mark.plots
def test_temporal_corr_oracle_and_random(tmp_path):
    # The stripes jump a whole token (80 px of the frame scaled to 480p) per frame; the default
    # 96 px window is one token here, so the window is widened to cover the grid.
    oracle = run_probe(write_store(tmp_path / "o", "oracle"), "temporal-corr", {"size_mask_neighborhood": 12})
    assert value(oracle, "values", 0, 0, "J_mean") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 0, "F_mean") == pytest.approx(1.0)
    assert value(oracle, "post_proj", -1, -1, "JF_mean") == pytest.approx(1.0)
    assert value(oracle, "values", 0, 1, "J_mean") < 0.8  # the noise head
    rand = run_probe(write_store(tmp_path / "r", "random"), "temporal-corr")
    assert value(rand, "values", 0, 0, "J_mean") < 0.8
    # (kinds x layers x heads + post-proj) x metrics, + the window in tokens (rows, cols: min, max)
    assert len(oracle.table) == (2 * 2 * 2 + 1) * 3 + 4
    assert {p.name for p in oracle.plots} == {"temporal-corr-keys-JF_mean.png", "temporal-corr-values-JF_mean.png"}


def test_probe_results_are_cached_by_parameters(tmp_path):
    store = write_store(tmp_path / "o", "oracle")
    first = run_probe(store, "temporal-corr")
    again = run_probe(store, "temporal-corr")
    other = run_probe(store, "temporal-corr", {"topk": 3})
    assert not first.cached and again.cached and not other.cached
    assert again.table.equals(first.table)


def test_unknown_parameter_is_refused(tmp_path):
    with pytest.raises(UsageError, match="no parameter shots"):
        run_probe(write_store(tmp_path / "o", "oracle"), "temporal-corr", {"shots": 5})


@pytest.mark.plots
def test_input_agnostic_separates_constant_heads(tmp_path):
    """Heads whose keys barely change across images are flagged; varying heads are not."""
    store = write_store(tmp_path / "r", "random", heads=4, layers=3)
    # make heads 2, 3 of every layer nearly input-independent
    from kvpipe.store import layout
    import zarr

    arr = zarr.open_array(zarr.storage.LocalStore(layout.part_dir(store, 0) / "keys"), mode="r+")
    keys = np.asarray(arr[...])
    rng = np.random.default_rng(1)
    n_img, n_tok = 10, GH * GW
    const = rng.standard_normal((n_tok, keys.shape[-1])).astype(np.float32) * 3
    for h in (2, 3):
        keys[:, h] = np.tile(const, (n_img, 1)) + 0.05 * rng.standard_normal((n_img * n_tok, keys.shape[-1]))
    arr[...] = keys
    from fixtures.store_equality import recommit_checksums

    recommit_checksums(store, 0)  # reads check every chunk's recorded CRC32C
    run = run_probe(store, "input-agnostic", {"threshold": None})
    flags = {(r["layer"], r["head"]): r["value"] for r in run.table.to_pylist() if r["metric"] == "input_agnostic"}
    assert all(flags[(l, h)] == (1.0 if h in (2, 3) else 0.0) for l in range(3) for h in range(4))
    var = {(r["layer"], r["head"]): r["value"] for r in run.table.to_pylist() if r["metric"] == "l2_variance"}
    assert var[(0, 0)] == pytest.approx(keys.shape[-1], rel=0.3)  # unit-variance noise: E||k - mean||^2 = D
    assert {p.name for p in run.plots} >= {"input-agnostic-histogram.png", "input-agnostic-heatmap.png"}
    fixed = run_probe(store, "input-agnostic", {"threshold": 1e9})
    assert all(r["value"] == 1.0 for r in fixed.table.to_pylist() if r["metric"] == "input_agnostic")


def test_temporal_corr_needs_videos(tmp_path):
    store = write_store(tmp_path / "o", "oracle", n_videos=2, n_frames=1)
    with pytest.raises(StoreError, match="no videos with a first-frame mask"):
        run_probe(store, "temporal-corr")
