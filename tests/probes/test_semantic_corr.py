"""semantic-corr: hand-computed PCK, oracle features (PCK 1) and random features (chance)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError
from kvpipe.probes import run_probe
from kvpipe.probes.neighbours import l2_normalise, nearest_in_groups
from kvpipe.probes.semantic_corr import (bbox_threshold, chance_pck, correct_keypoints, pck_scores,
                                         pixel_to_token, token_centre)

from fixtures.probe_stores import HAND_S, grid_segments, hand_store, write_feature_store


def value(run, kind, layer, head, metric):
    return next(r["value"] for r in run.table.to_pylist()
                if (r["kind"], r["layer"], r["head"], r["metric"]) == (kind, layer, head, metric))


# ------------------------------------------------------------------------------ geometry
def test_pixel_token_mapping_hand_cases():
    # 20 px wide, 2 tokens: token 0 covers x in [-0.5, 9.5), token 1 [9.5, 19.5]
    rc = pixel_to_token([[9.4, 0], [9.5, 0], [0, 19.4], [19, 19.5], [-3, 50]], (20, 20), (2, 2))
    assert rc.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [1, 0]]  # out of range clips
    xy = token_centre([[0, 0], [1, 1], [0, 1]], (40, 20), (2, 2))  # 10 px wide, 20 px tall tokens
    assert xy.tolist() == [[4.5, 9.5], [14.5, 29.5], [14.5, 9.5]]
    # a token's centre maps back to the token, at any scale
    rng = np.random.default_rng(0)
    for _ in range(20):
        hw, g = tuple(rng.integers(30, 500, 2)), tuple(rng.integers(2, 40, 2))
        cells = np.stack([rng.integers(0, g[0], 50), rng.integers(0, g[1], 50)], 1)
        assert (pixel_to_token(token_centre(cells, hw, g), hw, g) == cells).all()


def test_pck_rules_hand_cases():
    assert bbox_threshold([2, 2, 12, 17]) == 15.0
    ok = correct_keypoints([[0, 0], [3, 4], [3, 4.1]], [[0, 0], [0, 0], [0, 0]], [50, 50, 50], 0.1)
    assert ok.tolist() == [True, True, False]  # distance 5 <= 0.1 * 50 counts (<=, as DHPF/CATs/DIFT)
    s = pck_scores(np.array([1, 0, 1, 1]), np.array([0, 0, 0, 1]), 2)
    assert s["pck"] == pytest.approx(0.75) and s["pck_per_image"] == pytest.approx((2 / 3 + 1) / 2)


def test_nearest_backends_agree():
    rng = np.random.default_rng(3)
    bases = [l2_normalise(rng.standard_normal((n, 16))) for n in (30, 7, 50)]
    group = rng.integers(0, 3, 40)
    q = l2_normalise(rng.standard_normal((40, 16)))
    want = np.array([np.argmax(bases[g] @ x) for g, x in zip(group, q)])
    for backend in ("numpy", "faiss", "torch", "auto"):
        idx, sim = nearest_in_groups(q, group, bases, backend=backend)
        assert (idx == want).all(), backend
        assert np.allclose(sim, [bases[g][i] @ x for g, i, x in zip(group, idx, q)], atol=1e-5)


def test_torch_search_batches_groups_like_one_batch(monkeypatch):
    """Groups of very different sizes split over several padded batches give the same answers."""
    from kvpipe.probes import neighbours

    rng = np.random.default_rng(4)
    bases = [l2_normalise(rng.standard_normal((n, 8))) for n in (3, 40, 1, 17, 9)]
    group = np.array([4, 0, 1, 1, 3, 4, 2, 0, 3, 3])  # every group but none empty; order shuffled
    q = l2_normalise(rng.standard_normal((len(group), 8)))
    want = nearest_in_groups(q, group, bases, backend="numpy")
    monkeypatch.setattr(neighbours, "_TORCH_BATCH_BYTES", 40 * 8 * 4)  # about one group per batch
    got = nearest_in_groups(q, group, bases, backend="torch")
    assert (got[0] == want[0]).all() and np.allclose(got[1], want[1], atol=1e-6)
    with pytest.raises(ValueError, match="no base vectors"):
        nearest_in_groups(q, group, bases[:2] + [np.zeros((0, 8), np.float32)] + bases[3:], backend="torch")


@pytest.mark.plots
def test_hand_computed_pck(tmp_path):
    store = hand_store(tmp_path / "hand")
    run = run_probe(store, "semantic-corr")
    for kind, layer, head in (("values", 0, 0), ("keys", 0, 0), ("post_proj", -1, -1)):
        assert value(run, kind, layer, head, "pck") == pytest.approx(0.75)
        assert value(run, kind, layer, head, "pck_per_image") == pytest.approx((2 / 3 + 1) / 2)
    assert value(run, "dataset", -1, -1, "n_pairs") == 2
    assert value(run, "dataset", -1, -1, "n_keypoints") == 4
    assert value(run, "dataset", -1, -1, "n_pairs_skipped") == 1
    # own-token centres: (14.5, 9.5) 2.0 ok, (14.5, 29.5) 4.5 > 3, (14.5, 29.5) 2.92 ok; (4.5, 14.5) 1.12 ok
    assert value(run, "dataset", -1, -1, "pck_token_ceiling") == pytest.approx(0.75)
    wider = run_probe(store, "semantic-corr", {"alpha": 0.2})  # radii 6 and 3: all four correct
    assert value(wider, "values", 0, 0, "pck") == pytest.approx(1.0)
    assert {p.name for p in run.plots} == {"semantic-corr-keys-pck.png", "semantic-corr-values-pck.png"}


def test_no_pairs_is_a_one_line_store_error(tmp_path):
    images = [{"id": "s", "h": 20, "w": 20, "segments": grid_segments(2, 2), "feat": HAND_S}]
    store = write_feature_store(tmp_path / "nopairs", images, {})
    with pytest.raises(StoreError, match="no keypoint pairs") as err:
        run_probe(store, "semantic-corr")
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------ oracle / random
GH, GW, BH, BW = 12, 16, 6, 8  # token grid; object box size in tokens (same in every image)


def object_images(n: int, features: str, seed: int) -> tuple[list[dict], list[tuple[int, int, int]]]:
    """Images of two pixel scales (16 and 8 px per token); each has its object box at (r0, c0).

    Oracle features encode a token's position relative to the box as angles (period 4x the
    grid, so no two offsets alias): the matching token of another image has the same feature,
    every other token a smaller cosine. Type-B images put a crop segment before the base grid.
    """
    rng = np.random.default_rng(seed)
    images, boxes = [], []
    for i in range(n):
        patch = 16 if i % 2 == 0 else 8
        r0, c0 = int(rng.integers(0, GH - BH + 1)), int(rng.integers(0, GW - BW + 1))
        rr, cc = np.meshgrid(np.arange(GH), np.arange(GW), indexing="ij")
        u, v = 2 * np.pi * (rr - r0) / (4 * GH), 2 * np.pi * (cc - c0) / (4 * GW)
        if features == "oracle":
            base = np.stack([np.cos(u), np.sin(u), np.cos(v), np.sin(v), 0 * u, 0 * u], -1).reshape(-1, 6)
            base = base + 1e-4 * rng.standard_normal(base.shape)
        else:
            base = rng.standard_normal((GH * GW, 6))
        lead = 0 if patch == 16 else 3
        feat = np.concatenate([rng.standard_normal((lead + 1, 6)) if lead else np.zeros((0, 6)), base])
        images.append({"id": f"img{i:02d}", "h": GH * patch, "w": GW * patch, "segments": grid_segments(GH, GW, lead),
                       "feat": feat.astype(np.float32)})
        boxes.append((r0, c0, patch))
    return images, boxes


def object_pairs(boxes, n_pairs: int, kps_per_pair: int, seed: int) -> list[dict]:
    """Keypoints anywhere inside a box token of the source; the target keypoint within 0.4 token
    of the matching token's centre, so the oracle's prediction is off by < 0.57 token < 0.8 token
    = 0.1 * max box side."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(n_pairs):
        s, t = rng.choice(len(boxes), 2, replace=False)
        (rs, cs, ps), (rt, ct, pt) = boxes[s], boxes[t]
        cells = np.stack([rng.integers(0, BH, kps_per_pair), rng.integers(0, BW, kps_per_pair)], 1)
        src = (np.array([cs, rs]) + cells[:, ::-1]) * ps - 0.5 + rng.uniform(0.01, 0.99, (kps_per_pair, 2)) * ps
        tgt = (np.array([ct, rt]) + cells[:, ::-1] + 0.5) * pt - 0.5 + rng.uniform(-0.4, 0.4, (kps_per_pair, 2)) * pt
        bbox = [ct * pt - 0.5, rt * pt - 0.5, (ct + BW) * pt - 0.5, (rt + BH) * pt - 0.5]
        pairs.append({"source": f"img{s:02d}", "target": f"img{t:02d}", "source_kps": src.round(2).tolist(),
                      "target_kps": tgt.round(2).tolist(), "target_bbox": bbox, "category": "obj"})
    return pairs


def test_oracle_features_give_pck_one(tmp_path):
    images, boxes = object_images(8, "oracle", seed=1)
    store = write_feature_store(tmp_path / "oracle", images, {"pairs": object_pairs(boxes, 12, 6, seed=2)},
                                layers=2, heads=2)
    run = run_probe(store, "semantic-corr")
    assert value(run, "values", 0, 0, "pck") == 1.0 and value(run, "keys", 1, 0, "pck_per_image") == 1.0
    assert value(run, "post_proj", -1, -1, "pck") == 1.0
    assert value(run, "values", 0, 1, "pck") < 0.3  # the noise head


def test_random_features_give_chance(tmp_path):
    images, boxes = object_images(10, "random", seed=4)
    pairs = object_pairs(boxes, 60, 10, seed=5)
    store = write_feature_store(tmp_path / "random", images, {"pairs": pairs})
    alpha = 0.5  # a wide radius, so chance is far from 0 and 1
    run = run_probe(store, "semantic-corr", {"alpha": alpha})
    chance = []
    for p in pairs:
        t = next(im for im in images if im["id"] == p["target"])
        cells = np.stack(np.meshgrid(np.arange(GH), np.arange(GW), indexing="ij"), -1).reshape(-1, 2)
        centres = token_centre(cells, (t["h"], t["w"]), (GH, GW))
        chance += [chance_pck(centres, kp, bbox_threshold(p["target_bbox"]), alpha) for kp in p["target_kps"]]
    expected = float(np.mean(chance))
    sd = np.sqrt(expected * (1 - expected) / len(chance))
    for kind in ("values", "keys", "post_proj"):
        layer = -1 if kind == "post_proj" else 0
        got = value(run, kind, layer, layer, "pck")
        assert abs(got - expected) < 5 * sd, (kind, got, expected)
    assert 0.1 < expected < 0.9
