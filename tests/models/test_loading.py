"""Loading: a saved checkpoint directory (AutoConfig/AutoProcessor path) behaves like the preset.

Why: users point --model at local checkpoints; the local branch of load_model must pick the
right adapter from config.model_type and give bit-identical captures to the in-code preset.
"""

from __future__ import annotations

import pytest
import torch

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.models import MODELS, load_model

from fixtures.images import noise_image

TINY = MODELS.names("tiny-*")


def capture(adapter, img):
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), adapter.kinds)
    batch = adapter.preprocess([img], prefix="a photo of" if adapter.encodes_text else "")  # encoders read no text
    return batch, run_capture(adapter, batch, sel)[0]


@pytest.mark.parametrize("name", TINY)
def test_saved_tiny_checkpoint_loads_and_captures_identically(name, tmp_path):
    preset = load_model(name)
    preset.model.save_pretrained(tmp_path)
    preset.processor.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert type(loaded) is type(preset)
    assert loaded.source["init"] == "pretrained" and loaded.source["checkpoint"] == str(tmp_path)
    img = noise_image(130, 90, seed=1)
    batch_a, a = capture(preset, img)
    batch_b, b = capture(loaded, img)
    assert batch_a.prefix_ids == batch_b.prefix_ids
    assert batch_a.layouts[0].segments == batch_b.layouts[0].segments
    assert torch.equal(batch_a.layouts[0].positions, batch_b.layouts[0].positions)
    for kind in a:
        assert torch.equal(a[kind], b[kind]), kind


def test_local_directory_errors_are_one_line(tmp_path):
    with pytest.raises(UsageError, match="no such directory"):
        load_model(str(tmp_path / "missing" / "ckpt"))
    with pytest.raises(UsageError, match="no such directory"):
        load_model("./missing-ckpt")
    with pytest.raises(UsageError, match="unknown model 'tiny-llava'"):
        load_model("tiny-llava")  # no "/": a mistyped registry name, not a hub id
    with pytest.raises(ModelError, match="cannot load the config") as err:
        load_model(str(tmp_path))  # a directory without a config.json
    assert "\n" not in str(err.value)


def test_checkpoint_without_processor_is_a_one_line_model_error(tmp_path):
    load_model("tiny-llava-ov").model.save_pretrained(tmp_path)  # the processor was not saved
    with pytest.raises(ModelError, match="cannot load --model") as err:
        load_model(str(tmp_path))
    assert "\n" not in str(err.value)
