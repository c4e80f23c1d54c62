"""The checklist every MLM family passes, on its tiny preset (docs/ARCHITECTURE.md, "Adding a family").

1. oracle: stored K/V equal the model's own cache at the image positions, bit for bit in float32,
   for non-square images, a batch of mixed sizes and (families that tile) a multi-tile image;
2. the token layout: base segment first, tiles as further segments, covering every image token;
3. the text-query pass and --prefix;
4. knock-out: an empty head set is the stock model, every head blinds the text to the image,
   eager and SDPA attention agree;
5. answer: batched generation equals one question at a time, with one and two images;
6. the synthetic dataset extracts and every probe it supports runs on the store.
"""

from __future__ import annotations

import pytest
import torch
from fixtures.images import noise_image as image

from kvpipe.pipeline.evaluation.answer import answer_items
from kvpipe.pipeline.evaluation.knockout import knockout
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.capture import Selection, model_cache, run_capture, run_text_capture
from kvpipe.pipeline.vqa.base import VQAItem

FAMILIES = ["tiny-llava15", "tiny-qwen3vl", "tiny-gemma3", "tiny-smolvlm2", "tiny-internvl3"]
# families that tile: an image size that gives several tiles, and the expected segment names
TILED: dict[str, tuple[tuple[int, int], list[str]]] = {
    # 224 x 168 -> longest edge 448 -> 3 x 4 tiles of 112 px, then the global view (base)
    "tiny-smolvlm2": ((224, 168), ["base"] + [f"tile_{r}_{c}" for r in (1, 2, 3) for c in (1, 2, 3, 4)]),
    # 224 x 168 (4:3) -> the 4 x 3 grid of 112 px tiles, then the thumbnail (base)
    "tiny-internvl3": ((224, 168), ["base"] + [f"tile_{k}" for k in range(12)]),
}
PROMPT = "is there a dog in the image ? answer yes or no ."




@pytest.fixture(scope="module", params=FAMILIES)
def adapter(request):
    return load_model(request.param)


def every(adapter, kinds=("keys", "values", "post_proj")) -> Selection:
    return Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), kinds)


def model_kv(adapter, batch):
    """The plain HF forward (full model, LM head included) of a processed batch: its cache."""
    with torch.no_grad():
        return model_cache(adapter.model(**batch.inputs, use_cache=True))


def assert_oracle(adapter, batch):
    """Every image's stored K/V equal the model's cache of the same batch at its positions, bit for bit."""
    got = run_capture(adapter, batch, every(adapter))
    cache = model_kv(adapter, batch)
    for i, (lay, feats) in enumerate(zip(batch.layouts, got)):
        assert feats["keys"].shape == (adapter.n_layers, adapter.n_kv_heads, lay.n_tokens, adapter.head_dim)
        assert feats["post_proj"].shape == (lay.n_tokens, adapter.hidden_size)
        assert sum(s.n_tokens for s in lay.segments) == lay.n_tokens
        assert lay.segments[0].name == "base"
        for layer in range(adapter.n_layers):
            assert torch.equal(feats["values"][layer], cache.layers[layer].values[i][:, lay.positions])
            assert torch.equal(feats["keys"][layer], cache.layers[layer].keys[i][:, lay.positions])
    return got


@pytest.mark.parametrize("size", [(224, 168), (84, 140)])
def test_stored_kv_equal_model_cache_non_square(adapter, size):
    batch = adapter.preprocess([image(*size, seed=1)])
    ids = batch.inputs["input_ids"][0]
    assert torch.equal(torch.where(ids == adapter.image_token_id)[0], batch.layouts[0].positions)
    assert_oracle(adapter, batch)


def test_mixed_batch_equals_model_cache_and_one_at_a_time(adapter):
    imgs = [image(224, 168, 2), image(84, 140, 3), image(112, 112, 4)]
    batch = adapter.preprocess(imgs)
    batched = assert_oracle(adapter, batch)
    for img, got in zip(imgs, batched):
        single = run_capture(adapter, adapter.preprocess([img]), every(adapter))[0]
        for kind in got:
            assert got[kind].shape == single[kind].shape
            torch.testing.assert_close(got[kind], single[kind], atol=1e-5, rtol=0)


def test_multi_tile_image(adapter):
    name = adapter.source["name"]
    if name not in TILED:
        pytest.skip(f"{name} does not tile images")
    size, names = TILED[name]
    batch = adapter.preprocess([image(*size, seed=5), image(84, 84, 6)])
    assert [s.name for s in batch.layouts[0].segments] == names
    assert_oracle(adapter, batch)


def test_text_pass_is_the_final_token_of_a_text_only_forward(adapter):
    texts = ["dog", "a red car", "the cat left of the dog"]
    sel = every(adapter, ("keys", "values"))
    got, ids = run_text_capture(adapter, texts, sel, "chat")
    enc, last = adapter.text_batch(texts, "chat")
    with torch.no_grad():
        cache = model_cache(adapter.model(**enc, use_cache=True))
    for q in range(len(texts)):
        assert ids[q] == enc["input_ids"][q, : last[q] + 1].tolist()
        for layer in range(adapter.n_layers):
            assert torch.equal(got["values"][layer][:, q], cache.layers[layer].values[q][:, last[q]])
            assert torch.equal(got["keys"][layer][:, q], cache.layers[layer].keys[q][:, last[q]])


def test_text_after_the_image_does_not_change_image_kv(adapter):
    """Image tokens see only the image and earlier text: the cut sequence gives the K/V of the whole prompt."""
    img = image(98, 70, 11)
    batch = adapter.preprocess([img])
    full = adapter.chat_inputs([PROMPT], [[img]])
    assert full["input_ids"].shape[1] > batch.inputs["input_ids"].shape[1]
    pos = batch.layouts[0].positions
    assert torch.equal(full["input_ids"][0, pos], batch.inputs["input_ids"][0, pos])
    got = run_capture(adapter, batch, every(adapter, ("keys", "values")))[0]
    with torch.no_grad():
        cache = model_cache(adapter.model(**full, use_cache=True))
    for layer in range(adapter.n_layers):
        torch.testing.assert_close(got["values"][layer], cache.layers[layer].values[0][:, pos], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["keys"][layer], cache.layers[layer].keys[0][:, pos], atol=1e-5, rtol=0)


@pytest.mark.parametrize("template", ["chat", "none"])
def test_prefix_precedes_the_image_and_changes_its_kv(adapter, template):
    img = image(112, 84, 5)
    plain = adapter.preprocess([img], "", template)
    prefixed = adapter.preprocess([img], "a photo of a dog", template)
    assert len(prefixed.prefix_ids[0]) > len(plain.prefix_ids[0])
    sel = every(adapter, ("values",))
    a = run_capture(adapter, plain, sel)[0]["values"]
    b = run_capture(adapter, prefixed, sel)[0]["values"]
    assert not torch.allclose(a[-1], b[-1])
    assert_oracle(adapter, prefixed)


# ---- knock-out ------------------------------------------------------------------------------------

def chat(adapter, images):
    return adapter.chat_inputs([PROMPT] * len(images), images)


def test_knockout_empty_set_is_stock_and_every_head_blinds_text(adapter):
    a, b = chat(adapter, [[image(84, 84, 7)]]), chat(adapter, [[image(84, 84, 8)]])
    assert torch.equal(a["input_ids"], b["input_ids"])
    mask = a["input_ids"] == adapter.image_token_id
    after = torch.arange(mask.shape[1]) > torch.where(mask[0])[0].max()
    all_heads = {(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_kv_heads)}
    with torch.no_grad():
        la, lb = adapter.model(**a).logits[0], adapter.model(**b).logits[0]
        with knockout(adapter, set(), mask):
            assert torch.equal(adapter.model(**a).logits[0], la)
        with knockout(adapter, all_heads, mask):
            ka, kb = adapter.model(**a).logits[0], adapter.model(**b).logits[0]
    assert not torch.allclose(la[after], lb[after], atol=1e-4)  # the stock model sees the image
    assert torch.equal(ka[after], kb[after])  # blind to it, text logits are the same for any image
    assert not torch.allclose(ka[mask[0]], kb[mask[0]], atol=1e-4)  # image positions still see it


def test_knockout_eager_equals_sdpa(adapter):
    eager = load_model(adapter.source["name"])
    eager.model.set_attn_implementation("eager")
    inputs = chat(adapter, [[image(96, 72, 9)], [image(60, 84, 10)]])
    mask = inputs["input_ids"] == adapter.image_token_id
    real = inputs["attention_mask"].bool()
    heads = {(adapter.n_layers - 1, adapter.n_kv_heads - 1), (0, 0)}
    with torch.no_grad():
        plain = adapter.model(**inputs).logits
        with knockout(adapter, heads, mask):
            want = adapter.model(**inputs).logits
        with knockout(eager, heads, mask):
            got = eager.model(**inputs).logits
    assert torch.allclose(got[real], want[real], atol=1e-5)
    assert not torch.allclose(plain[real], want[real], atol=1e-4)


# ---- answer ---------------------------------------------------------------------------------------

def vqa_item(qid: str, sizes: list[tuple[int, int]], seed: int) -> VQAItem:
    loaders = tuple((lambda w=w, h=h, s=seed * 10 + i: image(w, h, s)) for i, (w, h) in enumerate(sizes))
    return VQAItem(qid=qid, benchmark="fake", subset="a", question=PROMPT, prompt=PROMPT, images=loaders,
                   image_ids=tuple(f"{qid}-{i}" for i in range(len(sizes))), choices=(), answer="yes")


def test_answer_batched_equals_one_at_a_time(adapter):
    items = [vqa_item("one", [(96, 72)], 1), vqa_item("two", [(70, 56), (56, 98)], 2)]
    heads = {(0, 0)}
    for ko in (None, heads):
        batched = answer_items(adapter, items, max_new_tokens=4, batch_size=2, knockout=ko)
        single = {it.qid: answer_items(adapter, [it], max_new_tokens=4, knockout=ko)[it.qid] for it in items}
        assert batched == single and set(batched) == {"one", "two"}
    assert adapter.processor.tokenizer.padding_side == "right"


# ---- the synthetic dataset and every probe it supports -------------------------------------------

def test_synthetic_extracts_and_every_probe_runs(adapter, tmp_path):
    from kvpipe.pipeline.extraction import ExtractConfig, extract
    from kvpipe.pipeline.datasets import DATASETS
    from kvpipe.probes import run_probe
    from kvpipe.store import FeatureStore

    out = tmp_path / "store"
    extract(ExtractConfig(model=adapter.source["name"], dataset="synthetic", out=str(out), batch_size=3,
                          part_size=6, dataset_options={"n_videos": 2, "n_frames": 3}))
    store = FeatureStore.open(out)
    assert store.meta.model["family"] == adapter.family
    assert all(r.status == "ok" for r in store.rows)
    for task in DATASETS.get("synthetic").tasks:
        run = run_probe(out, task)
        assert len(run.table) > 0, task


def test_gemma3_image_tokens_attend_bidirectionally():
    """Gemma 3's capture keeps the processor's token_type_ids: an image's first token at layer 1 sees
    the whole image (without them the model falls back to causal attention and its K/V differ)."""
    adapter = load_model("tiny-gemma3")
    batch = adapter.preprocess([image(98, 70, 12)])
    assert "token_type_ids" in batch.inputs
    assert batch.inputs["token_type_ids"].shape == batch.inputs["input_ids"].shape
    sel = every(adapter, ("values",))
    got = run_capture(adapter, batch, sel)[0]["values"]
    causal = type(batch)({k: v for k, v in batch.inputs.items() if k != "token_type_ids"}, batch.layouts,
                         batch.prefix_ids)
    plain = run_capture(adapter, causal, sel)[0]["values"]
    assert torch.equal(got[0], plain[0])  # layer 0's values come from the embeddings alone
    assert not torch.allclose(got[1][:, 0], plain[1][:, 0], atol=1e-5)  # layer 1: the first token saw the rest
    assert torch.equal(got[1][:, -1], plain[1][:, -1]) or torch.allclose(got[1][:, -1], plain[1][:, -1], atol=1e-5)
