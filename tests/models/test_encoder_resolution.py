"""Each vision-encoder baseline runs at the resolution its paper number comes from (catalog data),
with the token grid that resolution gives; dino-vitb8 at 480p as DINO's DAVIS evaluation."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.pipeline.models import MODELS
from kvpipe.pipeline.models.catalog import check_resolution, resolved_hw
from kvpipe.pipeline.models.loading import load_model

# name -> (resolution, checkpoint, base grid (rows, cols) of an 854 x 480 DAVIS frame)
BASELINES = {
    "siglip": ("384x384", "google/siglip-so400m-patch14-384", (27, 27)),
    "clip-vit-l14": ("224x224", "openai/clip-vit-large-patch14", (16, 16)),
    "clip-vit-l14-336": ("336x336", "openai/clip-vit-large-patch14-336", (24, 24)),
    "dino-vitb16": ("224x224", "facebook/dino-vitb16", (14, 14)),
    "dino-vitb8": ("short=480/64", "facebook/dino-vitb8", (60, 104)),  # 832 x 480 px, 8 px patches
    "dino-vitb8-224": ("224x224", "facebook/dino-vitb8", (28, 28)),
    "dinov2-base": ("224x224", "facebook/dinov2-base", (16, 16)),
    "dinov2-large": ("224x224", "facebook/dinov2-large", (16, 16)),
}


def preset_adapter(name: str):
    """The adapter over the preset config (no weights): enough to preprocess."""
    entry = MODELS.get(name)
    config = entry.preset()
    shell = torch.nn.Module()
    shell.config = config
    return entry.adapter(shell, entry.adapter.build_processor(config, tiny=entry.tiny), {"name": name})


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_baseline_resolution_checkpoint_and_token_grid(name):
    resolution, checkpoint, grid = BASELINES[name]
    entry = MODELS.get(name)
    assert (entry.resolution, entry.checkpoint) == (resolution, checkpoint)
    batch = preset_adapter(name).preprocess([Image.new("RGB", (854, 480))])
    seg = batch.layouts[0].segments[0]
    assert (seg.rows, seg.cols) == grid
    assert batch.layouts[0].n_tokens == grid[0] * grid[1]


def test_dinos_480p_rule():
    # DINO read_frame: short side 480, the long side scaled and floored to a multiple of 64
    assert resolved_hw("short=480/64", 480, 854) == (480, 832)
    assert resolved_hw("short=480/64", 854, 480) == (832, 480)  # portrait
    assert resolved_hw("short=480/64", 480, 910) == (480, 896)
    assert resolved_hw("384x384", 480, 854) == (384, 384)
    for bad in ("480", "short=480", "0x4", "short=a/64"):
        with pytest.raises(UsageError, match="resolution"):
            check_resolution(bad)


def test_own_size_batches_equal_one_image_at_a_time():
    adapter = load_model("tiny-dino-vitb8", device="cpu")
    assert "short side 32 px" in adapter.source["features"]
    images = [Image.effect_noise((854, 480), 40 + 10 * i).convert("RGB") for i in range(2)]
    images.insert(1, Image.effect_noise((100, 160), 30).convert("RGB"))  # portrait: 48 x 32 px
    batch = adapter.preprocess(images)
    grids = [(l.segments[0].rows, l.segments[0].cols) for l in batch.layouts]
    assert grids == [(4, 6), (6, 4), (4, 6)]

    class Sel:
        layers = (0, 1)
        kinds = ("hidden",)

    together, counts = adapter.gather(batch, Sel())
    assert counts == [24, 24, 24]
    start = 0
    for im, n in zip(images, counts):
        alone, _ = adapter.gather(adapter.preprocess([im]), Sel())
        assert torch.equal(together["hidden"][:, :, start:start + n], alone["hidden"])
        start += n
    # and equal to the model run on the image resized to its own size directly
    direct = adapter.processor(images=[images[0]], size={"height": 32, "width": 48}, return_tensors="pt")
    states = adapter.model(pixel_values=direct["pixel_values"], interpolate_pos_encoding=True,
                           output_hidden_states=True).hidden_states
    assert torch.equal(together["hidden"][1, 0, :24], states[2][0, 1:])
