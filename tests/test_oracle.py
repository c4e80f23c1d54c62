"""Oracle tests: stored K/V equal the model's own cache at image positions.

For every family's tiny preset: a non-square image, an any-res image with several crops
(LLaVA families), and a batch of differently sized images whose batched capture equals the
one-at-a-time capture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kvpipe.pipeline.capture import Selection, run_capture
from kvpipe.pipeline.models import load_model

TINY = ["tiny-qwen25vl", "tiny-qwen2vl"]


def image(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


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
    img = image(*size, seed=1)
    got = run_capture(adapter, adapter.preprocess([img]), all_of(adapter))[0]
    cache, pos = reference_cache(adapter, img)
    assert got["keys"].shape == (adapter.n_layers, adapter.n_kv_heads, pos.numel(), adapter.head_dim)
    for layer in range(adapter.n_layers):
        assert torch.equal(got["values"][layer], cache.layers[layer].values[0][:, pos])
        assert torch.equal(got["keys"][layer], cache.layers[layer].keys[0][:, pos])


def test_batched_equals_one_at_a_time(adapter):
    imgs = [image(224, 168, 2), image(84, 140, 3), image(112, 112, 4)]
    sel = all_of(adapter)
    batched = run_capture(adapter, adapter.preprocess(imgs), sel)
    for img, got in zip(imgs, batched):
        single = run_capture(adapter, adapter.preprocess([img]), sel)[0]
        for kind in sel.kinds:
            assert got[kind].shape == single[kind].shape
            torch.testing.assert_close(got[kind], single[kind], atol=1e-6, rtol=0)


def test_prefix_changes_image_kv_and_is_recorded(adapter):
    img = image(112, 84, 5)
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
    img = image(112, 84, 6)
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
    img = image(112, 84, 7)
    batch = adapter.preprocess([img])
    got = run_capture(adapter, batch, all_of(adapter, ("post_proj",)))[0]["post_proj"]
    assert got.shape == (batch.layouts[0].n_tokens, adapter.hidden_size)
    with torch.no_grad():
        feats = adapter.model.model.get_image_features(
            **{k: v for k, v in batch.inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")})
    ref = feats.pooler_output if hasattr(feats, "pooler_output") else feats
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    torch.testing.assert_close(got, ref.reshape(got.shape).float(), atol=1e-6, rtol=0)
