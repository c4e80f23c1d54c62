"""Inputs that used to break an extraction: an image the processor refuses, reversed ranges."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.extraction.config import parse_index_spec
from kvpipe.store import FeatureStore


def _folder(root, sizes):
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i}.png")
    return root


def test_an_image_the_processor_refuses_fails_alone(tmp_path):
    """Qwen's processor raises on a 1x2000 strip (aspect ratio over 200): that image is recorded
    as failed, the other images of its batch and part are stored, and the part commits."""
    root = _folder(tmp_path / "imgs", [(64, 48), (1, 2000), (56, 56), (40, 64)])
    out = tmp_path / "s"
    res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root), out=str(out),
                                batch_size=2, part_size=4))
    assert (res.images_ok, res.images_failed) == (3, 1)
    rows = FeatureStore.open(out).images(ok_only=False)
    failed = [r for r in rows if not r.ok]
    assert [r.image_id for r in failed] == ["img1.png"]
    assert "refused this 1x2000 image" in failed[0].error and "aspect ratio" in failed[0].error
    assert len(FeatureStore.open(out).images()) == 3
    # the rerun has nothing left to do: the part is committed, not retried forever
    again = extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root), out=str(out),
                                  batch_size=2, part_size=4))
    assert again.parts_done == 0 and again.parts_skipped == 1
    with pytest.raises(DataError, match="refused this 1x2000 image.*--strict"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root),
                              out=str(tmp_path / "strict"), batch_size=2, part_size=4, strict=True))


@pytest.mark.parametrize("spec,message", [("1-0", "runs backwards; write 0-1"), (" , ", "is not a list like")])
def test_reversed_or_empty_ranges_are_refused(spec, message):
    with pytest.raises(UsageError, match=message):
        parse_index_spec(spec, 4, "--layers")


def test_reversed_layers_create_no_store(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(UsageError, match="--layers '1-0'"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=2, layers="1-0"))
    assert not out.exists()
