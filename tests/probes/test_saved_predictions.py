"""Saved predictions: every format read back, the DAVIS folder re-scored independently,
the targets chosen and recorded, and bad requests refused in one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.base import Target
from kvpipe.probes.predictions import (POINT_COLUMNS, DavisFolders, MaskImages, PointMatches, SaveRequest,
                                       chosen_targets, davis_palette, write_palette_png)
from kvpipe.probes.tokens import class_map
from kvpipe.store import FeatureStore

from fixtures.cli import ran
from fixtures.davis_reference import score_results_folder
from fixtures.probe_stores import hand_store, seg_stores
from fixtures.video_stores import random_video_store


def saved(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "run.json").read_text())["predictions"]["saved"]


def value(run, kind, layer, head, metric):
    return next(r["value"] for r in run.table.to_pylist()
                if (r["kind"], r["layer"], r["head"], r["metric"]) == (kind, layer, head, metric))


# ------------------------------------------------------------------------------ palette PNGs
def test_palette_is_davis_and_png_indices_are_the_labels(tmp_path):
    pal = davis_palette()
    # the DAVIS / PASCAL VOC colour map, by hand: 0 black, 1 dark red, 2 dark green, 3 olive, 4 navy, 255 last
    assert [tuple(pal[3 * i: 3 * i + 3]) for i in range(5)] == [(0, 0, 0), (128, 0, 0), (0, 128, 0),
                                                                (128, 128, 0), (0, 0, 128)]
    assert tuple(pal[3 * 255:]) == (224, 224, 192)
    labels = np.array([[0, 1, 2], [3, 0, 200]], np.uint8)
    write_palette_png(tmp_path / "a" / "m.png", labels)
    with Image.open(tmp_path / "a" / "m.png") as img:
        assert img.mode == "P" and img.size == (3, 2)
        np.testing.assert_array_equal(np.asarray(img), labels)
        assert img.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]
    with pytest.raises(ValueError, match="2-D map"):
        write_palette_png(tmp_path / "b.png", np.zeros((2, 2, 3), np.uint8))


# --------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg")
    return {Path(p).name: run_probe(p, Path(p).name, device="numpy") for p in seg_stores(root, "oracle")}


def _target_dirs(run) -> dict[tuple, Path]:
    return {(s["kind"], s["layer"], s["head"]): run.out_dir / s["path"] for s in saved(run.out_dir)}


@pytest.mark.parametrize("task", ["fg-seg", "cosegmentation", "semantic-seg", "refexp-seg"])
def test_best_target_of_each_kind_is_saved_and_recorded(seg_runs, task):
    run = seg_runs[task]
    record = json.loads((run.out_dir / "run.json").read_text())["predictions"]
    assert record["request"] == "best"
    # every task scores post_proj (the text-grounded ones against the text queries' post_proj)
    assert {s["kind"] for s in record["saved"]} == {"keys", "values", "post_proj"}
    for s in record["saved"]:
        assert s["format"] == "masks" and (run.out_dir / s["path"] / "masks.parquet").exists()
        if s["kind"] != "post_proj":  # head 0 carries the oracle features, head 1 noise
            assert (s["layer"], s["head"]) == (0, 0)
            assert s["path"] == f"predictions/{s['kind']}-L0-H0"
    assert run.predictions == record["saved"]


@pytest.mark.parametrize("task", ["fg-seg", "cosegmentation", "semantic-seg", "refexp-seg"])
def test_saved_png_indices_are_the_predicted_labels(seg_runs, task):
    """What the PNGs hold is what the probe predicted (read back through PIL), and for oracle
    features that is the ground truth in the task's own labels."""
    run = seg_runs[task]
    store = FeatureStore.open(run.out_dir.parents[1])
    rows = {r.image_id: r for r in store.images()}
    folder = _target_dirs(run)[("values", 0, 0)]
    index = pq.read_table(folder / "masks.parquet").to_pylist()
    assert index and all((folder / r["file"]).exists() for r in index)
    for r in index:
        with Image.open(folder / r["file"]) as img:
            assert img.mode == "P"
            got = np.asarray(img)
        ann = store.annotation(rows[r["image_id"]])
        info = json.loads(r["info"])
        valid = ann.mask != 255
        if task == "fg-seg":
            want = np.where(class_map(ann.mask, ann.meta) == info["class"], info["class"], 0)
        elif task == "semantic-seg":
            want = class_map(ann.mask, ann.meta)
        elif task == "refexp-seg":
            want = (ann.mask == info["object_label"]).astype(np.uint8)
        else:
            cls = {"s1": 1, "s2": 2}[info["set"]]
            want = (class_map(ann.mask, ann.meta) == cls).astype(np.uint8)
        assert got.shape == ann.mask.shape
        np.testing.assert_array_equal(got[valid], want[valid], err_msg=f"{task} {r['name']}")
    back = MaskImages.read(folder)
    assert [i.name for i in back.items] == [r["name"] for r in index]


def test_refexp_masks_are_per_sentence_and_carry_the_sentence(seg_runs):
    folder = _target_dirs(seg_runs["refexp-seg"])[("values", 0, 0)]
    index = pq.read_table(folder / "masks.parquet").to_pylist()
    assert len(index) == 9  # 3 images x (2 + 1 sentences)
    first = json.loads(index[0]["info"])
    assert first["sentence"] == "image 0 object 1 sentence 0" and first["object_label"] == 1
    assert index[0]["file"] == "ref0/sentence-0.png"


# --------------------------------------------------------------------------- correspondence
def test_matched_points_parquet_by_hand(tmp_path):
    store = hand_store(tmp_path / "hand")
    run = run_probe(store, "semantic-corr", save_predictions="0:0:values")
    (s,) = saved(run.out_dir)
    assert (s["kind"], s["layer"], s["head"], s["format"], s["why"]) == ("values", 0, 0, "points", "requested")
    table = pq.read_table(run.out_dir / s["path"] / "matches.parquet")
    assert tuple(table.column_names) == POINT_COLUMNS
    t = table.to_pydict()
    # the hand store's nearest tokens (tests/fixtures/probe_stores.py hand_store)
    assert t["pair"] == [0, 0, 0, 1] and t["keypoint"] == [0, 1, 2, 0]
    assert t["source"] == ["s", "s", "s", "t"] and t["target"] == ["t", "t", "t", "s"]
    assert list(zip(t["pred_x"], t["pred_y"])) == [(14.5, 9.5), (4.5, 29.5), (14.5, 29.5), (4.5, 14.5)]
    assert list(zip(t["source_x"], t["source_y"])) == [(3, 4), (15, 2), (5, 19), (14, 30)]
    assert list(zip(t["gt_x"], t["gt_y"])) == [(14.5, 11.5), (10, 29.5), (12, 28), (5, 15.5)]
    assert t["threshold"] == pytest.approx([3, 3, 3, 1.5])
    assert t["correct"] == [True, False, True, True]
    assert np.mean(t["correct"]) == pytest.approx(value(run, "values", 0, 0, "pck"))
    assert PointMatches.read(run.out_dir / s["path"]).table.equals(table)


# -------------------------------------------------------------------------------------- DAVIS
def test_saved_davis_folder_rescored_independently_gives_the_probes_number(tmp_path):
    store_path = random_video_store(tmp_path / "video", layers=2, heads=2, frames=6, grid=(3, 4), seed=3)
    run = run_probe(store_path, "temporal-corr", device="numpy", save_predictions="all")
    store = FeatureStore.open(store_path)
    frames = sorted(store.images(), key=lambda r: r.frame)
    annotations = {"v0": [store.annotation(r).mask for r in frames]}
    records = saved(run.out_dir)
    assert len(records) == 2 * 2 * 2 + 1  # keys and values of 2 layers x 2 heads, and post_proj
    for s in records:
        folder = run.out_dir / s["path"]
        files = sorted((folder / "v0").glob("*.png"))
        assert [f.name for f in files] == [f"{t}.png" for t in range(6)]  # <video>/<frame>.png
        for f, gt in zip(files, annotations["v0"]):
            with Image.open(f) as img:
                assert img.mode == "P" and np.asarray(img).shape == gt.shape
        mine = score_results_folder(folder, annotations)
        for metric in ("J_mean", "F_mean", "JF_mean"):
            assert mine[metric] == pytest.approx(value(run, s["kind"], s["layer"], s["head"], metric), abs=1e-12)
    assert 0 < value(run, "values", 0, 0, "JF_mean") < 1  # random features: a number worth re-scoring
    back = DavisFolders.read(run.out_dir / records[0]["path"])
    assert list(back.videos) == ["v0"] and [n for n, _ in back.videos["v0"]] == [str(t) for t in range(6)]


# ------------------------------------------------------------------------------ the request
def test_best_is_the_argmax_per_kind_and_all_none_and_targets():
    rows = [{"kind": "values", "layer": 0, "head": 0, "metric": "m", "value": 0.2},
            {"kind": "values", "layer": 1, "head": 1, "metric": "m", "value": 0.7},
            {"kind": "values", "layer": 1, "head": 0, "metric": "other", "value": 0.9},
            {"kind": "keys", "layer": 0, "head": 1, "metric": "m", "value": float("nan")},
            {"kind": "keys", "layer": 1, "head": 0, "metric": "m", "value": 0.1},
            {"kind": "post_proj", "layer": -1, "head": -1, "metric": "m", "value": 0.5},
            {"kind": "dataset", "layer": -1, "head": -1, "metric": "m", "value": 9.0}]
    swept = [Target("values", 0, 0), Target("keys", 1, 0)]
    best = chosen_targets(SaveRequest("best"), rows, "m", swept)
    assert [t for t, _ in best] == [Target("values", 1, 1), Target("keys", 1, 0), Target("post_proj")]
    assert best[0][1] == "best values by m = 0.7"
    assert [t for t, _ in chosen_targets(SaveRequest("all"), rows, "m", swept)] == swept
    assert chosen_targets(SaveRequest("none"), rows, "m", swept) == []
    req = SaveRequest.parse("3:1:values, post_proj")
    assert req.targets == (Target("values", 3, 1), Target("post_proj")) and req.text() == "3:1:values,post_proj"


def test_bad_requests_are_one_line_usage_errors(tmp_path):
    store_path = random_video_store(tmp_path / "video", layers=2, heads=2, frames=3)
    meta = FeatureStore.open(store_path).meta
    for text, match in (("best3", "is not best, all, none"), ("1:x:values", "is not best"),
                        ("5:0:values", "layer 5 is not stored"), ("0:7:keys", "KV head 7 is not stored"),
                        ("0:0:hidden", "holds no hidden"), (",", "name best, all, none")):
        with pytest.raises(UsageError, match=match) as err:
            SaveRequest.parse(text, meta)
        assert "\n" not in str(err.value) and "--save-predictions" in str(err.value)


def test_probe_cli_flag_saves_named_targets_and_none_saves_nothing(tmp_path):
    store_path = random_video_store(tmp_path / "video", layers=2, heads=2, frames=4)
    out = ran("probe", "--task", "temporal-corr", "--store", store_path, "--device", "numpy",
              "--save-predictions", "1:0:keys")
    assert "predictions:" in out.stdout and "keys-L1-H0" in out.stdout
    run_dir = store_path / "probes" / "temporal-corr"
    assert [(s["kind"], s["layer"], s["head"]) for s in saved(run_dir)] == [("keys", 1, 0)]
    assert sorted(p.name for p in (run_dir / "predictions").iterdir()) == ["keys-L1-H0"]
    ran("probe", "--task", "temporal-corr", "--store", store_path, "--save-predictions", "none")
    assert saved(run_dir) == [] and json.loads((run_dir / "run.json").read_text())["predictions"]["request"] == "none"
    bad = ran("probe", "--task", "temporal-corr", "--store", store_path, "--save-predictions", "9:0:keys",
              check=False)
    assert bad.code == 2 and "layer 9 is not stored" in bad.stderr and bad.stderr.count("\n") == 1


def test_a_probe_without_predictions_records_why(tmp_path):
    store_path = random_video_store(tmp_path / "video", layers=2, heads=2, frames=3)
    run = run_probe(store_path, "input-agnostic")
    record = json.loads((run.out_dir / "run.json").read_text())["predictions"]
    assert record["saved"] == [] and "makes no per-image predictions" in record["note"]
    assert not (run.out_dir / "predictions").exists()


def test_a_cached_rerun_keeps_the_saved_predictions(tmp_path, monkeypatch):
    store_path = random_video_store(tmp_path / "video", layers=1, heads=2, frames=4)
    first = run_probe(store_path, "temporal-corr", device="numpy")
    png = first.out_dir / first.predictions[0]["path"] / "v0" / "1.png"
    stamp = png.stat().st_mtime_ns
    from kvpipe.probes.temporal_corr import TemporalCorrespondence

    def fail(self, target):
        raise AssertionError("predictions recomputed")

    monkeypatch.setattr(TemporalCorrespondence, "predictions", fail)
    again = run_probe(store_path, "temporal-corr", device="numpy")
    assert again.cached and again.predictions == first.predictions and png.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    other = run_probe(store_path, "temporal-corr", device="numpy", save_predictions="0:1:keys")
    assert [p["path"] for p in other.predictions] == ["predictions/keys-L0-H1"]
    assert not png.exists()  # an earlier run's predictions are replaced, not mixed in
