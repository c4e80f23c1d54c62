"""The batched variable-length vision attention computes what transformers' loop computes."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.vision_attention import segment_runs, varlen_attention


def test_segment_runs_hand_made():
    assert segment_runs([0, 4, 8, 10]) == [(0, 4, 2), (8, 2, 1)]
    assert segment_runs([0, 3, 3, 6, 9, 13]) == [(0, 3, 3), (9, 4, 1)]  # empty segment skipped


def test_varlen_attention_is_block_diagonal():
    torch.manual_seed(0)
    q, k, v = (torch.randn(10, 2, 4) for _ in range(3))
    cu = [0, 4, 8, 10]
    got = varlen_attention(q, k, v, segment_runs(cu), scale=0.5)
    want = []
    for a, b in zip(cu[:-1], cu[1:]):
        att = torch.softmax(torch.einsum("shd,thd->hst", q[a:b], k[a:b]) * 0.5, dim=-1)
        want.append(torch.einsum("hst,thd->shd", att, v[a:b]).reshape(b - a, 8))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ["tiny-qwen25vl", "tiny-qwen2vl"])
def test_patched_tower_gives_the_same_features(name):
    images = [Image.new("RGB", (224, 168), (200, 30, 30)), Image.effect_noise((168, 112), 40).convert("RGB")]
    stock = load_model(name)
    fast = load_model(name)
    assert fast.accelerate()
    sel = Selection(tuple(range(stock.n_layers)), tuple(range(stock.n_kv_heads)), ("keys", "values", "post_proj"))
    for a, b in zip(run_capture(stock, stock.preprocess(images), sel), run_capture(fast, fast.preprocess(images), sel)):
        for kind in a:
            torch.testing.assert_close(a[kind], b[kind], atol=1e-5, rtol=1e-5)
