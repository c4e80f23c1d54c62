"""RefCOCO (refer toolkit layout), SPair-71k and the synthetic dataset's annotations for every probe.

The RefCOCO and SPair tests build a tiny copy of the official layout and check the adapter reads
back exactly what was written (masks against hand-worked COCO polygons and RLE); the synthetic
tests check every structure against the rendered masks."""

from __future__ import annotations

import json
import os
import pickle
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import DATASETS, create_dataset
from kvpipe.pipeline.datasets.refcoco import load_plain_pickle, segmentation_mask
from kvpipe.pipeline.datasets.synthetic import CLASSES, INNER, SHAPES, SyntheticDataset, expressions, plan_video

from fixtures.layouts_refcoco_spair import (REFCOCO_CATEGORIES, REFCOCO_VAL_QUERIES, SPAIR_IMAGES, SPAIR_PAIRS,
                                            make_tiny_refcoco, make_tiny_spair, refcoco_expected_masks)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- refcoco ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def refer_root(tmp_path_factory) -> Path:
    return make_tiny_refcoco(tmp_path_factory.mktemp("refer"))


def test_refcoco_val_records_masks_and_refs(refer_root):
    ds = create_dataset("refcoco", root=str(refer_root))
    assert ds.split == "val" and DATASETS.get("refcoco").tasks == ("refexp-seg", "input-agnostic")
    recs = ds.records()
    assert [r.image_id for r in recs] == ["000000000009", "000000000025", "000000000030"]
    img_dir = refer_root.resolve() / "images/mscoco/images/train2014"
    assert recs[1].source == str(img_dir / "COCO_train2014_000000000025.jpg")
    assert recs[0].image().size == (8, 6)
    assert ds.text_queries() == REFCOCO_VAL_QUERIES
    expected = refcoco_expected_masks()
    anns = {int(r.image_id): r.annotation() for r in recs}
    for coco_id, mask in expected.items():
        assert anns[coco_id].mask.dtype == np.uint8
        np.testing.assert_array_equal(anns[coco_id].mask, mask, err_msg=f"image {coco_id}")
    assert anns[9].meta == {"labels": {"1": 1, "2": 18}, "coco_id": 9, "ann_ids": {"1": 101, "2": 102},
                            "refs": [{"label": 1, "queries": [0, 1]}, {"label": 2, "queries": [2, 1]}]}
    assert anns[25].meta["refs"] == [{"label": 1, "queries": [3]}] and anns[25].meta["labels"] == {"1": 3}
    assert anns[30].meta["refs"] == [{"label": 1, "queries": [4]}]  # the empty sentence is no query
    for ann in anns.values():
        json.dumps(ann.meta)
        assert {int(k) for k in ann.meta["labels"]} == {int(v) for v in np.unique(ann.mask) if v}


def test_refcoco_structure_classes(refer_root):
    classes = create_dataset("refcoco", root=str(refer_root)).structure()["classes"]
    assert len(classes) == 19 and classes[0] == "background"
    assert (classes[1], classes[3], classes[18]) == ("person", "car", "dog")
    assert all(c == "" for i, c in enumerate(classes) if i not in (0, 1, 3, 18))
    assert {c["name"] for c in REFCOCO_CATEGORIES} < set(classes)


def test_refcoco_splits_and_limit(refer_root):
    def ids(**kw):
        return [r.image_id for r in create_dataset("refcoco", root=str(refer_root), **kw).records()]

    assert ids(split="train") == ["000000000040"]
    assert ids(split="testA") == ids(split="testB") == ["000000000050"]
    a = create_dataset("refcoco", root=str(refer_root), split="testA")
    assert a.text_queries() == ["person A"] and a.records()[0].annotation().meta["ann_ids"] == {"1": 501}
    limited = create_dataset("refcoco", root=str(refer_root), limit=1)
    assert [r.image_id for r in limited.records()] == ["000000000009"]
    assert limited.text_queries() == REFCOCO_VAL_QUERIES[:3]


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_refcoco_reads_plain_pickles_of_any_protocol(tmp_path, protocol):
    root = make_tiny_refcoco(tmp_path / "r", protocol=protocol)
    assert create_dataset("refcoco", root=str(root)).text_queries() == REFCOCO_VAL_QUERIES


class _RunsCommand:
    """Pickles as a call of os.system: what a booby-trapped refs file would hold."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_refcoco_refuses_a_pickle_that_would_run_code(tmp_path):
    root = make_tiny_refcoco(tmp_path / "r")
    marker = tmp_path / "pwned"
    refs_path = root / "refcoco" / "refs(unc).p"
    refs_path.write_bytes(pickle.dumps([_RunsCommand(marker)]))
    assert b"system" in refs_path.read_bytes()
    with pytest.raises(DataError, match="refusing to load") as err:
        create_dataset("refcoco", root=str(root)).records()
    msg = one_line(err)
    assert str(refs_path.resolve()) in msg and "system" in msg
    assert not marker.exists()
    # anything naming a global is refused, even a harmless builtin
    refs_path.write_bytes(pickle.dumps({1, 2}, protocol=2))
    with pytest.raises(DataError, match=r"object __builtin__\.set,"):  # protocol 2 spells it so
        load_plain_pickle(refs_path)


def test_refcoco_bad_files_are_one_line_errors(tmp_path):
    root = make_tiny_refcoco(tmp_path / "r")
    refs_path = root / "refcoco" / "refs(unc).p"
    good = refs_path.read_bytes()
    refs_path.write_bytes(good[: len(good) // 2])
    with pytest.raises(DataError, match="cannot read refs file") as err:
        create_dataset("refcoco", root=str(root)).records()
    assert str(refs_path.resolve()) in one_line(err)
    refs_path.write_bytes(pickle.dumps([{"ref_id": 1}]))
    with pytest.raises(DataError, match=r"ref #0 has no integer 'ann_id'"):
        create_dataset("refcoco", root=str(root)).records()
    refs_path.write_bytes(good)
    (root / "refcoco" / "instances.json").write_text("{not json")
    with pytest.raises(DataError, match="instances.json") as err:
        create_dataset("refcoco", root=str(root)).records()
    one_line(err)


def test_refcoco_missing_pieces_name_the_path(tmp_path):
    with pytest.raises(UsageError, match="--data-root is required for dataset 'refcoco'"):
        create_dataset("refcoco")
    with pytest.raises(UsageError, match="testA, testB, train"):
        create_dataset("refcoco", root=str(tmp_path), split="test")
    with pytest.raises(DataError, match="does not exist") as err:
        create_dataset("refcoco", root=str(tmp_path)).records()
    assert str(tmp_path.resolve() / "refcoco") in one_line(err)
    root = make_tiny_refcoco(tmp_path / "r")
    missing = root / "images/mscoco/images/train2014/COCO_train2014_000000000025.jpg"
    missing.unlink()
    with pytest.raises(DataError, match="COCO_train2014_000000000025.jpg") as err:
        create_dataset("refcoco", root=str(root)).records()
    assert "1 of 3 images" in one_line(err)


def test_segmentation_mask_cases():
    # a triangle: pixel centres (j + 0.5, i + 0.5) inside (0,0)-(4,0)-(0,4) are those with i + j <= 2
    tri = segmentation_mask([[0, 0, 4, 0, 0, 4]], 4, 4, "t")
    np.testing.assert_array_equal(tri, (np.add.outer(np.arange(4), np.arange(4)) <= 2).astype(np.uint8))
    # degenerate polygons enclose nothing
    assert segmentation_mask([[1, 1, 3, 3]], 4, 4, "t").sum() == 0
    with pytest.raises(DataError, match=r"RLE size \[4, 4\] differs"):
        segmentation_mask({"counts": [16], "size": [4, 4]}, 5, 4, "ann 7")
    with pytest.raises(DataError, match="summing to height"):
        segmentation_mask({"counts": [3, 4], "size": [4, 4]}, 4, 4, "ann 7")
    with pytest.raises(DataError, match="ann 7: segmentation must be"):
        segmentation_mask("nope", 4, 4, "ann 7")


def test_refcoco_without_pycocotools_says_what_to_install(refer_root, monkeypatch):
    monkeypatch.setitem(sys.modules, "pycocotools", None)  # makes the import fail
    rec = create_dataset("refcoco", root=str(refer_root)).records()[0]  # listing needs no decoder
    with pytest.raises(DataError, match=r"pip install pycocotools==\d") as err:
        rec.annotation()
    one_line(err)


# --- spair -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    return make_tiny_spair(tmp_path_factory.mktemp("spair"))


def expected_pair(split: str, i: int) -> dict:
    name, src, trg, skps, tkps, box = SPAIR_PAIRS[split][i]
    cat = name.rsplit(":", 1)[1]
    return {"source": f"{cat}/{src}", "target": f"{cat}/{trg}", "category": cat, "name": name,
            "source_kps": [[float(x), float(y)] for x, y in skps],
            "target_kps": [[float(x), float(y)] for x, y in tkps], "target_bbox": [float(v) for v in box]}


def test_spair_reads_official_layout(spair_root):
    ds = create_dataset("spair", root=str(spair_root))
    assert ds.split == "test" and DATASETS.get("spair").tasks == ("semantic-corr", "input-agnostic")
    recs = ds.records()
    assert [r.image_id for r in recs] == sorted(SPAIR_IMAGES)
    base = spair_root.resolve() / "SPair-71k"
    assert recs[3].source == str(base / "JPEGImages/dog/2008_000001.jpg")
    for r in recs:
        assert r.image().size == SPAIR_IMAGES[r.image_id]
        ann = r.annotation()
        assert ann.mask is None and ann.meta == {"category": r.image_id.split("/")[0]}
    st = ds.structure()
    assert st == {"pairs": [expected_pair("test", i) for i in range(3)]}
    json.dumps(st)
    assert ds.text_queries() == []


def test_spair_split_categories_n_pairs_and_limit(spair_root):
    val = create_dataset("spair", root=str(spair_root), split="val")
    assert val.structure()["pairs"] == [expected_pair("val", 0)]
    assert [r.image_id for r in val.records()] == ["cat/2008_000002", "cat/2009_000003"]
    assert create_dataset("spair", root=str(spair_root), split="train").split == "trn"
    dog = create_dataset("spair", root=str(spair_root), categories="dog")
    assert [r.image_id for r in dog.records()] == ["dog/2008_000001", "dog/2010_000004"]
    assert dog.describe()["categories"] == ["dog"]
    both = create_dataset("spair", root=str(spair_root), categories=["dog", "cat"], n_pairs=2)
    assert [p["name"] for p in both.structure()["pairs"]] == [SPAIR_PAIRS["test"][i][0] for i in (0, 1)]
    one = create_dataset("spair", root=str(spair_root), n_pairs="1")
    assert [r.image_id for r in one.records()] == ["cat/2008_000001", "cat/2008_000002"]
    limited = create_dataset("spair", root=str(spair_root), limit=2)  # keeps only pairs of kept images
    assert [r.image_id for r in limited.records()] == ["cat/2008_000001", "cat/2008_000002"]
    assert limited.structure()["pairs"] == [expected_pair("test", 0)]
    direct = create_dataset("spair", root=str(spair_root / "SPair-71k"))  # the SPair-71k folder itself
    assert len(direct.records()) == 5


def test_spair_bad_options(spair_root):
    with pytest.raises(UsageError, match="no split 'tst'.*test, val, trn"):
        create_dataset("spair", root=str(spair_root), split="tst")
    with pytest.raises(UsageError, match="no category 'horse'; its categories: cat, dog") as err:
        create_dataset("spair", root=str(spair_root), categories="cat,horse").records()
    one_line(err)
    for bad in (0, "x", 2.5):
        with pytest.raises(UsageError, match="n_pairs"):
            create_dataset("spair", root=str(spair_root), n_pairs=bad)
    with pytest.raises(UsageError, match="categories"):
        create_dataset("spair", root=str(spair_root), categories=" , ")


def test_spair_broken_layout_names_the_path(tmp_path):
    with pytest.raises(DataError, match="has no Layout/ and PairAnnotation/") as err:
        create_dataset("spair", root=str(tmp_path)).records()
    one_line(err)
    root = make_tiny_spair(tmp_path / "s")
    base = root.resolve() / "SPair-71k"
    (base / "Layout/large/val.txt").unlink()
    with pytest.raises(DataError, match="Layout/large/val.txt") as err:
        create_dataset("spair", root=str(root), split="val").records()
    assert str(base / "Layout/large/val.txt") in one_line(err)

    pair = base / "PairAnnotation/test" / f"{SPAIR_PAIRS['test'][1][0]}.json"
    data = json.loads(pair.read_text())
    pair.write_text(json.dumps({**data, "trg_kps": data["trg_kps"] * 2}))
    with pytest.raises(DataError, match="1 source but 2 target keypoints") as err:
        create_dataset("spair", root=str(root)).records()
    assert str(pair) in one_line(err)
    pair.unlink()
    with pytest.raises(DataError, match="does not exist but the layout file lists it") as err:
        create_dataset("spair", root=str(root)).records()
    assert str(pair) in one_line(err)

    root2 = make_tiny_spair(tmp_path / "s2")
    image = root2.resolve() / "SPair-71k/JPEGImages/dog/2010_000004.jpg"
    image.unlink()
    with pytest.raises(DataError, match="does not exist but a pair of split test uses it") as err:
        create_dataset("spair", root=str(root2)).records()
    assert str(image) in one_line(err)


# --- synthetic: annotations for every probe ----------------------------------------------------------

ALL_TASKS = {"temporal-corr", "input-agnostic", "fg-seg", "cosegmentation", "semantic-seg", "refexp-seg",
             "semantic-corr"}


@pytest.fixture(scope="module")
def synth():
    ds = SyntheticDataset()
    recs = ds.records()
    anns = {r.image_id: r.annotation() for r in recs}
    return ds, recs, anns, ds.structure()


def test_synthetic_supports_every_task_and_keeps_object_ids(synth):
    ds, recs, anns, st = synth
    assert set(DATASETS.get("synthetic").tasks) == ALL_TASKS
    assert st["classes"] == ["background", "circle", "rectangle", "triangle"] == list(CLASSES)
    queries = ds.text_queries()
    assert queries[:3] == list(SHAPES) and st["class_queries"] == {"1": 0, "2": 1, "3": 2}
    assert len(queries) == len(set(queries))
    json.dumps(st)
    for rec in recs:
        ann = anns[rec.image_id]
        ids = [int(i) for i in np.unique(ann.mask) if i]
        assert ids == list(range(1, len(ann.meta["objects"]) + 1))  # masks stay object ids
        assert ann.meta["labels"] == {str(i): SHAPES.index(k) + 1 for i, k in enumerate(ann.meta["objects"], 1)}
        assert [r["label"] for r in ann.meta["refs"]] == ids
        texts = [queries[r["queries"][0]] for r in ann.meta["refs"]]
        assert all(len(r["queries"]) == 1 for r in ann.meta["refs"])
        assert len(set(texts)) == len(texts), texts  # unique within the video
        for text, kind in zip(texts, ann.meta["objects"]):
            assert text.startswith("the ") and f" {kind}" in text
    # one expression per object of the dataset, after the class names
    n_objects = sum(len(ds.plan(v).shapes) for v in range(4))
    assert len(set(queries[3:])) <= n_objects and len(queries) > 3


def test_synthetic_default_plan_puts_every_class_in_two_videos(synth):
    ds, recs, anns, st = synth
    videos = defaultdict(set)
    for rec in recs:
        for c in anns[rec.image_id].meta["labels"].values():
            videos[c].add(rec.group)
    assert {c: len(v) >= 2 for c, v in videos.items()} == {1: True, 2: True, 3: True}
    assert st["pairs"] and st["episodes"] and len(st["image_sets"]) == 3


def test_synthetic_disambiguates_same_looking_objects():
    found = 0
    for seed in range(100):
        for v in range(4):
            plan = plan_video(seed, v, 224, 168)
            texts = expressions(plan)
            assert len(set(texts)) == len(texts)
            extra = [i for i, t in enumerate(texts) if t.count(" ") > 2]
            if not extra:
                continue
            found += 1
            axis = 1 if plan.shapes[0].horizontal else 0  # lanes stacked in y, or side by side in x
            first_word = "at the top" if axis == 1 else "on the left"
            first = min(extra, key=lambda i: plan.shapes[i].centre(0)[axis])
            assert texts[first].endswith(first_word), texts
        if found >= 4:
            break
    assert found >= 4


def test_synthetic_pairs_are_exact_and_on_the_objects(synth):
    ds, recs, anns, st = synth
    ids = {r.image_id for r in recs}
    within = across = 0
    for p in st["pairs"]:
        assert p["source"] in ids and p["target"] in ids
        src, trg = anns[p["source"]], anns[p["target"]]
        so, to = p["source_label"], p["target_label"]
        assert len(p["source_kps"]) == len(p["target_kps"]) >= 1
        assert p["category"] == trg.meta["objects"][to - 1] == src.meta["objects"][so - 1]
        for ann, label, kps in ((src, so, p["source_kps"]), (trg, to, p["target_kps"])):
            for x, y in kps:
                assert ann.mask[int(np.floor(y + 0.5)), int(np.floor(x + 0.5))] == label, (p, x, y)
        ys, xs = np.nonzero(trg.mask == to)
        assert p["target_bbox"] == [xs.min(), ys.min(), xs.max(), ys.max()]
        # the first keypoint is the object's centre
        assert p["source_kps"][0] == src.meta["keypoints"][str(so)]
        assert p["target_kps"][0] == trg.meta["keypoints"][str(to)]
        if p["source"].split("/")[0] == p["target"].split("/")[0]:
            within += 1
            assert so == to and p["source"].endswith("/00000")
            shape = ds.plan(int(p["source"][5:7])).shapes[so - 1]
            t0, t1 = int(p["source"][-5:]), int(p["target"][-5:])
            n = {"circle": 5, "rectangle": 5, "triangle": 4}[shape.kind]
            assert len(p["source_kps"]) == n  # every shape point is visible at the default size
            # the same physical points: offsets from the centre turn with the object
            turn = shape.angle(t1) - shape.angle(t0)
            rot = np.array([[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]])
            d0 = np.array(p["source_kps"][1:]) - p["source_kps"][0]
            d1 = np.array(p["target_kps"][1:]) - p["target_kps"][0]
            np.testing.assert_allclose(d0 @ rot.T, d1, atol=0.02)
            # and they are the shape's corners / vertices / axis ends, pulled in by INNER
            dist = np.linalg.norm(d0, axis=1) / INNER
            if shape.kind == "rectangle":
                np.testing.assert_allclose(dist, shape.radius, atol=0.02)  # corners lie on the circumcircle
            elif shape.kind == "triangle":
                np.testing.assert_allclose(dist, shape.radius, atol=0.02)
                np.testing.assert_allclose(np.linalg.norm(d0[0] - d0[1]) / INNER, shape.radius * np.sqrt(3), atol=0.03)
            else:
                np.testing.assert_allclose(dist, shape.radius, atol=0.02)
        else:
            across += 1
            assert len(p["source_kps"]) == 1
    assert within == sum(len(ds.plan(v).shapes) for v in range(4)) * 5 and across >= 3


def test_synthetic_episodes_and_image_sets(synth):
    ds, recs, anns, st = synth
    def classes_of(image_id):
        return set(anns[image_id].meta["labels"].values())

    per_class = defaultdict(int)
    for ep in st["episodes"]:
        c, q, sup = ep["class"], ep["query"], ep["support"]
        per_class[c] += 1
        assert len(sup) == 5 and len(set(sup)) == 5 and q not in sup
        assert c in classes_of(q) and all(c in classes_of(s) for s in sup)
        assert all(s.split("/")[0] != q.split("/")[0] for s in sup)  # other videos suffice by default
    # every image holding a class is a query for it
    assert dict(per_class) == {c: sum(c in classes_of(r.image_id) for r in recs) for c in (1, 2, 3)}
    assert SyntheticDataset().structure()["episodes"] == st["episodes"]  # seeded
    for name, spec in st["image_sets"].items():
        assert CLASSES[spec["class"]] == name
        videos = [i.split("/")[0] for i in spec["images"]]
        assert len(videos) == len(set(videos)) >= 2
        assert all(spec["class"] in classes_of(i) for i in spec["images"])


def test_synthetic_structure_follows_limit():
    ds = SyntheticDataset(limit=9, n_frames=4)  # videos 0, 1 whole; video 2 frame 0
    ids = {r.image_id for r in ds.records()}
    st = ds.structure()
    refs = ([i for p in st["pairs"] for i in (p["source"], p["target"])]
            + [i for e in st["episodes"] for i in (e["query"], *e["support"])]
            + [i for s in st["image_sets"].values() for i in s["images"]])
    assert refs and set(refs) <= ids
    n_queries = len(ds.text_queries())
    assert all(q < n_queries for r in ds.records() for ref in r.annotation().meta["refs"] for q in ref["queries"])
