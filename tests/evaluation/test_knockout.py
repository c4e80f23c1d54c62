"""Attention knock-out against a hand-written oracle, and the head sets it is given.

The oracle recomputes one layer's attention from the module's own inputs (hidden states,
rotary embeddings, the cached post-RoPE keys and values) in float64, with the image keys
removed for text queries of the chosen heads only, and compares the layer's attention output.
"""

from __future__ import annotations

import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from kvpipe.errors import UsageError
from kvpipe.pipeline.evaluation.head_sets import (HEAD_SETS, VarianceTable, layer_range, read_variance_table,
                                       select_heads)
from kvpipe.pipeline.evaluation.knockout import knockout, query_heads
from kvpipe.pipeline.models import load_model

from fixtures.images import noise_image

FAMILIES = ["tiny-qwen25vl", "tiny-llava-next-llama3", "tiny-llava-ov"]
PROMPT = "is there a dog in the image ? answer yes or no ."


@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return load_model(request.param)


def inputs_for(adapter, images: list[list[Image.Image]]) -> dict:
    return adapter.chat_inputs([PROMPT] * len(images), images)


def image_mask(adapter, inputs) -> torch.Tensor:
    return inputs["input_ids"] == adapter.image_token_id


class Recorder:
    """Records each attention module's inputs and output, and each o_proj's input (per-head outputs)."""

    def __init__(self, adapter):
        self.calls: dict[int, dict] = {}
        self.handles = []
        for layer, attn in enumerate(adapter.attention_modules()):
            self.handles.append(attn.register_forward_hook(self._attn(layer), with_kwargs=True))
            self.handles.append(attn.o_proj.register_forward_pre_hook(self._oproj(layer)))

    def _attn(self, layer):
        def hook(module, args, kwargs, output):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            self.calls.setdefault(layer, {}).update(hidden=hidden, rope=kwargs["position_embeddings"],
                                                    out=output[0])
        return hook

    def _oproj(self, layer):
        def hook(module, args):
            self.calls.setdefault(layer, {})["heads"] = args[0]
        return hook

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


def forward(adapter, inputs, heads=None, cache=None, mask=None):
    with torch.no_grad(), Recorder(adapter) as rec:
        if heads is None:
            out = adapter.model(**inputs, past_key_values=cache, use_cache=True)
        else:
            with knockout(adapter, heads, mask if mask is not None else image_mask(adapter, inputs)):
                out = adapter.model(**inputs, past_key_values=cache, use_cache=True)
    return out, rec.calls


def manual_attention(module, call, keys, values, key_ok, q_pos, image_key, q_heads):
    """One layer's attention output by hand (float64): softmax(q k^T / sqrt(d) + mask) v, then o_proj.

    key_ok [b, kv]: real (non-padding) keys; q_pos [q]: the queries' sequence positions;
    image_key [b, kv]: image-token keys, hidden from text queries of ``q_heads``."""
    rope = sys.modules[type(module).__module__].apply_rotary_pos_emb
    h = call["hidden"]
    b, q_len, _ = h.shape
    d = keys.shape[-1]
    q = module.q_proj(h).view(b, q_len, -1, d).transpose(1, 2)
    q = rope(q, q, *call["rope"])[0].double()
    n_q, group = q.shape[1], q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)
    v = values.double().repeat_interleave(group, dim=1)
    scores = q @ k.transpose(2, 3) / d**0.5
    kv_len = k.shape[2]
    allowed = (torch.arange(kv_len)[None, :] <= q_pos[:, None])[None, None] & key_ok[:, None, None, :]
    allowed = allowed.expand(b, n_q, q_len, kv_len).clone()
    image_key = torch.cat([image_key, image_key.new_zeros(b, kv_len - image_key.shape[1])], 1)  # new tokens: text
    text_query = ~image_key.gather(1, q_pos[None].expand(b, q_len))  # [b, q]
    for hq in q_heads:
        allowed[:, hq] &= ~(text_query[:, :, None] & image_key[:, None, :])
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    per_head = (probs @ v).transpose(1, 2).reshape(b, q_len, -1)
    w = module.o_proj.weight.double()
    bias = module.o_proj.bias.double() if module.o_proj.bias is not None else 0.0
    return per_head @ w.T + bias


def test_query_heads_follow_repeat_kv():
    assert query_heads(0, 4, 2) == [0, 1] and query_heads(1, 4, 2) == [2, 3]
    assert query_heads(3, 28, 4) == list(range(21, 28))  # Qwen2.5-VL 7B: 28 q / 4 kv heads
    x = torch.arange(4.0).view(1, 4, 1, 1)  # kv head g repeated: query head h reads kv head h // group
    rep = x.repeat_interleave(7, dim=1)
    assert all(int(rep[0, h]) == 3 for h in query_heads(3, 28, 4))


def test_empty_head_set_is_the_stock_model(adapter):
    inputs = inputs_for(adapter, [[noise_image(96, 72, 1)], [noise_image(60, 84, 2)]])
    ref, _ = forward(adapter, inputs)
    got, _ = forward(adapter, inputs, heads=set())
    assert torch.equal(ref.logits, got.logits)
    for layer in range(adapter.n_layers):
        assert torch.equal(ref.past_key_values.layers[layer].keys, got.past_key_values.layers[layer].keys)


def test_unchosen_layers_heads_and_image_queries_stay_stock(adapter):
    inputs = inputs_for(adapter, [[noise_image(96, 72, 1)], [noise_image(60, 84, 2)]])
    last = adapter.n_layers - 1
    ref, ref_calls = forward(adapter, inputs)
    got, calls = forward(adapter, inputs, heads={(last, 1)})
    mask = image_mask(adapter, inputs)
    for layer in range(last):  # earlier layers: untouched, bit for bit
        assert torch.equal(ref_calls[layer]["out"], calls[layer]["out"])
    d = adapter.head_dim
    n_q = adapter.text_config.num_attention_heads
    ref_heads = ref_calls[last]["heads"].view(*mask.shape, n_q, d)
    got_heads = calls[last]["heads"].view(*mask.shape, n_q, d)
    chosen = query_heads(1, n_q, adapter.n_kv_heads)
    others = [h for h in range(n_q) if h not in chosen]
    assert torch.equal(ref_heads[:, :, others], got_heads[:, :, others])  # heads of the other KV head
    assert torch.equal(ref_heads[mask], got_heads[mask])  # image queries of the chosen heads too
    text_after = ~mask & (torch.cumsum(mask, 1) > 0) & inputs["attention_mask"].bool()
    assert not torch.allclose(ref_heads[text_after][:, chosen], got_heads[text_after][:, chosen], atol=1e-4)


def test_prefill_matches_manual_attention(adapter):
    # Two rows of different image sizes: left padding, different image positions per row.
    inputs = inputs_for(adapter, [[noise_image(96, 72, 3)], [noise_image(60, 84, 4)]])
    heads = {(0, 1), (adapter.n_layers - 1, 0)}
    out, calls = forward(adapter, inputs, heads=heads)
    ref, ref_calls = forward(adapter, inputs)
    mask = image_mask(adapter, inputs)
    key_ok = inputs["attention_mask"].bool()
    L = mask.shape[1]
    n_q = adapter.text_config.num_attention_heads
    modules = adapter.attention_modules()
    for layer in range(adapter.n_layers):
        chosen = [h for (l, kv) in heads if l == layer for h in query_heads(kv, n_q, adapter.n_kv_heads)]
        cache = out.past_key_values.layers[layer]
        want = manual_attention(modules[layer], calls[layer], cache.keys, cache.values, key_ok,
                                torch.arange(L), mask, chosen)
        got = calls[layer]["out"].double()
        assert torch.allclose(got[key_ok], want[key_ok], atol=1e-5, rtol=1e-4), layer
        # The oracle without the knock-out is the stock model (so the comparison above can fail).
        ref_cache = ref.past_key_values.layers[layer]
        plain = manual_attention(modules[layer], ref_calls[layer], ref_cache.keys, ref_cache.values, key_ok,
                                 torch.arange(L), mask, [])
        assert torch.allclose(ref_calls[layer]["out"].double()[key_ok], plain[key_ok], atol=1e-5, rtol=1e-4)
    assert not torch.allclose(out.logits[:, -1], ref.logits[:, -1], atol=1e-4)


def test_decoding_step_with_cache_matches_manual_attention(adapter):
    inputs = inputs_for(adapter, [[noise_image(96, 72, 5)], [noise_image(60, 84, 6)]])
    mask = image_mask(adapter, inputs)
    heads = {(layer, kv) for layer in range(adapter.n_layers) for kv in (0,)}
    with torch.no_grad(), knockout(adapter, heads, mask):
        first = adapter.model(**inputs, use_cache=True)
        nxt = first.logits[:, -1].argmax(-1, keepdim=True)
        with Recorder(adapter) as rec:
            # generate() supplies each step's positions (Qwen's M-RoPE deltas); the last call is a cached step
            gen = adapter.model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True,
                                         pad_token_id=adapter.processor.tokenizer.pad_token_id)
    assert torch.equal(gen.sequences[:, mask.shape[1]], nxt[:, 0])
    cache = gen.past_key_values
    n_q = adapter.text_config.num_attention_heads
    key_ok = torch.cat([inputs["attention_mask"], torch.ones_like(nxt), torch.ones_like(nxt)], 1).bool()
    modules = adapter.attention_modules()
    for layer in range(adapter.n_layers):
        call = rec.calls[layer]  # the last call: the decoding step of the second new token
        assert call["hidden"].shape[1] == 1
        keys, values = cache.layers[layer].keys, cache.layers[layer].values
        kv_len = keys.shape[2]
        key_ok_l = key_ok[:, :kv_len]
        want = manual_attention(modules[layer], call, keys, values, key_ok_l, torch.tensor([kv_len - 1]), mask,
                                query_heads(0, n_q, adapter.n_kv_heads))
        assert torch.allclose(call["out"].double(), want, atol=1e-5, rtol=1e-4), layer
        plain = manual_attention(modules[layer], call, keys, values, key_ok_l, torch.tensor([kv_len - 1]), mask, [])
        assert not torch.allclose(call["out"].double(), plain, atol=1e-4)


def test_all_heads_make_text_blind_to_the_image(adapter):
    """Same size, different pixels: with every (layer, head) knocked out, text logits are identical."""
    a, b = inputs_for(adapter, [[noise_image(84, 84, 7)]]), inputs_for(adapter, [[noise_image(84, 84, 8)]])
    assert torch.equal(a["input_ids"], b["input_ids"])
    mask = image_mask(adapter, a)[0]
    after = torch.arange(mask.numel()) > torch.where(mask)[0].max()
    every = {(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_kv_heads)}
    with torch.no_grad():
        la, lb = adapter.model(**a).logits[0], adapter.model(**b).logits[0]
        assert not torch.allclose(la[after], lb[after], atol=1e-4)  # the stock model does see the image
        with knockout(adapter, every, image_mask(adapter, a)):
            ka = adapter.model(**a).logits[0]
            kb = adapter.model(**b).logits[0]
    assert torch.equal(ka[after], kb[after])
    assert not torch.allclose(ka[mask], kb[mask], atol=1e-4)  # image positions still see their image


def test_knockout_restores_the_model(adapter):
    modules = adapter.attention_modules()
    configs = [m.config for m in modules]
    with knockout(adapter, {(0, 0)}, torch.zeros(1, 3, dtype=torch.bool)):
        assert modules[0].config is not configs[0] and modules[1].config is configs[1]
    assert all(m.config is c for m, c in zip(modules, configs))
    with pytest.raises(UsageError, match="outside the model"):
        with knockout(adapter, {(adapter.n_layers, 0)}):
            pass


# ---- head sets ------------------------------------------------------------------------------------

def table(variance: dict[tuple[int, int], float], threshold: float, n_layers: int) -> VarianceTable:
    flags = {k: v < threshold for k, v in variance.items()}
    return VarianceTable(variance, flags, threshold, n_layers, 4)


def test_layer_ranges_follow_the_paper():
    assert layer_range("early", 28) == list(range(0, 8))  # the paper: first 8, next 10, last 10
    assert layer_range("middle", 28) == list(range(8, 18))
    assert layer_range("late", 28) == list(range(18, 28))
    assert layer_range("10-20", 28) == list(range(10, 21))
    assert layer_range("3,5,7", 28) == [3, 5, 7]
    assert layer_range("-1", 28) == [27]
    assert layer_range("late", 2) == [1]
    for bad in ("middle", "9-12", "x", "3-1"):
        with pytest.raises(UsageError, match="--layers"):
            layer_range(bad, 2 if bad == "middle" else 10)


def test_head_sets_and_controls():
    n_layers, n_heads = 6, 4
    rng = np.random.default_rng(0)
    variance = {(l, h): float(rng.uniform(500, 900)) for l in range(n_layers) for h in range(n_heads)}
    agnostic = {(0, 0), (0, 1), (0, 2), (0, 3), (4, 1), (5, 0), (5, 3)}
    for k in agnostic:
        variance[k] = float(rng.uniform(50, 300))
    t = table(variance, 450.0, n_layers)
    late = [4, 5]
    assert select_heads(t, "input-agnostic", late) == frozenset({(4, 1), (5, 0), (5, 3)})
    dep = select_heads(t, "input-dependent", late, seed=1)
    assert len(dep) == 3 and not dep & agnostic
    assert sum(l == 4 for l, _ in dep) == 1 and sum(l == 5 for l, _ in dep) == 2  # same count per layer
    assert select_heads(t, "input-dependent", late, seed=1) == dep  # seeded
    rand = select_heads(t, "random", late, seed=3)
    assert len(rand) == 3 and [l for l, _ in sorted(rand)] == [4, 5, 5]
    seen = {select_heads(t, "random", late, seed=s) for s in range(20)}
    assert len(seen) > 3 and any(s & agnostic for s in seen)  # random draws from all heads
    with pytest.raises(UsageError, match="input-dependent"):
        select_heads(t, "input-dependent", [0])  # layer 0: every head is input-agnostic
    with pytest.raises(UsageError, match="no input-agnostic"):
        select_heads(t, "input-agnostic", [1, 2])
    assert sorted(HEAD_SETS.names()) == ["input-agnostic", "input-dependent", "random"]


def test_read_variance_table_and_threshold_override(tmp_path):
    rows = []
    for l in range(2):
        for h in range(2):
            v = 100.0 * (1 + l * 2 + h)
            rows += [{"model": "m", "dataset": "d", "task": "input-agnostic", "layer": l, "head": h, "kind": "keys",
                      "metric": "l2_variance", "value": v},
                     {"model": "m", "dataset": "d", "task": "input-agnostic", "layer": l, "head": h, "kind": "keys",
                      "metric": "input_agnostic", "value": float(v < 250)}]
    rows.append({"model": "m", "dataset": "d", "task": "input-agnostic", "layer": -1, "head": -1, "kind": "keys",
                 "metric": "threshold_valley", "value": 250.0})
    path = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    t = read_variance_table(path, n_layers=2, n_kv_heads=2)
    assert t.threshold == 250.0 and t.flags == {(0, 0): True, (0, 1): True, (1, 0): False, (1, 1): False}
    t2 = read_variance_table(path, n_layers=2, n_kv_heads=2, threshold=350.0)
    assert t2.flags[(1, 0)] and not t2.flags[(1, 1)]
    with pytest.raises(UsageError, match="input-agnostic"):
        read_variance_table(tmp_path / "missing.parquet", n_layers=2, n_kv_heads=2)


def test_eager_attention_and_its_weights_agree_with_sdpa():
    """With eager attention (float mask, weights returned) the knock-out gives the same outputs, and the
    chosen heads' weights from text queries to image keys are exactly zero."""
    sdpa = load_model("tiny-qwen25vl")
    eager = load_model("tiny-qwen25vl")
    eager.model.set_attn_implementation("eager")
    inputs = inputs_for(sdpa, [[noise_image(96, 72, 9)], [noise_image(60, 84, 10)]])
    mask = image_mask(sdpa, inputs)
    heads = {(1, 1)}
    with torch.no_grad():
        with knockout(sdpa, heads, mask):
            want = sdpa.model(**inputs).logits
        with knockout(eager, heads, mask):
            out = eager.model(**inputs, output_attentions=True)
        plain = eager.model(**inputs, output_attentions=True)
    real = inputs["attention_mask"].bool()
    assert torch.allclose(out.logits[real], want[real], atol=1e-5)
    w, w0 = out.attentions[1], plain.attentions[1]  # [b, heads, q, kv]
    text = (~mask & real)[:, :, None] & (torch.cumsum(mask, 1) > 0)[:, :, None]
    to_image = text & mask[:, None, :]  # [b, q, kv]
    for h in query_heads(1, 4, 2):
        assert float(w[:, h][to_image].abs().max()) == 0.0 and float(w0[:, h][to_image].max()) > 0
    assert torch.allclose(w[:, :, :, :].sum(-1)[real[:, None].expand(-1, 4, -1)], torch.tensor(1.0), atol=1e-5)
    assert torch.equal(w[:, :2], w0[:, :2])  # the other KV head's query heads: stock weights
