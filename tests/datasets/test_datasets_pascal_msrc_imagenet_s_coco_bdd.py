"""Dataset adapters over official layouts: Pascal-5i (VOC + SBD), co-segmentation sets (MSRC),
ImageNet-S, COCO and BDD100K 10K. Each test builds a tiny copy of the layout and checks the
adapter reads back exactly what was written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import DATASETS, create_dataset
from kvpipe.pipeline.datasets.pascal5i import VOC_CLASSES, fold_classes

from fixtures.layouts_pascal_msrc_imagenet_s_coco_bdd import (BDD_SIZE, BDD_TRAIN, BDD_VAL, COCO_IDS, COSEG_SETS,
                                                              VOC_SIZE, VOC_VAL, imagenet_s_name, make_tiny_bdd,
                                                              make_tiny_coco, make_tiny_coseg, make_tiny_imagenet_s,
                                                              make_tiny_voc, tiny_bdd_trainids, tiny_coseg_mask,
                                                              tiny_imagenet_s_classes, tiny_imagenet_s_mask,
                                                              tiny_voc_mask)


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg
    return msg


# --- pascal5i --------------------------------------------------------------------------------

# (image, class) pairs of fold 0 in VOC_VAL with >= 50 pixels: the bicycle (20 px) drops out
FOLD0_PAIRS = [("2007_000001", 1), ("2007_000002", 1), ("2007_000002", 3), ("2007_000003", 1),
               ("2007_000004", 3), ("2007_000005", 3), ("2007_000006", 3), ("2007_000008", 1)]


@pytest.fixture(scope="module")
def voc_root(tmp_path_factory) -> Path:
    return make_tiny_voc(tmp_path_factory.mktemp("voc"))


def pascal(root: Path, **opts):
    return create_dataset("pascal5i", root=str(root), **{"min_pixels": 50, "shots": 2, "n_episodes": 20, **opts})


def test_pascal5i_folds_and_classes():
    assert fold_classes(0) == [1, 2, 3, 4, 5] and fold_classes(3) == [16, 17, 18, 19, 20]
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert [VOC_CLASSES[c] for c in fold_classes(0)] == ["aeroplane", "bicycle", "bird", "boat", "bottle"]


def test_pascal5i_episodes_follow_the_protocol(voc_root):
    ds = pascal(voc_root, seed=3)
    st = ds.structure()
    json.dumps(st)
    assert st["classes"] == list(VOC_CLASSES) and st["fold_classes"] == [1, 2, 3, 4, 5] and st["shots"] == 2
    episodes = st["episodes"]
    assert len(episodes) == 20
    # HSNet: the fold's (image, class) list, cycled in order
    assert [(e["query"], e["class"]) for e in episodes] == [FOLD0_PAIRS[k % 8] for k in range(20)]
    for ep in episodes:
        assert len(ep["support"]) == 2 and len(set(ep["support"])) == 2
        assert ep["query"] not in ep["support"]
        for s in ep["support"]:
            assert s in VOC_VAL and (tiny_voc_mask(s) == ep["class"]).sum() >= 50
    # supports vary across the cycle, not one fixed draw per pair
    assert len({tuple(e["support"]) for e in episodes if e["query"] == "2007_000001"}) > 1


def test_pascal5i_records_are_the_episode_images_with_their_masks(voc_root):
    ds = pascal(voc_root)
    recs = ds.records()
    used = {im for ep in ds.structure()["episodes"] for im in (ep["query"], *ep["support"])}
    assert [r.image_id for r in recs] == sorted(used)
    assert "2007_000007" not in used  # person only
    voc = voc_root / "VOCdevkit" / "VOC2012"
    for rec in recs:
        assert rec.source == str((voc / "JPEGImages" / f"{rec.image_id}.jpg").resolve())
        ann = rec.annotation()
        np.testing.assert_array_equal(ann.mask, tiny_voc_mask(rec.image_id))
        want = {str(c): c for c, _ in VOC_VAL[rec.image_id]}
        assert ann.meta == {"labels": want, "mask_file": f"SegmentationClassAug/{rec.image_id}.png"}
        assert rec.image().size == VOC_SIZE
        json.dumps(ann.meta)


def test_pascal5i_is_deterministic_per_seed(voc_root):
    a, b = pascal(voc_root, seed=7).structure(), pascal(voc_root, seed=7).structure()
    c = pascal(voc_root, seed=8).structure()
    assert a == b and a["episodes"] != c["episodes"]
    ids = [r.image_id for r in pascal(voc_root, seed=7).records()]
    assert ids == [r.image_id for r in pascal(voc_root, seed=7).records()]


def test_pascal5i_palette_masks_and_root_forms(tmp_path):
    root = make_tiny_voc(tmp_path / "data", aug=False, devkit=False)  # <root>/VOC2012/, SegmentationClass only
    for r in (root, root / "VOC2012"):
        rec = pascal(r).records()[0]
        np.testing.assert_array_equal(rec.annotation().mask, tiny_voc_mask(rec.image_id))
        assert rec.annotation().meta["mask_file"] == f"SegmentationClass/{rec.image_id}.png"
    both = make_tiny_voc(tmp_path / "both")
    rec = pascal(both, masks="SegmentationClass").records()[0]
    assert rec.annotation().meta["mask_file"].startswith("SegmentationClass/")


def test_pascal5i_fold_list_limit_and_other_fold(voc_root, tmp_path):
    fold_list = tmp_path / "fold0.txt"
    fold_list.write_text("2007_000001__01\n2007_000003__01\n2007_000008__01\n2007_000005__03\n"
                         "2007_000004__03\n2007_000006__03\n")
    st = pascal(voc_root, fold_list=str(fold_list), n_episodes=6, min_pixels=10**6).structure()
    assert [(e["query"], e["class"]) for e in st["episodes"]] == [
        ("2007_000001", 1), ("2007_000003", 1), ("2007_000004", 3), ("2007_000005", 3), ("2007_000006", 3),
        ("2007_000008", 1)]
    assert all(set(e["support"]) <= {"2007_000001", "2007_000003", "2007_000008", "2007_000004",
                                     "2007_000005", "2007_000006"} for e in st["episodes"])
    limited = pascal(voc_root, limit=3)
    assert len(limited.structure()["episodes"]) == 3
    assert {r.image_id for r in limited.records()} == {
        im for e in limited.structure()["episodes"] for im in (e["query"], *e["support"])}
    # fold 0 on the train split: boats only, two images -> one support each
    st = pascal(voc_root, split="train", shots=1, n_episodes=4).structure()
    assert [(e["query"], e["support"], e["class"]) for e in st["episodes"]][:2] == [
        ("2008_000001", ["2008_000002"], 4), ("2008_000002", ["2008_000001"], 4)]


def test_pascal5i_errors(voc_root, tmp_path):
    with pytest.raises(DataError, match="bicycle.*shots") as err:
        pascal(voc_root, min_pixels=10).records()
    one_line(err)
    with pytest.raises(DataError, match="min_pixels"):
        pascal(voc_root, min_pixels=2048).structure()  # every tiny object is smaller than PFENet's filter
    with pytest.raises(DataError, match="test.txt") as err:
        pascal(voc_root, split="test").records()
    assert str(voc_root.resolve() / "VOCdevkit/VOC2012/ImageSets/Segmentation/test.txt") in one_line(err)
    bad = tmp_path / "bad.txt"
    bad.write_text("2007_000001__06\n")
    with pytest.raises(DataError, match="class 6.*another fold"):
        pascal(voc_root, fold_list=str(bad)).records()
    bad.write_text("2007_000001-01\n")
    with pytest.raises(DataError, match="line 1"):
        pascal(voc_root, fold_list=str(bad)).records()
    with pytest.raises(DataError, match="fold_list .*nope.txt does not exist"):
        pascal(voc_root, fold_list=str(tmp_path / "nope.txt")).records()
    for opts, name in (({"fold": 4}, "fold"), ({"shots": 0}, "shots"), ({"n_episodes": "many"}, "n_episodes"),
                       ({"masks": "Masks"}, "masks")):
        with pytest.raises(UsageError, match=name):
            pascal(voc_root, **opts)
    with pytest.raises(UsageError, match="--data-root is required for dataset 'pascal5i'"):
        create_dataset("pascal5i")
    with pytest.raises(DataError, match="does not exist") as err:
        pascal(tmp_path / "nowhere").records()
    assert str(tmp_path / "nowhere") in one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no VOC2012 JPEGImages"):
        pascal(tmp_path / "empty").records()
    broken = make_tiny_voc(tmp_path / "broken")
    (broken / "VOCdevkit/VOC2012/SegmentationClassAug/2007_000005.png").unlink()
    with pytest.raises(DataError, match="2007_000005.png does not exist") as err:
        pascal(broken).records()
    one_line(err)


# --- msrc (co-segmentation sets) -------------------------------------------------------------

def test_msrc_reads_image_sets(tmp_path):
    root = make_tiny_coseg(tmp_path / "MSRC")
    ds = create_dataset("msrc", root=str(root))
    recs = ds.records()
    assert [r.image_id for r in recs] == ["cow/cow000", "cow/cow001", "cow/cow002", "plane/plane000",
                                          "plane/plane001"]
    assert [(r.group, r.frame) for r in recs] == [("cow", 0), ("cow", 1), ("cow", 2), ("plane", 0), ("plane", 1)]
    assert recs[2].source.endswith("cow/cow002.bmp")
    for rec in recs:
        s, i = sorted(COSEG_SETS).index(rec.group), int(rec.image_id[-3:])
        ann = rec.annotation()
        np.testing.assert_array_equal(ann.mask, tiny_coseg_mask(s, i))
        assert ann.meta["labels"] == {"1": s + 1} and ann.meta["image_set"] == rec.group
        assert rec.image().mode == "RGB"
    st = ds.structure()
    json.dumps(st)
    assert st == {"classes": ["background", "cow", "plane"],
                  "image_sets": {"cow": {"images": ["cow/cow000", "cow/cow001", "cow/cow002"], "class": 1},
                                 "plane": {"images": ["plane/plane000", "plane/plane001"], "class": 2}}}
    only = create_dataset("msrc", root=str(root), sets="plane")
    assert only.structure()["classes"] == ["background", "plane"]
    assert only.records()[0].annotation().meta["labels"] == {"1": 1}


def test_msrc_errors(tmp_path):
    root = make_tiny_coseg(tmp_path / "MSRC")
    with pytest.raises(DataError, match="'horse' is not a folder.*cow, plane"):
        create_dataset("msrc", root=str(root), sets="horse,cow").records()
    with pytest.raises(UsageError, match="no splits"):
        create_dataset("msrc", root=str(root), split="test")
    # an MSRC-v2 style colour ground truth is not a binary object mask
    colour = np.zeros((*tiny_coseg_mask(0, 0).shape, 3), np.uint8)
    colour[..., 0] = 128  # building
    colour[2:9, 2:9] = (0, 128, 0)  # grass
    Image.fromarray(colour, "RGB").save(root / "cow" / "GroundTruth" / "cow000.png")
    with pytest.raises(DataError, match="colour image") as err:
        create_dataset("msrc", root=str(root)).records()[0].annotation()
    one_line(err)
    (root / "plane" / "GroundTruth" / "plane001.png").unlink()
    with pytest.raises(DataError, match="no ground-truth mask") as err:
        create_dataset("msrc", root=str(root)).records()
    assert str(root.resolve() / "plane" / "GroundTruth" / "plane001.png") in one_line(err)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no image-set folders"):
        create_dataset("msrc", root=str(tmp_path / "empty")).records()


# --- imagenet-s ------------------------------------------------------------------------------

def expected_imagenet_s(ids: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    present = sorted(int(v) for v in np.unique(ids) if 0 < v < 1000)
    out = np.zeros(ids.shape, np.uint8)
    out[ids == 1000] = 255
    for label, cls in enumerate(present, 1):
        out[ids == cls] = label
    return out, {str(label): cls for label, cls in enumerate(present, 1)}


@pytest.mark.parametrize("variant,names", [(50, "LOC_synset_mapping.txt"), (919, "imagenet_class_index.json")])
def test_imagenet_s_reads_masks_and_classes(tmp_path, variant, names):
    root, wnids = make_tiny_imagenet_s(tmp_path / "imagenet-s", variant=variant, names=names)
    order = sorted(wnids)
    ds = create_dataset("imagenet-s", root=str(root), variant=variant)
    assert ds.split == "validation"
    recs = ds.records()
    drawn = tiny_imagenet_s_classes(variant, wnids)
    assert [r.image_id.split("/")[0] for r in recs] == sorted(w for w in drawn for _ in range(2))
    assert [r.image_id for r in recs] == sorted(r.image_id for r in recs)
    for rec in recs:
        wnid = rec.image_id.split("/")[0]
        own = drawn[wnid][0]
        assert own == order.index(wnid) + 1
        first = rec.image_id == min(r.image_id for r in recs if r.image_id.startswith(wnid))
        mask, labels = expected_imagenet_s(tiny_imagenet_s_mask(own, (own % variant) + 1 if first else None))
        ann = rec.annotation()
        np.testing.assert_array_equal(ann.mask, mask)
        assert ann.meta["labels"] == labels and ann.meta["mask_file"].startswith(f"validation-segmentation/{wnid}/")
        assert rec.image().mode == "RGB"
    assert any(cls == variant for rec in recs for cls in rec.annotation().meta["labels"].values())
    queries = ds.text_queries()
    assert queries == [imagenet_s_name(names, order, w) for w in order]
    st = ds.structure()
    json.dumps(st)
    assert st["classes"] == ["background"] + queries and st["wnids"] == [""] + order
    assert st["class_queries"] == {str(i): i - 1 for i in range(1, variant + 1)}
    assert st["class_name_source"] == names


def test_imagenet_s_fallbacks(tmp_path):
    root, wnids = make_tiny_imagenet_s(tmp_path / "a", names=None)
    ds = create_dataset("imagenet-s", root=str(root / "ImageNetS50"), split="val")  # the variant folder itself
    assert ds.text_queries() == sorted(wnids) and ds.structure()["class_name_source"] == "wnid"
    # no categories file: the sorted class folders of validation-segmentation must be all 50
    root, wnids = make_tiny_imagenet_s(tmp_path / "b", categories=False)
    with pytest.raises(DataError, match="gives 3 classes, ImageNet-S-50 has 50") as err:
        create_dataset("imagenet-s", root=str(root)).records()
    assert "ImageNetS_categories_im50.txt" in one_line(err)
    for w in wnids:
        (root / "ImageNetS50" / "validation-segmentation" / w).mkdir(exist_ok=True)
    assert create_dataset("imagenet-s", root=str(root)).structure()["wnids"][1:] == sorted(wnids)


def test_imagenet_s_errors(tmp_path):
    root, wnids = make_tiny_imagenet_s(tmp_path / "s")
    for variant in (51, "fifty", True):
        with pytest.raises(UsageError, match="variant"):
            create_dataset("imagenet-s", root=str(root), variant=variant)
    with pytest.raises(UsageError, match="splits"):
        create_dataset("imagenet-s", root=str(root), split="train-full")
    with pytest.raises(DataError, match="ImageNetS300/validation does not exist"):
        create_dataset("imagenet-s", root=str(root), variant="300").records()
    with pytest.raises(DataError, match="categories file .*nope.txt does not exist"):
        create_dataset("imagenet-s", root=str(root), categories=str(tmp_path / "nope.txt")).records()
    seg = root / "ImageNetS50" / "validation-segmentation"
    first = sorted(seg.glob("*/*.png"))[0]
    rgb = np.asarray(Image.open(first)).copy()
    rgb[0, 5] = (60, 0, 0)  # class 60 in a 50-class mask
    Image.fromarray(rgb, "RGB").save(first)
    rec = next(r for r in create_dataset("imagenet-s", root=str(root)).records() if r.image_id.endswith(first.stem))
    with pytest.raises(DataError, match="class id 60, outside 0..50") as err:
        rec.annotation()
    one_line(err)
    first.unlink()
    with pytest.raises(DataError, match=f"mask .*{first.stem}.png does not exist"):
        create_dataset("imagenet-s", root=str(root)).records()


# --- coco ------------------------------------------------------------------------------------

def test_coco_lists_split_images(tmp_path):
    root = make_tiny_coco(tmp_path / "coco")
    ds = create_dataset("coco", root=str(root))
    recs = ds.records()
    assert ds.split == "val2017" and [r.image_id for r in recs] == list(COCO_IDS)
    assert recs[0].source == str((root / "val2017" / f"{COCO_IDS[0]}.jpg").resolve())
    assert recs[0].image().size == (30, 28) and recs[0].annotation().mask is None
    assert [r.image_id for r in create_dataset("coco", root=str(root), limit=2).records()] == list(COCO_IDS[:2])
    assert [r.image_id for r in create_dataset("coco", root=str(root / "val2017")).records()] == list(COCO_IDS)
    with pytest.raises(DataError, match="train2014 does not exist.*annotations, val2017") as err:
        create_dataset("coco", root=str(root), split="train2014").records()
    one_line(err)
    make_tiny_coco(root, split="train2014")
    assert len(create_dataset("coco", root=str(root), split="train2014").records()) == 3


# --- bdd10k ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bdd_root(tmp_path_factory) -> Path:
    return make_tiny_bdd(tmp_path_factory.mktemp("bdd"))


def test_bdd10k_reads_masks_and_tags(bdd_root):
    ds = create_dataset("bdd10k", root=str(bdd_root))
    recs = ds.records()
    assert ds.split == "val" and [r.image_id for r in recs] == sorted(BDD_VAL)
    for rec in recs:
        raw = tiny_bdd_trainids(rec.image_id)
        ann = rec.annotation()
        want = np.where(raw == 255, 255, raw + 1).astype(np.uint8)
        np.testing.assert_array_equal(ann.mask, want)
        assert ann.meta["labels"] == {str(v + 1): int(v + 1) for v in np.unique(raw) if v != 255}
        tags = BDD_VAL[rec.image_id][0] or {"timeofday": None, "scene": None, "weather": None}
        assert {k: ann.meta[k] for k in ("timeofday", "scene", "weather")} == tags
        assert ann.meta["mask_file"] == f"labels/sem_seg/masks/val/{rec.image_id}.png"
        assert rec.image().size == BDD_SIZE
        json.dumps(ann.meta)
    assert ds.text_queries()[:3] == ["road", "sidewalk", "building"] and len(ds.text_queries()) == 19
    st = ds.structure()
    assert st["classes"][0] == "background" and st["classes"][1:] == ds.text_queries()
    assert st["classes"][14] == "car" and st["class_queries"]["14"] == 13
    train = create_dataset("bdd10k", root=str(bdd_root), split="train").records()
    assert [r.image_id for r in train] == list(BDD_TRAIN)
    assert train[0].annotation().meta["timeofday"] == "dawn/dusk"


def test_bdd10k_attribute_filters(bdd_root):
    def ids(**f):
        return [r.image_id for r in create_dataset("bdd10k", root=str(bdd_root / "bdd100k"), **f).records()]

    night = sorted(n for n, (t, _) in BDD_VAL.items() if t and t["timeofday"] == "night")
    assert len(night) == 2 and ids(timeofday="night") == night  # one tagged in det_train.json only
    assert ids(scene="highway") == ["7d128593-0ccfea4c"]
    assert ids(timeofday="night", scene="city street") == ["7d15b18b-1e0d6e3f"]
    assert ids(timeofday="daytime", weather="clear") == ["7d06fefd-f7be05a6"]
    only_val = str(bdd_root / "bdd100k/labels/det_20/det_val.json")
    assert ids(timeofday="night", attributes_file=only_val) == ["7d128593-0ccfea4c"]
    with pytest.raises(UsageError, match="timeofday='day' is not one of.*'daytime'"):
        create_dataset("bdd10k", root=str(bdd_root), timeofday="day")
    with pytest.raises(DataError, match="no images tagged"):
        create_dataset("bdd10k", root=str(bdd_root), scene="tunnel").records()


def test_bdd10k_without_tags_and_errors(tmp_path):
    root = make_tiny_bdd(tmp_path / "plain", det20=False)
    recs = create_dataset("bdd10k", root=str(root)).records()
    assert all(r.annotation().meta["timeofday"] is None for r in recs)
    with pytest.raises(DataError, match="frame tags.*det_20") as err:
        create_dataset("bdd10k", root=str(root), timeofday="night").records()
    one_line(err)
    with pytest.raises(UsageError, match="splits train, val"):
        create_dataset("bdd10k", root=str(root), split="test")
    masks = root / "bdd100k/labels/sem_seg/masks/val"
    name = sorted(BDD_VAL)[0]
    bad = tiny_bdd_trainids(name)
    bad[0, 0] = 19
    Image.fromarray(bad, "L").save(masks / f"{name}.png")
    with pytest.raises(DataError, match="value 19"):
        create_dataset("bdd10k", root=str(root)).records()[0].annotation()
    (masks / f"{name}.png").unlink()
    with pytest.raises(DataError, match=f"{name}.png does not exist"):
        create_dataset("bdd10k", root=str(root)).records()
    bogus = tmp_path / "bogus.json"
    bogus.write_text(json.dumps({"not": "frames"}))
    with pytest.raises(DataError, match="not a BDD100K frame list"):
        create_dataset("bdd10k", root=str(root), attributes_file=str(bogus)).records()
    with pytest.raises(DataError, match="no images/10k"):
        create_dataset("bdd10k", root=str(tmp_path)).records()


# --- registry --------------------------------------------------------------------------------

def test_registry_has_the_layout_adapters():
    assert {"pascal5i", "msrc", "imagenet-s", "coco", "bdd10k"} <= set(DATASETS.names())
    assert DATASETS.get("pascal5i").tasks == ("fg-seg", "input-agnostic")
    assert DATASETS.get("msrc").tasks == ("cosegmentation", "input-agnostic")
    assert DATASETS.get("imagenet-s").tasks == ("semantic-seg", "input-agnostic")
    assert DATASETS.get("coco").tasks == ("input-agnostic",)
    assert DATASETS.get("bdd10k").tasks == ("semantic-seg", "input-agnostic")
    for name in ("pascal5i", "msrc", "imagenet-s", "coco", "bdd10k"):
        with pytest.raises(UsageError, match=f"--data-root is required for dataset '{name}'"):
            create_dataset(name)
