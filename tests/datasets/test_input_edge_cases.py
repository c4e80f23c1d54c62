"""Input edge cases: every PIL mode to 8-bit RGB, non-UTF-8 file names, symlink loops."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.datasets.base import ImageRecord, to_rgb
from kvpipe.store.schema import ids_fingerprint


def rgb_of(img: Image.Image, tmp_path: Path | None = None, fmt: str | None = None) -> np.ndarray:
    """Through the dataset path (ImageRecord.image), after a round trip through a file when asked."""
    if tmp_path is not None:
        path = tmp_path / f"x.{fmt}"
        img.save(path)
        rec = ImageRecord("x", str(path), load_image=lambda: Image.open(path))
    else:
        rec = ImageRecord("x", "memory", load_image=lambda: img)
    out = rec.image()
    assert out.mode == "RGB"
    return np.asarray(out)


def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    grey = np.array([[0, 255, 256, 1000], [32767, 32768, 65280, 65535]], np.uint16)
    want = np.array([[0, 0, 1, 3], [127, 128, 255, 255]], np.uint8)  # v >> 8, by hand
    img = Image.fromarray(grey)  # mode "I;16"
    assert img.mode == "I;16"
    got = rgb_of(img, tmp_path, "png")  # a 16-bit PNG opens as "I;16" or "I" depending on PIL
    np.testing.assert_array_equal(got, np.repeat(want[..., None], 3, axis=2))
    np.testing.assert_array_equal(rgb_of(img.convert("I")), np.repeat(want[..., None], 3, axis=2))


def test_float_grey_in_0_1_and_0_255():
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], np.float32), "F")
    np.testing.assert_array_equal(rgb_of(unit)[..., 0], [[0, 128, 255]])  # rint(0.5 * 255) = 128
    wide = Image.fromarray(np.array([[0.0, 100.4, 300.0, -5.0]], np.float32), "F")
    np.testing.assert_array_equal(rgb_of(wide)[..., 0], [[0, 100, 255, 0]])


def test_alpha_is_composited_over_white(tmp_path):
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [100, 51]]], np.uint8), "LA")
    # 100 * 51/255 + 255 * (1 - 51/255) = 20 + 204 = 224
    np.testing.assert_array_equal(rgb_of(la)[..., 0], [[255, 0, 224]])
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [10, 20, 30, 255]]], np.uint8), "RGBA")
    np.testing.assert_array_equal(rgb_of(rgba), [[[255, 255, 255], [10, 20, 30]]])
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 0, 200, 10, 10] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0  # palette entry 0 is transparent
    np.testing.assert_array_equal(rgb_of(p, tmp_path, "png"), [[[255, 255, 255], [200, 10, 10]]])


def test_cmyk_and_bilevel():
    cmyk = Image.fromarray(np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], np.uint8), "CMYK")
    np.testing.assert_array_equal(rgb_of(cmyk), [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]])
    one = Image.new("1", (2, 1))
    one.putpixel((0, 0), 1)
    np.testing.assert_array_equal(rgb_of(one)[..., 0], [[255, 0]])
    assert to_rgb(Image.new("RGB", (1, 1))).mode == "RGB"


def png(path: Path, value: int = 128) -> None:
    Image.fromarray(np.full((8, 8, 3), value, np.uint8)).save(path)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_non_utf8_file_names_give_stable_ids(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    raw = os.fsencode(root) + b"/caf\xe9.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(open(raw, "wb"), format="PNG")
    png(root / "plain.png")
    ids = [r.image_id for r in create_dataset("folder", root=str(root)).records()]
    again = [r.image_id for r in create_dataset("folder", root=str(root)).records()]
    assert ids == again and len(ids) == 2
    assert os.fsencode(ids[0]) == b"caf\xe9.png"
    assert ids_fingerprint(ids) == ids_fingerprint(again)
    assert np.asarray(create_dataset("folder", root=str(root)).records()[0].image()).shape == (8, 8, 3)


@pytest.mark.skipif(sys.platform == "darwin", reason="macOS file systems refuse non-UTF-8 names")
def test_extract_a_folder_with_a_non_utf8_name(tmp_path):
    from kvpipe.pipeline.extraction import ExtractConfig, extract
    from kvpipe.store import FeatureStore
    from kvpipe.store.verify import verify_store

    root = tmp_path / "imgs"
    root.mkdir()
    Image.fromarray(np.zeros((28, 28, 3), np.uint8)).save(open(os.fsencode(root) + b"/caf\xe9.png", "wb"), format="PNG")
    out = tmp_path / "s"
    res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root), out=str(out),
                                batch_size=1, part_size=1))
    assert res.images_ok == 1
    s = FeatureStore.open(out)
    assert [r.image_id for r in s.images()] == ["caf\\xe9.png"] and verify_store(out).ok


def list_with_timeout(root: Path) -> list[str]:
    out: list = []
    t = threading.Thread(target=lambda: out.append([r.image_id for r in create_dataset("folder", root=str(root)).records()]),
                         daemon=True)
    t.start()
    t.join(30)
    assert out, "listing the folder did not finish"
    return out[0]


def test_symlink_loop_lists_each_image_once(tmp_path):
    root = tmp_path / "imgs"
    (root / "a" / "b").mkdir(parents=True)
    png(root / "a" / "b" / "x.png")
    png(root / "top.png")
    (root / "a" / "b" / "up").symlink_to(root, target_is_directory=True)  # a loop back to the root
    assert list_with_timeout(root) == ["a/b/x.png", "top.png"]


def test_two_self_links_add_nothing(tmp_path):
    root = tmp_path / "imgs"
    root.mkdir()
    png(root / "one.png")
    (root / "self1").symlink_to(".", target_is_directory=True)
    (root / "self2").symlink_to(root, target_is_directory=True)
    assert list_with_timeout(root) == ["one.png"]


def test_a_linked_folder_outside_the_root_is_still_followed(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    png(outside / "far.png")
    root = tmp_path / "imgs"
    root.mkdir()
    (root / "link").symlink_to(outside, target_is_directory=True)
    assert list_with_timeout(root) == ["link/far.png"]
