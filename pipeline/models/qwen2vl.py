"""Qwen2-VL adapter (and the base of Qwen2.5-VL's): dynamic-resolution images, one token grid.

Qwen2-VL merges 2x2 patches into one LM token, so an image of (h, w) patches gives a
(h/2) x (w/2) row-major token grid between <|vision_start|> and <|vision_end|>.
"""

from __future__ import annotations

from typing import Any, ClassVar

from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessor

from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]

# Qwen/Qwen2.5-VL-7B-Instruct's chat_template.json (the same in Qwen/Qwen2-VL-7B-Instruct), byte for
# byte: a default system prompt before a first turn that is not a system turn, images in place,
# "Picture N: " only with add_vision_id. tests/fixtures/hub/ holds the copy the tests compare with.
QWEN_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# The 7B Instruct checkpoints' preprocessor_config.json bounds (transformers' class defaults differ:
# 56*56 .. 28*28*1280): min_pixels = 4 LM tokens, max_pixels = 16384 LM tokens of 28 x 28 pixels.
QWEN_IMAGE_PIXELS = {"min_pixels": 3136, "max_pixels": 12845056}

TINY_VOCAB = 256


def qwen_tokenizer():
    return build_word_tokenizer(QWEN_SPECIALS[1:], unk="<unk>", pad="<|endoftext|>")


def special_ids(tok) -> dict[str, int]:
    ids = tok.convert_tokens_to_ids
    return {"image_token_id": ids("<|image_pad|>"), "video_token_id": ids("<|video_pad|>"),
            "vision_start_token_id": ids("<|vision_start|>"), "vision_end_token_id": ids("<|vision_end|>")}


def tiny_text_config(mrope: bool) -> dict[str, Any]:
    """2 layers, hidden 64, 4 query heads sharing 2 KV heads (GQA), head_dim 16."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    return {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "max_position_embeddings": 4096, "rope_parameters": rope, "tie_word_embeddings": False,
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}


def qwen7b_text_config() -> dict[str, Any]:
    """The language model of the 7B checkpoints (Qwen2-7B shape): 28 layers, 28 q / 4 kv heads."""
    return {"vocab_size": 152064, "hidden_size": 3584, "intermediate_size": 18944,
            "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]}}


def tiny_qwen2vl_config() -> Qwen2VLConfig:
    vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return Qwen2VLConfig(text_config=tiny_text_config(True), vision_config=vision,
                         **special_ids(qwen_tokenizer()))


def qwen2vl_7b_config() -> Qwen2VLConfig:
    vision = {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "num_heads": 16, "mlp_ratio": 4,
              "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    return Qwen2VLConfig(text_config=qwen7b_text_config(), vision_config=vision,
                         **special_ids(qwen_tokenizer()))


class Qwen2VLAdapter(ModelAdapter):
    hf_class = Qwen2VLForConditionalGeneration
    family = "qwen2vl"
    model_types = ("qwen2_vl",)
    image_placeholder = "<|vision_start|><|image_pad|>"
    chat_template: ClassVar[str] = QWEN_CHAT_TEMPLATE
    # the checkpoint's preprocessor_config.json, where it differs from transformers' defaults
    image_processor_kw: ClassVar[dict[str, Any]] = QWEN_IMAGE_PIXELS

    # the processor classes in transformers, by name (imported when a processor is built)
    processor_names: ClassVar[tuple[str, str]] = ("Qwen2VLProcessor", "Qwen2VLVideoProcessor")

    @classmethod
    def processor_class(cls) -> type:
        import transformers

        return getattr(transformers, cls.processor_names[0])

    @classmethod
    def video_processor(cls) -> Any:
        import transformers

        return getattr(transformers, cls.processor_names[1])()

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        v = config.vision_config
        token = int(v.patch_size) * int(v.spatial_merge_size)  # pixels per LM token along each side
        # Tiny models see small images (<= 256 tokens) so the demo runs in seconds on a CPU.
        kw = {"min_pixels": 4 * token**2, "max_pixels": 256 * token**2} if tiny else dict(cls.image_processor_kw)
        images = Qwen2VLImageProcessor(patch_size=int(v.patch_size), merge_size=int(v.spatial_merge_size), **kw)
        return cls.processor_class()(image_processor=images, tokenizer=qwen_tokenizer(),
                                     video_processor=cls.video_processor(), chat_template=cls.chat_template)

    def accelerate(self) -> list[str]:
        from kvpipe.pipeline.models.vision_attention import patch_vision_attention

        n = patch_vision_attention(self.model)
        return ([f"vision attention: {n} blocks as batched variable-length SDPA"] if n else []) + super().accelerate()

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        t, h, w = (int(x) for x in inputs["image_grid_thw"][index])
        merge = int(self.processor.image_processor.merge_size)
        return (Segment("base", 0, t * h // merge, w // merge),)
