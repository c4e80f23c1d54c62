"""Qualitative figures by hand, the report's prediction pictures, and the kvpipe show page
rendered in a headless Chromium."""

from __future__ import annotations

import base64
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.base import Target
from kvpipe.probes.figures import CORRECT, GREY, WRONG, mask_overlay, matches_figure, pca_colours
from kvpipe.probes.report import build_report
from kvpipe.probes.show import build_show_page, parse_target

from fixtures.cli import ran
from fixtures.probe_stores import hand_store, seg_stores
from fixtures.video_stores import random_video_store


# ---------------------------------------------------------------------------------- figures
def test_mask_overlay_blends_palette_colours_on_the_foreground_only():
    image = Image.new("RGB", (3, 2), (200, 100, 0))
    labels = np.array([[0, 1, 2], [0, 0, 1]], np.uint8)
    out = np.asarray(mask_overlay(image, labels, alpha=0.5))
    assert out[0, 0].tolist() == [200, 100, 0]  # background untouched
    assert out[0, 1].tolist() == [164, 50, 0]  # (200+128)/2, (100+0)/2, 0: label 1 = (128, 0, 0)
    assert out[0, 2].tolist() == [100, 114, 0]  # label 2 = (0, 128, 0)
    grey = np.asarray(mask_overlay(None, labels, alpha=1.0))  # no image: a grey canvas of the mask's size
    assert grey.shape == (2, 3, 3) and grey[0, 0].tolist() == list(GREY) and grey[0, 1].tolist() == [128, 0, 0]


def test_pca_colours_by_hand():
    # tokens on a line along axis 0 (first component) plus a smaller spread on axis 1 (second)
    rows, cols = 2, 3
    x = np.zeros((rows * cols, 5))
    x[:, 0] = [0, 1, 2, 3, 4, 5]
    x[:, 1] = [1, -1, 0, 0, -1, 1]  # uncorrelated with axis 0, smaller variance
    rgb = pca_colours(x.reshape(rows, cols, 5))
    assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
    # red = the first component min-max scaled; its loading on axis 0 is positive, so red grows with x0
    assert rgb[..., 0].ravel().tolist() == [0, 51, 102, 153, 204, 255]
    assert sorted(set(rgb[..., 1].ravel().tolist())) == [0, 128, 255]  # -1, 0, 1 -> 0, 127.5, 255
    assert (rgb[..., 2] == 0).all()  # no third direction of spread: blue stays 0
    flat = pca_colours(np.ones((2, 2, 4)))
    assert (flat == 0).all()  # constant tokens: nothing to colour


def test_matches_figure_draws_green_and_red_lines():
    matches = [{"source_x": 2, "source_y": 2, "pred_x": 2, "pred_y": 2, "gt_x": 2, "gt_y": 2, "correct": True},
               {"source_x": 15, "source_y": 15, "pred_x": 15, "pred_y": 15, "gt_x": 5, "gt_y": 15, "correct": False}]
    fig = np.asarray(matches_figure(None, None, (20, 20), (20, 20), matches, radius=1))
    assert fig.shape == (20, 48, 3)  # 20 + 8 gap + 20
    assert fig[2, 10].tolist() == list(CORRECT)  # the first line crosses the gap at row 2
    assert fig[15, 22].tolist() == list(WRONG)
    assert fig[15, 33].tolist() == [255, 255, 255]  # ground truth of the second keypoint, a white dot


# ------------------------------------------------------------------------------- the report
def test_report_shows_predicted_masks(tmp_path):
    paths = seg_stores(tmp_path, "oracle")
    store = next(p for p in paths if p.endswith("semantic-seg"))
    run_probe(store, "semantic-seg", device="numpy")
    page = build_report(store, tmp_path / "out" / "report.md")
    text = page.read_text()
    assert "## semantic-seg: predictions at 0:0:values" in text
    figures = sorted((tmp_path / "out" / "figures" / "semantic-seg").glob("*.png"))
    assert len(figures) == 4  # 3 mask pictures and the PCA of the first image's keys
    for f in figures:
        assert f"](figures/semantic-seg/{f.name})" in text
    # the first picture is image im0's predicted class 3 stripe (rows 1-2 of 6, 8 px each) over grey
    first = np.asarray(Image.open(figures[0]))
    assert first.shape == (48, 64, 3)
    assert first[0, 0].tolist() == list(GREY)
    colour_3 = [128, 128, 0]
    assert first[12, 5].tolist() == [round(0.45 * 128 + 0.55 * c) for c in colour_3]


# ------------------------------------------------------------------------------ kvpipe show
def _inline_images(page: str) -> list[np.ndarray]:
    return [np.asarray(Image.open(io.BytesIO(base64.b64decode(b))))
            for b in re.findall(r'src="data:image/png;base64,([^"]+)"', page)]


def test_show_page_is_self_contained_with_saved_and_unsaved_targets(tmp_path):
    store = random_video_store(tmp_path / "video", layers=2, heads=2, frames=4)
    run_probe(store, "temporal-corr", device="numpy")
    page = build_show_page(store, "temporal-corr")
    text = page.read_text()
    assert page == store / "probes" / "temporal-corr" / "show.html"
    assert "src=\"file:" not in text and "http" not in text.replace("<!DOCTYPE html>", "")
    assert "saved in" in text and re.search(r"temporal-corr at \d:\d:values", text)
    pictures = _inline_images(text)
    assert len(pictures) == 1 + 4  # one row of frames, the PCA pictures of the video's 4 frames
    unsaved = build_show_page(store, "temporal-corr", Target("keys", 1, 1), tmp_path / "k.html")
    assert "predicted from the store (not saved)" in unsaved.read_text()
    assert not (store / "probes" / "temporal-corr" / "predictions" / "keys-L1-H1").exists()


def test_show_errors_are_one_line(tmp_path):
    store = random_video_store(tmp_path / "video", layers=1, heads=1, frames=3)
    for call, match in ((lambda: build_show_page(store, "temporal-corr"), "no saved predictions"),
                        (lambda: build_show_page(store, "input-agnostic"), "makes no per-image predictions"),
                        (lambda: build_show_page(store, "temporal-corr", Target("values", 4, 0)), "not in the store"),
                        (lambda: parse_target(1, None, "keys"), "needs both --layer and --head"),
                        (lambda: parse_target(1, 0, "post_proj"), "drop --layer and --head")):
        with pytest.raises(UsageError, match=match) as err:
            call()
        assert "\n" not in str(err.value)


def test_show_cli_for_correspondences(tmp_path):
    store = hand_store(tmp_path / "hand")
    out = ran("probe", "--task", "semantic-corr", "--store", store)
    assert "predictions:" in out.stdout
    page = tmp_path / "page.html"
    shown = ran("show", "--store", store, "--task", "semantic-corr", "--out", page)
    assert str(page) in shown.stdout.replace("\n", "")
    pictures = _inline_images(page.read_text())
    assert pictures[0].shape == (40, 48, 3)  # 20-px source and 40-px-tall target side by side, 8 px apart
    bad = ran("show", "--store", store, "--task", "semantic-corr", "--out", tmp_path / "page.txt", check=False)
    assert bad.code == 2 and "name a .html file" in bad.stderr


CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium binary (Debian: apt-get install chromium)")
def test_show_page_renders_in_headless_chromium(tmp_path):
    store = random_video_store(tmp_path / "video", layers=1, heads=2, frames=4)
    run_probe(store, "temporal-corr", device="numpy")
    page = build_show_page(store, "temporal-corr", out=tmp_path / "page.html")
    n_img = page.read_text().count("<img ")
    assert n_img == 5
    args = [CHROMIUM, "--headless", "--disable-gpu", "--no-sandbox", "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(args + ["--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom)
    assert body, dom[:500]
    # the page's own script counted its pictures after load: every one decoded, none broken
    assert f'data-images="{n_img}"' in body.group(1) and f'data-rendered="{n_img}"' in body.group(1)
    shot = tmp_path / "shot.png"
    subprocess.run(args + ["--window-size=900,700", f"--screenshot={shot}", page.as_uri()], capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("RGB"))
    # the frames row: the palette's dark red (object 1) and dark green (object 2) blended on grey
    blended = {tuple(round(0.45 * 128 + 0.55 * c) for c in colour) for colour in ((128, 0, 0), (0, 128, 0))}
    found = {tuple(p) for p in pixels.reshape(-1, 3)[::7].tolist()}
    assert blended & found


def test_images_come_back_through_the_stores_dataset_adapter():
    """A synthetic store's images are rendered again from the options its metadata records;
    a dataset that cannot be opened here gives None and says why."""
    from types import SimpleNamespace

    from kvpipe.pipeline.datasets import create_dataset
    from kvpipe.probes.images import ImageSource
    from kvpipe.store.schema import DatasetInfo

    desc = create_dataset("synthetic", n_videos=1, n_frames=2, width=64, height=48, seed=3).describe()
    store = SimpleNamespace(meta=SimpleNamespace(dataset=DatasetInfo.from_dict(desc)))
    source = ImageSource(store)
    want = create_dataset("synthetic", n_videos=1, n_frames=2, width=64, height=48, seed=3).records()[1].image()
    got = source.get("video00/00001")
    assert got.size == (64, 48) and np.array_equal(np.asarray(got), np.asarray(want)) and source.problem == ""
    assert source.get("no/such/image") is None
    gone = ImageSource(SimpleNamespace(meta=SimpleNamespace(dataset=DatasetInfo.from_dict(
        {"name": "davis", "root": "/nonexistent/DAVIS", "split": "val"}))))
    assert gone.get("bear/00000") is None and "unavailable" in gone.problem and "\n" not in gone.problem
