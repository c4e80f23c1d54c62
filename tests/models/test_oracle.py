"""Oracle tests: stored K/V equal the model's own cache at image positions.

For every family's tiny preset: a non-square image, an any-res image with several crops
(LLaVA families), and a batch of differently sized images whose batched capture equals the
one-at-a-time capture.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.models import load_model

from fixtures.images import noise_image

TINY = ["tiny-qwen25vl", "tiny-qwen2vl", "tiny-llava-ov", "tiny-llava-next-llama3"]


@pytest.fixture(scope="module", params=TINY)
def adapter(request):
    return load_model(request.param)


def all_of(adapter, kinds=("keys", "values", "post_proj"), rope="post-rope") -> Selection:
    return Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), kinds, rope)


def reference_cache(adapter, img: Image.Image, prefix: str = ""):
    """The plain HF forward (full model, LM head included) on one image."""
    batch = adapter.preprocess([img], prefix)
    with torch.no_grad():
        out = adapter.model(**batch.inputs, use_cache=True)
    return out.past_key_values, batch.layouts[0].positions


@pytest.mark.parametrize("size", [(224, 168), (84, 140)])
def test_stored_kv_equal_model_cache(adapter, size):
    img = noise_image(*size, seed=1)
    got = run_capture(adapter, adapter.preprocess([img]), all_of(adapter))[0]
    cache, pos = reference_cache(adapter, img)
    assert got["keys"].shape == (adapter.n_layers, adapter.n_kv_heads, pos.numel(), adapter.head_dim)
    for layer in range(adapter.n_layers):
        assert torch.equal(got["values"][layer], cache.layers[layer].values[0][:, pos])
        assert torch.equal(got["keys"][layer], cache.layers[layer].keys[0][:, pos])


def test_base_view_equals_model_cache_at_base_positions(adapter):
    """--views base: the stored tokens are the model's cache at the base view's positions (the
    model still sees every token), the layout one base segment at offset 0."""
    img = noise_image(224, 168, seed=5)
    batch = adapter.preprocess([img])
    base = batch.layouts[0].base
    got = run_capture(adapter, batch.views("base"), all_of(adapter))[0]
    cache, pos = reference_cache(adapter, img)
    keep = pos[base.offset: base.offset + base.n_tokens]
    assert batch.views("base").layouts[0].segments[0].offset == 0
    assert got["values"].shape[2] == base.n_tokens == base.rows * base.cols
    assert (base.n_tokens < pos.numel()) == adapter.multi_view
    for layer in range(adapter.n_layers):
        assert torch.equal(got["values"][layer], cache.layers[layer].values[0][:, keep])
        assert torch.equal(got["keys"][layer], cache.layers[layer].keys[0][:, keep])


def test_batched_equals_one_at_a_time(adapter):
    imgs = [noise_image(224, 168, 2), noise_image(84, 140, 3), noise_image(112, 112, 4)]
    sel = all_of(adapter)
    batched = run_capture(adapter, adapter.preprocess(imgs), sel)
    for img, got in zip(imgs, batched):
        single = run_capture(adapter, adapter.preprocess([img]), sel)[0]
        for kind in sel.kinds:
            assert got[kind].shape == single[kind].shape
            torch.testing.assert_close(got[kind], single[kind], atol=1e-6, rtol=0)


def test_chosen_layers_and_heads_are_slices_of_the_whole(adapter):
    batch = adapter.preprocess([noise_image(112, 84, 7), noise_image(84, 112, 8)])
    whole = run_capture(adapter, batch, all_of(adapter, ("keys", "values")))
    layers, heads = (0, adapter.n_layers - 1), (adapter.n_kv_heads - 1,)
    part = run_capture(adapter, batch, Selection(layers, heads, ("keys", "values")))
    for w, p in zip(whole, part):
        for kind in ("keys", "values"):
            assert torch.equal(p[kind], w[kind][list(layers)][:, list(heads)])


def test_prefix_changes_image_kv_and_is_recorded(adapter):
    img = noise_image(112, 84, 5)
    plain = adapter.preprocess([img])
    prefixed = adapter.preprocess([img], prefix="a photo of a dog")
    assert len(prefixed.prefix_ids[0]) > len(plain.prefix_ids[0])
    sel = all_of(adapter, ("values",))
    a = run_capture(adapter, plain, sel)[0]["values"]
    b = run_capture(adapter, prefixed, sel)[0]["values"]
    assert not torch.allclose(a[-1], b[-1])  # the text before the image changes image values
    cache, pos = reference_cache(adapter, img, "a photo of a dog")
    assert torch.equal(b[-1], cache.layers[-1].values[0][:, pos])


def test_pre_rope_keys_equal_k_proj(adapter):
    img = noise_image(112, 84, 6)
    batch = adapter.preprocess([img])
    got = run_capture(adapter, batch, all_of(adapter, ("keys",), "pre-rope"))[0]["keys"]
    seen = {}
    layer = adapter.decoder_layers()[0].self_attn.k_proj
    h = layer.register_forward_hook(lambda m, i, o: seen.setdefault("k", o))
    with torch.no_grad():
        adapter.model(**batch.inputs)
    h.remove()
    pos = batch.layouts[0].positions
    ref = seen["k"][0, pos].view(-1, adapter.n_kv_heads, adapter.head_dim).transpose(0, 1)
    assert torch.equal(got[0], ref)
    post = run_capture(adapter, batch, all_of(adapter, ("keys",)))[0]["keys"]
    assert not torch.allclose(got[0], post[0])  # RoPE was applied to the cached keys


def test_post_proj_is_projector_output(adapter):
    """post_proj = what get_image_features hands the LM (for LLaVA: packed base + crops + newlines)."""
    img = noise_image(112, 84, 7)
    batch = adapter.preprocess([img])
    got = run_capture(adapter, batch, all_of(adapter, ("post_proj",)))[0]["post_proj"]
    assert got.shape == (batch.layouts[0].n_tokens, adapter.hidden_size)
    with torch.no_grad():
        feats = adapter.model.model.get_image_features(
            **{k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
    ref = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    torch.testing.assert_close(got, ref.reshape(got.shape).float(), atol=1e-6, rtol=0)


# ---- LLaVA any-res layouts --------------------------------------------------------------
LLAVA = [n for n in TINY if "llava" in n]


def newline_mask(layout) -> torch.Tensor:
    """True at the layout's newline tokens (the last token of every row of a newline segment)."""
    mask = torch.zeros(layout.n_tokens, dtype=torch.bool)
    for seg in layout.segments:
        if seg.newline:
            for r in range(seg.rows):
                mask[seg.offset + r * (seg.cols + 1) + seg.cols] = True
    return mask


def check_capture(adapter, img, batch):
    """Stored K/V equal the model's cache, and exactly the layout's newline tokens hold image_newline."""
    got = run_capture(adapter, batch, all_of(adapter))[0]
    cache, pos = reference_cache(adapter, img)
    for layer in range(adapter.n_layers):
        assert torch.equal(got["values"][layer], cache.layers[layer].values[0][:, pos])
        assert torch.equal(got["keys"][layer], cache.layers[layer].keys[0][:, pos])
    nl = newline_mask(batch.layouts[0])
    newline = adapter.model.model.image_newline.float()
    assert torch.equal(got["post_proj"][nl], newline.expand(int(nl.sum()), -1))
    assert not (got["post_proj"][~nl] == newline).all(-1).any()


@pytest.mark.parametrize("adapter", LLAVA, indirect=True)
def test_anyres_image_has_crops_layout(adapter):
    img = noise_image(130, 90, seed=8)  # best pinpoint 112x112: base view + 2x2 crops of 4x4 tokens
    batch = adapter.preprocess([img])
    assert batch.inputs["pixel_values"].shape[1] == 5
    lay = batch.layouts[0]
    base, crops = lay.segments
    assert (base.name, base.offset, base.rows, base.cols, base.newline) == ("base", 0, 4, 4, False)
    # the 8x8 crops grid cropped back to 130:90 -> round(90 * 8 / 130) = 6 rows, each + 1 newline
    assert (crops.name, crops.offset, crops.rows, crops.cols, crops.newline) == ("crops", 16, 6, 8, True)
    assert sum(s.n_tokens for s in lay.segments) == lay.n_tokens == 16 + 6 * 9
    check_capture(adapter, img, batch)


def test_onevision_shrinks_large_crop_grids():
    """anyres_max_N: a crops grid over ~N base views is interpolated down (here N=1: 6x8 -> 3x4)."""
    adapter = load_model("tiny-llava-ov")
    adapter.model.config.vision_aspect_ratio = adapter.processor.vision_aspect_ratio = "anyres_max_1"
    img = noise_image(130, 90, seed=9)
    batch = adapter.preprocess([img])
    crops = batch.layouts[0].segments[1]
    assert (crops.rows, crops.cols) == (3, 4)  # ratio sqrt(48 / 16) = 1.73 > 1.1
    assert batch.layouts[0].n_tokens == 16 + 3 * 5
    check_capture(adapter, img, batch)


def test_onevision_multi_image_sample_is_base_plus_one_newline():
    """Several images in one sample are not tiled: base view + one newline token each."""
    adapter = load_model("tiny-llava-ov")
    imgs = [noise_image(130, 90, 10), noise_image(84, 140, 11)]
    enc = adapter.processor(text=["<image><image>"], images=[imgs], return_tensors="pt")
    n = int((enc["input_ids"] == adapter.image_token_id).sum())
    segs = [adapter.segments(enc, i, n // 2) for i in range(2)]
    assert all([s.name for s in seg] == ["base", "newline"] for seg in segs)
    assert sum(s.n_tokens for seg in segs for s in seg) == n == 2 * (16 + 1)
    with torch.no_grad():
        adapter.model(**enc)  # the model's own placeholder check agrees with that count


# ---- presets of the real checkpoints ---------------------------------------------------
# name: (text: hidden, layers, heads, kv heads, intermediate, vocab, rope_theta), vision fields
PRESETS = {
    "qwen2vl": ((3584, 28, 28, 4, 18944, 152064, 1e6), {"depth": 32, "embed_dim": 1280, "num_heads": 16}),
    "qwen25vl": ((3584, 28, 28, 4, 18944, 152064, 1e6), {"depth": 32, "hidden_size": 1280, "num_heads": 16}),
    # LLaVA-OV -hf: vocab = Qwen2's + <image>, <video>, padded to 64; SigLIP stored with 26 of 27 layers
    "llava-ov": ((3584, 28, 28, 4, 18944, 152128, 1e6), "siglip"),
    "llava-ov-0.5b": ((896, 24, 14, 2, 4864, 152000, 1e6), "siglip"),
    "llava-ov-72b": ((8192, 80, 64, 8, 29568, 152128, 1e6), "siglip"),
    "llava-next-llama3": ((4096, 32, 32, 8, 14336, 128320, 5e5),
                          {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                           "intermediate_size": 4096, "image_size": 336, "patch_size": 14}),
    "llava15": ((4096, 32, 32, 32, 11008, 32064, 1e4),
                {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                 "intermediate_size": 4096, "image_size": 336, "patch_size": 14}),
    "qwen3vl": ((4096, 36, 32, 8, 12288, 151936, 5e6), {"depth": 27, "hidden_size": 1152, "num_heads": 16,
                                                         "patch_size": 16, "deepstack_visual_indexes": [8, 16, 24]}),
    "gemma3": ((2560, 34, 8, 4, 10240, 262208, 1e6),
               {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                "intermediate_size": 4304, "image_size": 896, "patch_size": 14}),
    "smolvlm2": ((2048, 24, 32, 32, 8192, 49280, 1.3e5),
                 {"hidden_size": 1152, "num_hidden_layers": 27, "num_attention_heads": 16,
                  "intermediate_size": 4304, "image_size": 384, "patch_size": 14}),
    "internvl3": ((3584, 28, 28, 4, 18944, 151674, 1e6),
                  {"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
                   "intermediate_size": 4096, "image_size": [448, 448], "patch_size": [14, 14]}),
}
SIGLIP = {"hidden_size": 1152, "num_hidden_layers": 26, "num_attention_heads": 16, "intermediate_size": 4304,
          "image_size": 384, "patch_size": 14}


def test_every_real_checkpoint_has_a_preset_check():
    from kvpipe.pipeline.models import MODELS

    # MLMs; the vision-encoder presets are checked in test_encoders.py
    assert set(PRESETS) == {n for n, e in MODELS.items() if not e.tiny and e.adapter.encodes_text}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_config_shapes(name):
    from transformers import LlavaOnevisionConfig

    from kvpipe.pipeline.models import MODELS

    cfg = MODELS.get(name).preset()  # a config only: no weights are built
    text, vision = PRESETS[name]
    t = cfg.get_text_config()
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size, t.vocab_size,
            t.rope_parameters.get("full_attention", t.rope_parameters)["rope_theta"]) == text  # Gemma 3: per layer type
    for key, value in (SIGLIP if vision == "siglip" else vision).items():
        assert getattr(cfg.vision_config, key) == value, key
    if name.startswith("llava-ov"):
        assert cfg.image_grid_pinpoints == LlavaOnevisionConfig().image_grid_pinpoints  # the -hf checkpoints'
        assert len(cfg.image_grid_pinpoints) == 36 and cfg.image_grid_pinpoints[-1] == [2304, 2304]
        assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.vision_aspect_ratio) == (
            -1, "full", "anyres_max_9")
        assert (cfg.image_token_id, cfg.video_token_id) == (151646, 151647)
    if name == "llava-next-llama3":
        assert cfg.image_grid_pinpoints == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
        assert (cfg.vision_feature_layer, cfg.vision_feature_select_strategy, cfg.image_token_id) == (
            -2, "default", 128256)
