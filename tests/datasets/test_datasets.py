"""Dataset adapters: deterministic synthetic videos, folder listing, the DAVIS-2017 layout."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import DATASETS, Annotation, create_dataset
from kvpipe.pipeline.datasets.synthetic import SyntheticDataset

from fixtures.layouts_davis_folder import make_image_folder, make_tiny_davis, tiny_davis_mask


def pixels_and_masks(ds) -> tuple[list[np.ndarray], list[np.ndarray]]:
    recs = ds.records()
    return [np.asarray(r.image()) for r in recs], [r.annotation().mask for r in recs]


def centroid(mask: np.ndarray, obj: int) -> np.ndarray:
    ys, xs = np.nonzero(mask == obj)
    return np.array([xs.mean(), ys.mean()])


# --- synthetic -------------------------------------------------------------------------------

def test_synthetic_defaults_and_ids():
    ds = create_dataset("synthetic")
    recs = ds.records()
    assert len(recs) == 24
    assert [r.image_id for r in recs[:7]] == [f"video00/{t:05d}" for t in range(6)] + ["video01/00000"]
    assert recs[7].source == "synthetic:video01/00001" and recs[7].group == "video01" and recs[7].frame == 1
    assert len({r.image_id for r in recs}) == 24
    desc = ds.describe()
    assert desc["name"] == "synthetic"
    assert {k: desc[k] for k in ("n_videos", "n_frames", "width", "height", "seed")} == {
        "n_videos": 4, "n_frames": 6, "width": 224, "height": 168, "seed": 0}
    json.dumps(desc)


def test_synthetic_is_deterministic_per_seed():
    img_a, mask_a = pixels_and_masks(SyntheticDataset(seed=3, n_videos=2, n_frames=3))
    img_b, mask_b = pixels_and_masks(SyntheticDataset(seed=3, n_videos=2, n_frames=3))
    img_c, mask_c = pixels_and_masks(SyntheticDataset(seed=4, n_videos=2, n_frames=3))
    for a, b in zip(img_a + mask_a, img_b + mask_b):
        np.testing.assert_array_equal(a, b)
    assert not any(np.array_equal(a, c) for a, c in zip(img_a, img_c))
    assert not all(np.array_equal(a, c) for a, c in zip(mask_a, mask_c))


def test_synthetic_frames_are_lazy_and_order_independent():
    recs = SyntheticDataset(seed=1).records()
    late_first = np.asarray(recs[5].image())
    np.testing.assert_array_equal(late_first, np.asarray(SyntheticDataset(seed=1).records()[5].image()))


def test_synthetic_image_and_mask_content():
    ds = SyntheticDataset()
    rec = ds.records()[0]
    img, ann = rec.image(), rec.annotation()
    assert isinstance(img, Image.Image) and img.mode == "RGB" and img.size == (224, 168)
    assert ann.mask.dtype == np.uint8 and ann.mask.shape == (168, 224)
    ids = sorted(int(i) for i in np.unique(ann.mask) if i)
    assert ids[0] == 1 and ids == list(range(1, len(ids) + 1)) and 2 <= len(ids) <= 3
    assert len(ann.meta["objects"]) == len(ids) and set(ann.meta["objects"]) <= {"circle", "rectangle", "triangle"}
    assert sorted(ann.meta["keypoints"]) == [str(i) for i in ids]
    json.dumps(ann.meta)
    # textured: the background and each object are not flat colours
    px = np.asarray(img).astype(float)
    assert px[ann.mask == 0].std(axis=0).min() > 5
    assert all(px[ann.mask == i].std(axis=0).max() > 5 for i in ids)


def test_synthetic_objects_move_smoothly_and_keypoints_are_centroids():
    ds = SyntheticDataset(n_videos=4, n_frames=6)
    by_video: dict[str, list] = {}
    for rec in ds.records():
        by_video.setdefault(rec.group, []).append(rec.annotation())
    for name, anns in by_video.items():
        objects = {int(k) for k in anns[0].meta["keypoints"]}
        for obj in objects:
            path = []
            for ann in anns:
                assert (ann.mask == obj).sum() > 50, f"{name} object {obj} vanished"
                c = centroid(ann.mask, obj)
                np.testing.assert_allclose(c, ann.meta["keypoints"][str(obj)], atol=1.5)
                path.append(c)
            steps = np.linalg.norm(np.diff(path, axis=0), axis=1)
            assert steps.min() > 1, f"{name} object {obj} stands still ({steps.min():.2f} px)"
            assert steps.max() < 15, f"{name} object {obj} jumps {steps.max():.1f} px in one frame"


def test_synthetic_non_square_size_and_limit():
    ds = create_dataset("synthetic", limit=5, width=96, height=160, n_videos=2, n_frames=4)
    recs = ds.records()
    assert len(recs) == 5 and recs[-1].image_id == "video01/00000"
    assert recs[0].image().size == (96, 160) and recs[0].annotation().mask.shape == (160, 96)


@pytest.mark.parametrize("opts", [{"n_frames": 0}, {"width": 8}, {"seed": -1}, {"n_videos": 2.5}])
def test_synthetic_bad_options(opts):
    with pytest.raises(UsageError, match=next(iter(opts))):
        create_dataset("synthetic", **opts)


# --- folder ----------------------------------------------------------------------------------

def test_folder_lists_sorted_relative_paths(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=3, corrupt=1)
    (root / ".hidden.jpg").write_bytes(b"resource fork")
    recs = create_dataset("folder", root=str(root)).records()
    ids = [r.image_id for r in recs]
    assert ids == ["broken/corrupt0.jpg", "img0.png", "sub/deeper/IMG2.JPG", "sub/img1.jpg"]
    assert all(Path(r.source).is_absolute() and Path(r.source) == (root / r.image_id).resolve() for r in recs)
    assert recs[1].image().size == (32, 24) and recs[2].image().mode == "RGB"
    assert recs[1].annotation() == Annotation()
    assert [r.image_id for r in create_dataset("folder", root=str(root), limit=2).records()] == ids[:2]


def test_folder_corrupt_image_fails_only_when_loaded(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=1, corrupt=1)
    recs = create_dataset("folder", root=str(root)).records()  # must not raise
    bad = next(r for r in recs if "corrupt" in r.image_id)
    with pytest.raises(DataError, match="cannot read image") as err:
        bad.image()
    assert str(root / "broken" / "corrupt0.jpg") in str(err.value) and "\n" not in str(err.value)


def test_folder_errors(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataError, match="does not exist") as err:
        create_dataset("folder", root=str(missing)).records()
    assert str(missing) in str(err.value)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match=r"no images.*\.jpg.*\.webp") as err:
        create_dataset("folder", root=str(empty)).records()
    assert str(empty) in str(err.value)
    with pytest.raises(UsageError, match="--data-root is required for dataset 'folder'"):
        create_dataset("folder")


# --- davis -----------------------------------------------------------------------------------

def test_davis_reads_official_layout(tmp_path):
    root = make_tiny_davis(tmp_path / "DAVIS", sequences=("bear", "car-turn"), n_frames=4, size=(96, 64))
    ds = create_dataset("davis", root=str(root))
    assert ds.split == "val" and ds.describe()["resolution"] == "480p"
    recs = ds.records()
    assert [r.image_id for r in recs] == [f"{s}/{t:05d}" for s in ("bear", "car-turn") for t in range(4)]
    assert [(r.group, r.frame) for r in recs] == [(s, t) for s in ("bear", "car-turn") for t in range(4)]
    assert recs[5].source == str((root / "JPEGImages/480p/car-turn/00001.jpg").resolve())
    for s_index, seq in enumerate(("bear", "car-turn")):
        for t in range(4):
            rec = recs[4 * s_index + t]
            ann = rec.annotation()
            np.testing.assert_array_equal(ann.mask, tiny_davis_mask(s_index, t, (96, 64)))
            assert ann.meta == {"sequence": seq, "mask_file": f"Annotations/480p/{seq}/{t:05d}.png"}
            assert rec.image().size == (96, 64)


def test_davis_split_limit_and_missing_masks(tmp_path):
    root = make_tiny_davis(tmp_path / "DAVIS", sequences=("bear", "car-turn", "dog"), n_frames=3)
    assert {r.group for r in create_dataset("davis", root=str(root), split="train").records()} == {"bear"}
    limited = create_dataset("davis", root=str(root), limit=4).records()
    assert [r.image_id for r in limited] == ["bear/00000", "bear/00001", "bear/00002", "car-turn/00000"]
    for t in (1, 2):  # test-dev style: only the first frame annotated
        (root / "Annotations/480p/dog" / f"{t:05d}.png").unlink()
    dog = [r for r in create_dataset("davis", root=str(root)).records() if r.group == "dog"]
    assert dog[0].annotation().mask is not None
    assert [r.annotation().mask for r in dog[1:]] == [None, None]
    assert dog[1].annotation().meta["sequence"] == "dog"


def test_davis_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="does not exist") as err:
        create_dataset("davis", root=str(missing)).records()
    assert str(missing) in str(err.value)

    root = make_tiny_davis(tmp_path / "DAVIS")
    with pytest.raises(DataError, match="test-dev") as err:
        create_dataset("davis", root=str(root), split="test-dev").records()
    assert str(root.resolve() / "ImageSets/2017/test-dev.txt") in str(err.value)

    with (root / "ImageSets/2017/val.txt").open("a") as f:
        f.write("\nghost\n")
    with pytest.raises(DataError) as err:
        create_dataset("davis", root=str(root)).records()
    assert str(root.resolve() / "JPEGImages/480p/ghost") in str(err.value)

    assert "\n" not in str(err.value)

    with pytest.raises(DataError, match="JPEGImages/Full-Resolution"):
        create_dataset("davis", root=str(root), resolution="Full-Resolution").records()


# --- registry / create_dataset ---------------------------------------------------------------

def test_registry_has_builtins():
    assert {"synthetic", "folder", "davis"} <= set(DATASETS.names())
    assert DATASETS.get("davis").tasks == ("temporal-corr", "input-agnostic")
    assert DATASETS.get("folder").tasks == ("input-agnostic",)
    assert DATASETS.get("synthetic").needs_root is False


def test_create_dataset_unknown_name_lists_known():
    with pytest.raises(UsageError, match="unknown dataset 'nope'") as err:
        create_dataset("nope")
    assert all(n in str(err.value) for n in ("davis", "folder", "synthetic"))


def test_create_dataset_davis_needs_root():
    with pytest.raises(UsageError, match="--data-root is required for dataset 'davis'") as err:
        create_dataset("davis")
    assert "JPEGImages" in str(err.value)


def test_create_dataset_unknown_option():
    with pytest.raises(UsageError, match="no option 'n_vidoes'") as err:
        create_dataset("synthetic", n_vidoes=3)
    assert "n_videos" in str(err.value)
    with pytest.raises(UsageError, match="'resolution'"):
        create_dataset("folder", root=".", resolution="480p")
