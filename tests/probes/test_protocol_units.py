"""Units and estimators of the probes, on stores shaped like real ones (frame sizes, token grids,
token layouts of any-resolution and native-resolution models) with hand-computed answers:
mIoU over a dataset's own classes, RefCOCO's mean over sentences, DAVIS's neighbourhood in
pixels, and the per-position key variance on a shared layout."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest
from fixtures.probe_stores import ToyImage, stripes, write_toy_store

from kvpipe.errors import StoreError, UsageError
from kvpipe.probes import Target, run_probe
from kvpipe.probes.prefix_report import compare_prefixes
from kvpipe.store import FeatureSetMeta, FeatureStore
from kvpipe.store.manifest import ImageRow
from kvpipe.store.writer import StoreWriter


def value(run, kind, layer, head, metric):
    """The one row of ``run``'s table at (kind, layer, head, metric)."""
    (hit,) = [r["value"] for r in run.table.to_pylist() if r["metric"] == metric and r["kind"] == kind
              and (r["layer"], r["head"]) == (layer, head)]
    return hit


def probe_scores(store, task, target, params=None):
    from kvpipe.probes import PROBES

    return PROBES.get(task)(FeatureStore.open(store), params or {}).score(target)


# ------------------------------------------------------------------------ semantic-seg background
class Features(ToyImage):
    """A toy image whose oracle features name other classes than its mask (``feature_tokens``)."""

    def __init__(self, image_id, tokens, meta, feature_tokens):
        super().__init__(image_id, tokens, meta)
        self.feature_tokens = feature_tokens

    def token_classes(self) -> np.ndarray:
        return self.feature_tokens.ravel().astype(np.int64)


def street_image() -> Features:
    """6 x 8 tokens of 8 px, no background pixel: class 1 on token rows 0-2, class 2 on rows 3-5.
    The features put class 1 on rows 0-2, class 2 on rows 3-4 and nothing on row 5, which no
    class query scores: row 5 stays unassigned. IoU: class 1 = 1, class 2 = 2/3 (rows 3-4 of
    3-5), background = 0 (predicted on row 5, never true)."""
    tokens = stripes({1: (0, 3), 2: (3, 6)})
    feats = stripes({1: (0, 3), 2: (3, 5)})
    return Features("street", tokens, {"labels": {"1": 1, "2": 2}}, feats)


def test_miou_averages_the_datasets_own_classes(tmp_path):
    structure = {"classes": ["background", "road", "car"], "class_queries": {"1": 0, "2": 1}}
    no_bg = write_toy_store(tmp_path / "bdd", [street_image()], "oracle", {**structure, "has_background": False},
                            ["road", "car"], [1, 2])
    got = probe_scores(no_bg, "semantic-seg", Target("values", 0, 0))
    assert got["mIoU"] == pytest.approx((1 + 2 / 3) / 2)  # not (1 + 2/3 + 0) / 3
    assert got["mIoU_fg"] == pytest.approx((1 + 2 / 3) / 2)
    with_bg = write_toy_store(tmp_path / "ins", [street_image()], "oracle", structure, ["road", "car"], [1, 2])
    got = probe_scores(with_bg, "semantic-seg", Target("values", 0, 0))
    assert got["mIoU"] == pytest.approx((1 + 2 / 3 + 0) / 3)  # ImageNet-S: background is a class
    assert got["mIoU_fg"] == pytest.approx((1 + 2 / 3) / 2)
    # report-prefix (Table 4's BDD-10K columns) reads the corrected metric
    run_probe(no_bg, "semantic-seg")
    (row,) = compare_prefixes([no_bg], "semantic-seg")
    assert row["metric"] == "mIoU" and row["value"] == pytest.approx(5 / 6)


def test_background_comes_from_the_dataset_structure():
    from kvpipe.probes.semantic_seg import has_background

    assert has_background({"has_background": False}, {"name": "toy"}) is False
    assert has_background({}, {"name": "imagenet-s"}) is True
    assert has_background({}, {"name": "bdd10k"}) is False  # stores made before the key existed
    from kvpipe.pipeline.datasets.bdd10k import Bdd10kDataset

    assert Bdd10kDataset.structure(Bdd10kDataset.__new__(Bdd10kDataset))["has_background"] is False


# ------------------------------------------------------------------------ refexp-seg: sentences
def test_refcoco_miou_is_the_mean_over_sentences(tmp_path):
    """Object 1 (class 1, token rows 1-2: 16 tokens) has three sentences, two pointing at it
    (IoU 1) and one at object 2 (IoU 0); object 2 (class 2, row 4: 8 tokens) has one sentence
    pointing at object 1 (IoU 0). Over sentences: (1 + 1 + 0 + 0) / 4 = 0.5; per object:
    (2/3 + 0) / 2 = 1/3; cIoU: I = 16 + 16 + 0 + 0, U = 16 + 16 + 24 + 24 -> 32 / 80."""
    image = ToyImage("x", stripes({1: (1, 3), 2: (4, 5)}),
                     {"labels": {"1": 1, "2": 2}, "refs": [{"label": 1, "queries": [0, 1, 2]},
                                                           {"label": 2, "queries": [3]}]})
    store = write_toy_store(tmp_path / "s", [image], "oracle", {}, ["a", "b", "c", "d"], [1, 1, 2, 1])
    got = probe_scores(store, "refexp-seg", Target("values", 0, 0))
    assert got["mIoU"] == pytest.approx(0.5)
    assert got["mIoU_per_object"] == pytest.approx(1 / 3)
    assert got["cIoU"] == pytest.approx(0.4)


# ------------------------------------------------------------------------ stores with real grids
def grid_store(path: Path, images: Sequence[dict], layers: int = 1, heads: int = 1, dim: int = 8,
               dataset: str = "toy") -> Path:
    """A store from explicit per-image keys/values. Each image: id, tokens (n, dim), segments
    (list of dicts), image_hw, and optionally mask (uint8 H x W), group, frame."""
    meta = FeatureSetMeta(model={"name": "grid-features"}, dataset={"name": dataset, "tasks": []},
                          layers=tuple(range(layers)), heads=tuple(range(heads)), kinds=("keys", "values"),
                          keys_rope="post-rope", n_layers=layers, n_kv_heads=heads, head_dim=dim, hidden_size=dim,
                          compute_dtype="float32", store_dtype="float32", template="none", prefix="",
                          prefix_token_ids=(), image_token_id=0, part_size=len(images), n_images=len(images),
                          image_ids_sha256="grid")
    rows, feats, masks, offset, mask_offset = [], [], [], 0, 0
    for i, im in enumerate(images):
        tok = np.asarray(im["tokens"], np.float32)
        base = next(s for s in im["segments"] if s["name"] == "base")
        mask = im.get("mask")
        rows.append(ImageRow(index=i, image_id=im["id"], part=0, token_offset=offset, n_tokens=len(tok),
                             grid_h=base["rows"], grid_w=base["cols"], segments=json.dumps(im["segments"]),
                             image_h=im["image_hw"][0], image_w=im["image_hw"][1], group=im.get("group", ""),
                             frame=im.get("frame", -1), mask_offset=-1 if mask is None else mask_offset,
                             mask_h=0 if mask is None else mask.shape[0], mask_w=0 if mask is None else mask.shape[1]))
        offset += len(tok)
        feats.append(tok)
        if mask is not None:
            masks.append(mask.ravel())
            mask_offset += mask.size
    tokens = np.concatenate(feats)
    kv = np.broadcast_to(tokens, (layers, heads) + tokens.shape).copy()
    arrays = {"keys": kv, "values": kv}
    if masks:
        arrays["masks"] = np.concatenate(masks)
    StoreWriter.create_or_resume(path, meta).write_part(0, rows, arrays)
    return path


def base(rows: int, cols: int) -> list[dict]:
    return [{"name": "base", "offset": 0, "rows": rows, "cols": cols, "newline": False}]


# ------------------------------------------------------------------------ DAVIS neighbourhood
def test_window_radius_is_dinos_96_pixels_of_the_480p_frame():
    from kvpipe.probes.temporal_corr import token_radius

    assert token_radius(96, (480, 832), (60, 104)) == (12, 12)  # DINO: 8-pixel patches, 12 patches
    # full-resolution DAVIS with 8-pixel patches: each is 3.56 px of the 480p frame, so the same
    # part of the frame (216 px of 1080) spans 27 of them
    assert token_radius(96, (1080, 1920), (135, 240)) == (27, 27)
    assert token_radius(96, (480, 854), (27, 27)) == (5, 3)  # LLaVA-OV base view: 17.8 x 31.6 px tokens
    assert token_radius(96, (480, 854), (17, 30)) == (3, 3)  # Qwen2.5-VL at native size: 28 px tokens


def moving_stripe_video(rows_moved: int) -> list[dict]:
    """Two 480 x 854 frames on a 27 x 27 token grid (LLaVA-OV's base view). Object 1 covers token
    rows 0-2 in frame 0 and rows r..r+2 in frame 1 (r = ``rows_moved``); oracle features."""
    grid, dim = (27, 27), 8
    out = []
    for t, top in enumerate((0, rows_moved)):
        labels = np.zeros(grid, np.uint8)
        labels[top:top + 3] = 1
        tokens = np.eye(dim, dtype=np.float32)[labels.ravel()]
        y = np.minimum((np.arange(480) * 27) // 480, 26)
        mask = labels[y][:, np.minimum((np.arange(854) * 27) // 854, 26)]
        out.append({"id": f"v/{t}", "tokens": tokens, "segments": base(*grid), "image_hw": (480, 854),
                    "mask": mask, "group": "v", "frame": t})
    return out


def test_neighbourhood_is_in_pixels_not_store_tokens(tmp_path):
    """The object moves 8 token rows = 142 px of the 480p frame: beyond DINO's 96 px radius (5
    rows here), so propagation loses it; DINO's 12 read as store tokens (the old default) would
    find it 8 rows away."""
    store = grid_store(tmp_path / "s", moving_stripe_video(8))
    pixels = probe_scores(store, "temporal-corr", Target("values", 0, 0))
    assert pixels["J_mean"] < 0.1
    tokens = probe_scores(store, "temporal-corr", Target("values", 0, 0), {"size_mask_neighborhood": 12})
    assert tokens["J_mean"] > 0.9
    run = run_probe(store, "temporal-corr")
    assert value(run, "dataset", -1, -1, "neighborhood_rows_max") == 5
    assert value(run, "dataset", -1, -1, "neighborhood_cols_max") == 3
    near = grid_store(tmp_path / "n", moving_stripe_video(4))  # 71 px: inside the window
    assert probe_scores(near, "temporal-corr", Target("values", 0, 0))["J_mean"] > 0.9


def test_crop_grid_only_where_the_store_has_one(tmp_path):
    store = grid_store(tmp_path / "s", moving_stripe_video(2))
    with pytest.raises(StoreError, match="tokens=crops needs an any-resolution") as err:
        run_probe(store, "temporal-corr", {"tokens": "crops"})
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="tokens='grid'"):
        run_probe(store, "temporal-corr", {"tokens": "grid"})


# ------------------------------------------------------------------------ input-agnostic variance
def anyres_image(i: int, crop_rows: int, rng: np.random.Generator) -> dict:
    """A 2 x 2 base view (4 tokens) then a crop grid of ``crop_rows`` x 3 with a newline token per
    row (a different layout per image, as LLaVA-OneVision's crops of differently shaped images).
    Base key of position p in image i: 10 * e_p + i * (2, 0, ..., 0)."""
    dim = 8
    base_keys = 10 * np.eye(dim, dtype=np.float32)[:4]
    base_keys[:, 0] += 2.0 * i
    crops = rng.standard_normal((crop_rows * 4, dim)).astype(np.float32) * 50
    segs = [{"name": "base", "offset": 0, "rows": 2, "cols": 2, "newline": False},
            {"name": "crops", "offset": 4, "rows": crop_rows, "cols": 3, "newline": True}]
    return {"id": f"im{i}", "tokens": np.concatenate([base_keys, crops]), "segments": segs, "image_hw": (60, 90)}


def test_variance_is_per_position_on_the_base_view(tmp_path):
    """Two images whose base views differ by (2, 0, ...) at every position: per position,
    E_i ||k_ip - mean_i k_ip||^2 = 1^2 = 1.0. Their crops differ in size and content; pooling
    every token (the old estimator on mixed layouts) mixes positions and crops in."""
    rng = np.random.default_rng(0)
    store = grid_store(tmp_path / "s", [anyres_image(0, 2, rng), anyres_image(1, 3, rng)])
    run = run_probe(store, "input-agnostic", {"threshold": 0.5})
    assert value(run, "keys", 0, 0, "l2_variance") == pytest.approx(1.0)
    assert value(run, "keys", -1, -1, "estimator_position") == 1.0
    pooled = run_probe(store, "input-agnostic", {"threshold": 0.5, "estimator": "pooled"})
    assert value(pooled, "keys", 0, 0, "l2_variance") > 100
    assert value(pooled, "keys", -1, -1, "estimator_pooled") == 1.0
    assert json.loads((pooled.out_dir / "run.json").read_text())["params"]["estimator"] == "pooled"


def test_mixed_native_layouts_name_the_fixed_size_option(tmp_path):
    """Qwen-style: each image its own base grid. Per-position variance is undefined: a one-line
    error naming --image-size and estimator=pooled (the old code pooled silently)."""
    rng = np.random.default_rng(0)
    images = [{"id": f"q{i}", "tokens": rng.standard_normal((r * c, 8)), "segments": base(r, c),
               "image_hw": (r * 28, c * 28)} for i, (r, c) in enumerate([(4, 6), (5, 5)])]
    store = grid_store(tmp_path / "q", images)
    with pytest.raises(UsageError, match=r"--image-size WxH.*estimator=pooled") as err:
        run_probe(store, "input-agnostic")
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="estimator='mean'"):
        run_probe(store, "input-agnostic", {"estimator": "mean"})
    run = run_probe(store, "input-agnostic", {"estimator": "pooled", "threshold": 1.0})
    assert value(run, "keys", -1, -1, "estimator_pooled") == 1.0
