"""The generic adapter (--model any:HUB_ID_OR_DIR): tiny checkpoints saved to a directory and loaded
back through any:DIR capture what the model caches, and cross-attention architectures are refused."""

from __future__ import annotations

import pytest
import torch
from fixtures.images import noise_image as image

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.capture import Selection, model_cache, run_capture
from kvpipe.pipeline.models.catalog import model_source




@pytest.mark.parametrize("name, grid", [("tiny-llava15", (4, 4)), ("tiny-gemma3", (4, 4)), ("tiny-qwen3vl", None)])
def test_saved_tiny_model_through_any(name, grid, tmp_path):
    preset = load_model(name)
    preset.model.save_pretrained(tmp_path)
    preset.processor.save_pretrained(tmp_path)
    adapter = load_model(f"any:{tmp_path}")
    assert adapter.family == "generic" and adapter.source["checkpoint"] == str(tmp_path)
    imgs = [image(224, 168, 1), image(84, 140, 2)]
    # Qwen-style templates put <|vision_start|> before the placeholder: the generic adapter's prefix goes
    # after it, the family adapter's before it, so only llava15/gemma3 compare with a prefix
    prefix = "" if name == "tiny-qwen3vl" else "a photo of"
    batch = adapter.preprocess(imgs, prefix)
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"))
    got = run_capture(adapter, batch, sel)
    with torch.no_grad():
        cache = model_cache(adapter.model(**batch.inputs, use_cache=True))
    ref = preset.preprocess(imgs, prefix)
    want = run_capture(preset, ref, sel)
    for i, lay in enumerate(batch.layouts):
        ids = batch.inputs["input_ids"][i]
        assert torch.equal(lay.positions, torch.where(ids == adapter.image_token_id)[0])
        base = lay.segments[0]
        if name == "tiny-qwen3vl":  # the processor says the grid (image_grid_thw): the family's own
            assert lay.segments == ref.layouts[i].segments
        else:  # no grid from the processor: one segment of 1 x n
            assert (base.rows, base.cols) == (1, lay.n_tokens)
        for layer in range(adapter.n_layers):
            assert torch.equal(got[i]["keys"][layer], cache.layers[layer].keys[i][:, lay.positions])
            assert torch.equal(got[i]["values"][layer], cache.layers[layer].values[i][:, lay.positions])
        assert torch.equal(got[i]["values"], want[i]["values"])  # the same as the family adapter


def test_cross_attention_architectures_are_refused_in_one_line(tmp_path):
    from transformers import MllamaConfig

    MllamaConfig(text_config={"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
                              "num_key_value_heads": 2, "intermediate_size": 128, "cross_attention_layers": [1],
                              "vocab_size": 256},
                 vision_config={"num_hidden_layers": 2, "num_global_layers": 1, "hidden_size": 32,
                                "intermediate_size": 64, "attention_heads": 2, "image_size": 56,
                                "patch_size": 14, "vision_output_dim": 64}).save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="cross-attention") as err:
        load_model(f"any:{tmp_path}")
    assert "\n" not in str(err.value) and "no image keys/values to store" in str(err.value)


def test_any_sources_and_usage_errors(tmp_path):
    assert model_source(f"any:{tmp_path}") == ("any-local", str(tmp_path))
    assert model_source("any:org/model") == ("any-hub", "org/model")
    for bad in ("any:", "any:./missing", "any:nohub"):
        with pytest.raises(UsageError):
            model_source(bad)
    with pytest.raises(UsageError, match="--init random"):
        model_source("any:org/model", init="random")


def test_extract_through_any(tmp_path):
    from kvpipe.pipeline.extraction import ExtractConfig, extract
    from kvpipe.store import FeatureStore

    ckpt = tmp_path / "ckpt"
    preset = load_model("tiny-llava15")
    preset.model.save_pretrained(ckpt)
    preset.processor.save_pretrained(ckpt)
    out = tmp_path / "store"
    extract(ExtractConfig(model=f"any:{ckpt}", dataset="synthetic", out=str(out), limit=2, batch_size=2, part_size=2))
    store = FeatureStore.open(out)
    assert store.meta.model["family"] == "generic" and store.meta.model["checkpoint"] == str(ckpt)
    assert [r.status for r in store.rows] == ["ok", "ok"]
    assert (store.rows[0].grid_h, store.rows[0].grid_w) == (1, 16)
