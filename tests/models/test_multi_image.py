"""Oracle tests of multi-image prompts: every image's stored K/V equal the model's own cache at
that image's positions in the prompt ``kvpipe answer`` builds for a question (its chat template,
the images of one user turn), run up to the last image token.

The reference does not use ``preprocess_sequences``: it takes ``chat_inputs`` (the answer's
prompt, question text included), cuts it after the last image token and splits nothing --
the images' stored tokens, concatenated in order, must be exactly the prompt's image tokens.
"""

from __future__ import annotations

import pytest
import torch

from kvpipe.errors import UsageError
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.capture import Selection, run_capture

from fixtures.images import noise_image

MULTI = ["tiny-qwen25vl", "tiny-llava-ov", "tiny-qwen2vl", "tiny-qwen3vl", "tiny-llava-next-llama3",
         "tiny-llava15", "tiny-gemma3"]
SINGLE_ONLY = ["tiny-smolvlm2", "tiny-internvl3", "tiny-siglip"]


@pytest.fixture(scope="module", params=MULTI)
def adapter(request):
    return load_model(request.param)


def everything(adapter, kinds=("keys", "values", "post_proj")) -> Selection:
    return Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), kinds)


def answer_prompt_cache(adapter, images):
    """The model's cache of the answer's prompt for one question, cut after its last image token,
    and the positions of every image token in it."""
    inputs = adapter.chat_inputs(["Which image shares the style of the first one?"], [images])
    ids = inputs["input_ids"]
    pos = torch.where(ids[0] == adapter.image_token_id)[0]
    cut = int(pos.max()) + 1
    inputs = {k: (v[:, :cut] if isinstance(v, torch.Tensor) and v.shape == ids.shape else v)
              for k, v in inputs.items()}
    with torch.no_grad():
        out = adapter.model(**inputs, use_cache=True)
    return out.past_key_values, pos


QUESTION = [(130, 90, 1), (84, 140, 2), (112, 112, 3)]


def test_each_images_kv_equal_the_answer_prompts_cache(adapter):
    images = [noise_image(*s) for s in QUESTION]
    batch = adapter.preprocess_sequences([images])
    assert batch.samples == [0, 0, 0] and len(batch.layouts) == 3
    got = run_capture(adapter, batch, everything(adapter))
    cache, pos = answer_prompt_cache(adapter, images)
    stored = {k: torch.cat([g[k] for g in got], dim=2) for k in ("keys", "values")}
    assert stored["values"].shape[2] == pos.numel()
    for layer in range(adapter.n_layers):
        assert torch.equal(stored["values"][layer], cache.layers[layer].values[0][:, pos])
        assert torch.equal(stored["keys"][layer], cache.layers[layer].keys[0][:, pos])
    # each layout is its image's own run of positions, in order, and covers its segments
    assert torch.equal(torch.cat([lay.positions for lay in batch.layouts]), pos)
    for lay, g in zip(batch.layouts, got):
        assert sum(s.n_tokens for s in lay.segments) == lay.n_tokens == g["values"].shape[2]
        assert g["post_proj"].shape == (lay.n_tokens, adapter.hidden_size)


def test_batched_questions_equal_one_question_at_a_time(adapter):
    questions = [[noise_image(*s) for s in QUESTION], [noise_image(112, 84, 4), noise_image(90, 130, 5)]]
    sel = everything(adapter, ("keys", "values"))
    batch = adapter.preprocess_sequences(questions)
    assert batch.samples == [0, 0, 0, 1, 1]
    batched = run_capture(adapter, batch, sel)
    alone = [g for q in questions for g in run_capture(adapter, adapter.preprocess_sequences([q]), sel)]
    for b, a in zip(batched, alone):  # right padding: the positions of an unbatched run
        for kind in sel.kinds:
            assert b[kind].shape == a[kind].shape
            torch.testing.assert_close(b[kind], a[kind], atol=1e-5, rtol=0)


def test_images_before_change_the_later_images_values():
    """Causal attention: the first image of a prompt is stored as if alone (same text before it;
    equal up to the summation order of a longer sequence), the second is not -- which is why
    paired tasks store a question's images in one prompt."""
    adapter = load_model("tiny-qwen25vl")
    first, second = noise_image(112, 112, 6), noise_image(84, 140, 7)
    sel = everything(adapter, ("values",))
    together = run_capture(adapter, adapter.preprocess_sequences([[first, second]]), sel)
    alone = [run_capture(adapter, adapter.preprocess([img]), sel)[0] for img in (first, second)]
    torch.testing.assert_close(together[0]["values"], alone[0]["values"], atol=1e-5, rtol=0)
    assert together[1]["values"].shape == alone[1]["values"].shape
    assert not torch.allclose(together[1]["values"][-1], alone[1]["values"][-1], atol=1e-4)


@pytest.mark.parametrize("name", SINGLE_ONLY)
def test_families_without_multi_image_prompts_refuse_in_one_line(name):
    adapter = load_model(name)
    with pytest.raises(UsageError, match="--multi-image") as err:
        adapter.preprocess_sequences([[noise_image(112, 112, 1), noise_image(112, 112, 2)]])
    assert "\n" not in str(err.value)
