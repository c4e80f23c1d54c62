"""The real checkpoints' processors and chat templates, from their hub files (tests/fixtures/hub/).

What the tiny presets cannot show: the hub chat templates (system prompt and all), the real
image processor settings (Qwen's min/max pixels, LLaVA's 384 / 336 px views and pinpoints) and the
grids they give at the paper's image sizes. Every expected grid is computed by hand below.
"""

from __future__ import annotations

import math

import pytest
from PIL import Image

from kvpipe.pipeline.models.base import Segment
from kvpipe.pipeline.models.catalog import MODELS

from fixtures.hub_processors import CHECKPOINTS, hub_adapter, lossless_tokenizer, render

QWEN, OV, NEXT = CHECKPOINTS


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hub")
    return {name: hub_adapter(name, tmp) for name in CHECKPOINTS}


def frame(width: int, height: int) -> Image.Image:
    return Image.new("RGB", (width, height), (120, 80, 40))


# ---- the adapters ship the checkpoints' own templates and processor settings -----------------------

@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_adapter_chat_template_is_the_hub_file(name):
    adapter_cls = MODELS.get(CHECKPOINTS[name].model).adapter
    config = MODELS.get(CHECKPOINTS[name].model).preset()
    assert adapter_cls.build_processor(config).chat_template == CHECKPOINTS[name].chat_template()


def plain(value):
    """JSON's view of a setting: tuples as lists, a SizeDict as the dict of its set fields."""
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "keys") and hasattr(value, "__getitem__"):
        return {k: plain(value[k]) for k in value.keys() if value[k] is not None}
    return value


def _value(image_processor, key):
    if key in ("min_pixels", "max_pixels"):  # transformers 5 keeps them in size
        return image_processor.size[{"min_pixels": "shortest_edge", "max_pixels": "longest_edge"}[key]]
    value = getattr(image_processor, key)
    return int(value) if key == "resample" else plain(value)


SETTINGS = ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std",
            "image_grid_pinpoints", "size", "crop_size", "resample", "rescale_factor", "do_pad", "do_center_crop")


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_full_size_processor_settings_are_the_hub_ones(name):
    """kvpipe's processor for --init random of the full-size preset uses every image setting of the
    checkpoint's preprocessor_config.json and processor_config.json."""
    entry = MODELS.get(CHECKPOINTS[name].model)
    processor = entry.adapter.build_processor(entry.preset())
    hub = CHECKPOINTS[name].preprocessor_config()
    checked = [k for k in SETTINGS if k in hub]
    assert len(checked) >= 6
    for key in checked:
        assert _value(processor.image_processor, key) == hub[key], f"{name}: {key}"
    for key, want in CHECKPOINTS[name].processor_config().items():
        if key != "processor_class":
            assert getattr(processor, key) == want, f"{name}: {key}"


# ---- grids at the paper's image sizes -------------------------------------------------------------

def test_llava_ov_384_square_gives_the_papers_27_by_27_base_grid(adapters):
    """384 / 14 = 27 (SigLIP at 384 px, patch 14): 729 base tokens. The best pinpoint of a 384 x 384
    image is [384, 384] itself: one crop of 27 x 27 tokens, each row followed by a newline token."""
    batch = adapters[OV].preprocess([frame(384, 384)], "", "chat")
    layout = batch.layouts[0]
    assert layout.base == Segment("base", 0, 27, 27)
    assert layout.base.n_tokens == 729
    assert layout.segments[1] == Segment("crops", 729, 27, 27, newline=True)
    assert layout.n_tokens == 729 + 27 * (27 + 1)


def test_llava_ov_davis_frame_base_grid_is_27_by_27(adapters):
    """The base view is the whole frame resized to 384 x 384, whatever its shape."""
    batch = adapters[OV].preprocess([frame(854, 480)], "", "chat")
    assert batch.layouts[0].base == Segment("base", 0, 27, 27)


def smart_resize_by_hand(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """Qwen2-VL's rule written out: round each side to a multiple of 28, then scale into the bounds."""
    h, w = round(height / factor) * factor, round(width / factor) * factor
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h, w = math.floor(height / beta / factor) * factor, math.floor(width / beta / factor) * factor
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h, w = math.ceil(height * beta / factor) * factor, math.ceil(width * beta / factor) * factor
    return h, w


def test_qwen25vl_davis_frame_grid(adapters):
    """854 x 480 with the checkpoint's bounds (3136 .. 12,845,056 px): 480 / 28 = 17.1 -> 17 -> 476 px;
    854 / 28 = 30.5 -> 30 (round half to even) -> 840 px; 476 * 840 = 399,840 px lies inside the
    bounds. So 34 x 60 patches of 14 px, merged 2 x 2: a 17 x 30 grid of 510 tokens."""
    assert smart_resize_by_hand(480, 854, 28, 3136, 12845056) == (476, 840)
    batch = adapters[QWEN].preprocess([frame(854, 480)], "", "chat")
    assert batch.inputs["image_grid_thw"].tolist() == [[1, 34, 60]]
    assert batch.layouts[0].segments == (Segment("base", 0, 17, 30),)
    assert batch.layouts[0].n_tokens == 510
    assert tuple(batch.inputs["pixel_values"].shape) == (34 * 60, 3 * 2 * 14 * 14)


def test_qwen25vl_bounds_at_both_ends(adapters):
    """A 40 x 40 image (1,600 px) rounds to 28 x 28 = 784 px < 3136: scaled up by sqrt(3136 / 1600) = 1.4,
    ceil(56 / 28) = 2 -> 56 x 56, 2 x 2 tokens. A 5000 x 4000 image rounds to 5012 x 4004 = 20,068,048 px
    > 12,845,056: scaled down by sqrt(20,000,000 / 12,845,056) = 1.2478, floor(3205.6 / 28) = 114 ->
    3192 px, floor(4007.0 / 28) = 143 -> 4004 px: 228 x 286 patches, 114 x 143 tokens."""
    assert smart_resize_by_hand(40, 40, 28, 3136, 12845056) == (56, 56)
    assert smart_resize_by_hand(4000, 5000, 28, 3136, 12845056) == (3192, 4004)
    small = adapters[QWEN].preprocess([frame(40, 40)], "", "chat")
    assert small.inputs["image_grid_thw"].tolist() == [[1, 4, 4]]
    assert small.layouts[0].base == Segment("base", 0, 2, 2)
    image_processor = adapters[QWEN].processor.image_processor
    large = image_processor(images=[frame(5000, 4000)], return_tensors="pt")
    assert large["image_grid_thw"].tolist() == [[1, 228, 286]]


def test_tiny_qwen_preset_caps_the_davis_frame_at_256_tokens():
    """What the tiny preset gives instead (its processor caps images at 256 tokens so the demo runs on a
    CPU): 409,920 px > 256 * 28 * 28 = 200,704 -> beta = sqrt(409920 / 200704) = 1.4291,
    floor(335.9 / 28) = 11, floor(597.6 / 28) = 21: an 11 x 21 grid. Hence the hub processors above."""
    entry = MODELS.get("tiny-qwen25vl")
    processor = entry.adapter.build_processor(entry.preset(), tiny=True)
    out = processor.image_processor(images=[frame(854, 480)], return_tensors="pt")
    assert smart_resize_by_hand(480, 854, 28, 3136, 200704) == (308, 588)
    assert out["image_grid_thw"].tolist() == [[1, 22, 42]]


def test_llava_next_llama3_336_square_gives_24_by_24_base_grid(adapters):
    """CLIP ViT-L/14 at 336 px: 336 / 14 = 24, 576 base tokens (the CLS token dropped by "default")."""
    batch = adapters[NEXT].preprocess([frame(336, 336)], "", "chat")
    assert batch.layouts[0].base == Segment("base", 0, 24, 24)


# ---- the tokens before the image ---------------------------------------------------------------------

# What each hub template renders before the image of kvpipe's one user turn (image, then text),
# written out: Qwen2.5-VL inserts its default system prompt, the two LLaVA templates have none.
BEFORE_IMAGE = {
    QWEN: "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>",
    OV: "<|im_start|>user ",
    NEXT: "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n",  # BOS from the tokenizer
}
PLACEHOLDER = {QWEN: "<|vision_start|><|image_pad|><|vision_end|>", OV: "<image>", NEXT: "<image>"}


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_tokens_before_the_image_are_the_hub_templates(adapters, name):
    adapter = adapters[name]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    rendered = render(name, messages)  # Jinja itself, from the hub file
    head = rendered[: rendered.index(PLACEHOLDER[name])]
    if name == QWEN:
        head += "<|vision_start|>"  # kvpipe's placeholder is <|vision_start|><|image_pad|>: the start token precedes the image
    tokenizer = lossless_tokenizer(CHECKPOINTS[name].tokens())
    expected_ids = tokenizer(head)["input_ids"]
    batch = adapter.preprocess([frame(384, 384)], "", "chat")
    assert batch.prefix_ids[0] == expected_ids
    assert tokenizer.decode(batch.prefix_ids[0]) == BEFORE_IMAGE[name]
    specials = CHECKPOINTS[name].tokens()["tokens"]
    first = {QWEN: "<|im_start|>", OV: "<|im_start|>", NEXT: "<|begin_of_text|>"}[name]
    assert batch.prefix_ids[0][0] == specials[first]
    assert adapter.input_meta("", "chat", "rope")["prefix_token_ids"] == tuple(expected_ids)


def test_qwen_system_prompt_comes_first_and_a_given_one_replaces_it():
    """The default system prompt is inserted only when the first turn is not a system turn."""
    user = {"role": "user", "content": [{"type": "image"}]}
    assert render(QWEN, [user]).startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    own = render(QWEN, [{"role": "system", "content": "Be brief."}, user])
    assert own.startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n")
    assert "helpful assistant" not in own


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_prefix_sits_right_before_the_image_in_the_user_turn(adapters, name):
    batch = adapters[name].preprocess([frame(384, 384)], "a photo of the dog ", "chat")
    tokenizer = lossless_tokenizer(CHECKPOINTS[name].tokens())
    text = tokenizer.decode(batch.prefix_ids[0])
    before = BEFORE_IMAGE[name]
    if name == QWEN:  # the prefix goes before <|vision_start|>, which opens the image
        assert text == before[: -len("<|vision_start|>")] + "a photo of the dog <|vision_start|>"
    else:
        assert text == before + "a photo of the dog "


@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_generation_prompt_of_the_hub_templates(adapters, name):
    """``kvpipe answer`` asks with the template's generation prompt; the processor renders what Jinja
    renders from the hub file."""
    prompt = adapters[name].chat_prompt("What is shown in this image?", 1)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
    assert prompt == render(name, messages, add_generation_prompt=True)
    ending = {QWEN: "<|im_end|>\n<|im_start|>assistant\n", OV: "<|im_end|><|im_start|>assistant\n",
              NEXT: "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"}[name]
    assert prompt.endswith("What is shown in this image?" + ending)
