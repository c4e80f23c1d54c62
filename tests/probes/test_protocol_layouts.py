"""One token layout for native-resolution models: ``kvpipe extract --image-size WxH`` resizes
every image before the processor, records the size in the store (a different feature set), and
makes input-agnostic's per-position variance defined; without it, a one-line error names it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kvpipe.errors import StoreError, UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.probes import run_probe
from kvpipe.store import FeatureStore


def odd_sizes(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(56, 112), (112, 56), (84, 84)]):
        root.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB").save(root / f"im{i}.png")
    return root


def test_image_size_gives_one_layout_and_a_new_feature_set(tmp_path):
    root = odd_sizes(tmp_path / "imgs")
    common = dict(model="tiny-qwen25vl", dataset="folder", data_root=str(root), batch_size=3, part_size=3,
                  layers="-1")
    extract(ExtractConfig(out=str(tmp_path / "native"), **common))
    native = FeatureStore.open(tmp_path / "native")
    assert len({(r.grid_h, r.grid_w) for r in native.images()}) == 3  # Qwen: one grid per image size
    with pytest.raises(UsageError, match="--image-size") as err:
        run_probe(tmp_path / "native", "input-agnostic")
    assert "estimator=pooled" in str(err.value) and "\n" not in str(err.value)

    extract(ExtractConfig(out=str(tmp_path / "fixed"), image_size=(56, 56), **common))
    fixed = FeatureStore.open(tmp_path / "fixed")
    assert {(r.grid_h, r.grid_w) for r in fixed.images()} == {(2, 2)}  # 56 px / 14 px patches / 2 x 2 merge
    assert sorted((r.image_w, r.image_h) for r in fixed.images()) == [(56, 112), (84, 84), (112, 56)]  # originals
    assert fixed.meta.dataset["image_size"] == [56, 56]
    assert "image_size" not in native.meta.dataset
    run = run_probe(tmp_path / "fixed", "input-agnostic", {"threshold": 1.0})
    assert any(r["metric"] == "estimator_position" for r in run.table.to_pylist())
    with pytest.raises(StoreError, match="holds another feature set .differs in dataset"):
        extract(ExtractConfig(out=str(tmp_path / "fixed"), image_size=(84, 84), **common))


def test_image_size_option_parsing():
    from kvpipe.pipeline.extraction.config import parse_image_size

    assert parse_image_size("448x448") == (448, 448)
    assert parse_image_size("640X480") == (640, 480)
    assert parse_image_size(None) is None
    for bad in ("448", "0x10", "axb"):
        with pytest.raises(UsageError, match="--image-size"):
            parse_image_size(bad)
