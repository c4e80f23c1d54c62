"""The fused decoder kernels compute what transformers' modules compute, and step aside cleanly."""

from __future__ import annotations

import logging

import pytest
import torch
from PIL import Image
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.qwen2.modeling_qwen2 import Qwen2MLP, Qwen2RMSNorm

from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models import text_kernels
from kvpipe.pipeline.models.text_kernels import Fused, fuse_decoder_kernels, rms_norm, silu_mul


def _bf16(*shape: int) -> torch.Tensor:
    return (torch.randn(*shape) * 3).to(torch.bfloat16)


def test_functions_equal_transformers_modules_bit_for_bit():
    torch.manual_seed(0)
    norm = Qwen2RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    norm.weight.data = _bf16(64)
    x = _bf16(2, 5, 64)
    assert torch.equal(rms_norm(x, norm.weight, norm.variance_epsilon), norm(x))

    cfg = modeling_qwen2.Qwen2Config(hidden_size=16, intermediate_size=40, hidden_act="silu")
    mlp = Qwen2MLP(cfg).to(torch.bfloat16)
    x = _bf16(3, 16)
    assert torch.equal(mlp.down_proj(silu_mul(mlp.gate_proj(x), mlp.up_proj(x))), mlp(x))


def test_nothing_changes_on_the_cpu():
    adapter = load_model("tiny-llava-ov")
    assert fuse_decoder_kernels(adapter.language_model(), adapter.device) == []
    assert adapter.accelerate() == ["image sizes read on the host (no device syncs while packing features)"]
    assert adapter.host_inputs == ("image_sizes", "batch_num_images")


@pytest.mark.parametrize("name", ["tiny-llava-ov", "tiny-qwen25vl"])
def test_patched_decoder_stores_the_same_kv(name, monkeypatch):
    """Routed through the fused functions (run eagerly here), every captured number is unchanged,
    and every norm and MLP of the decoder is routed."""
    monkeypatch.setattr(text_kernels, "available", lambda device: True)
    for fused in text_kernels.FUSED.values():
        monkeypatch.setattr(fused, "compiled", fused.fn)
    monkeypatch.setattr(modeling_qwen2, "apply_rotary_pos_emb", modeling_qwen2.apply_rotary_pos_emb)  # restored after
    images = [Image.new("RGB", (56, 84), (200, 30, 30)), Image.effect_noise((112, 56), 40).convert("RGB")]
    stock, fast = load_model(name), load_model(name)
    changed = fast.accelerate()
    layers = fast.n_layers
    assert f"RMSNorm: {2 * layers + 1} modules as one fused kernel each" in changed
    assert f"MLP activation: {layers} modules with silu(gate) * up fused" in changed
    assert any(c.startswith("rotary embedding fused (modeling_") for c in changed)
    sel = Selection(tuple(range(stock.n_layers)), tuple(range(stock.n_kv_heads)), ("keys", "values", "post_proj"))
    for a, b in zip(run_capture(stock, stock.preprocess(images), sel), run_capture(fast, fast.preprocess(images), sel)):
        for kind in a:
            torch.testing.assert_close(a[kind], b[kind], atol=1e-5, rtol=1e-5)


def test_a_failing_compiler_falls_back_to_eager(monkeypatch, caplog):
    def broken_compile(fn, **_):
        def run(*args):
            raise RuntimeError("no C compiler found\nmore detail")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fused = Fused(silu_mul)
    g, u = torch.randn(4, 6), torch.randn(4, 6)
    with caplog.at_level(logging.WARNING, logger="kvpipe"):
        assert torch.equal(fused(g, u), silu_mul(g, u))
        assert torch.equal(fused(g, u), silu_mul(g, u))  # eager from now on, one warning
    assert [r.getMessage() for r in caplog.records] == [
        "kvpipe: fused silu_mul kernel unavailable (no C compiler found); using eager PyTorch"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need CUDA")
def test_compiled_kernels_on_cuda_round_like_eager():
    torch.manual_seed(0)
    x, w = _bf16(3, 700, 256).cuda(), _bf16(256).cuda()
    got = Fused(rms_norm)(x, w, 1e-6)
    want = rms_norm(x, w, 1e-6)
    assert (got != want).float().mean() < 1e-3  # only where a float32 sum is taken in another order
    g, u = _bf16(700, 512).cuda(), _bf16(700, 512).cuda()
    assert torch.equal(Fused(silu_mul)(g, u), silu_mul(g, u))
