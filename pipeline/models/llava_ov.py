"""LLaVA-OneVision adapter (Qwen2 text model, SigLIP tower): LLaVA-NeXT's any-res layout plus two rules.

``LlavaOnevisionModel.pack_image_features`` differs from NeXT in that
  * the crops grid is bilinearly shrunk when it holds more than ~max_num_patches base views
    (``vision_aspect_ratio="anyres_max_9"``: if sqrt(rows*cols / (9*side^2)) > 1.1 both sides are
    divided by that ratio), so rows/cols are those of the shrunk grid;
  * an image that is one of several in a sample is not tiled: it is the base view followed by
    ONE newline token (the processor's ``batch_num_images`` says which samples are multi-image).
SigLIP has no CLS token, so the "full" strategy keeps all side x side base tokens.
"""

from __future__ import annotations

import math
from typing import Any

from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision import modeling_llava_onevision

from kvpipe.pipeline.models.base import Segment
from kvpipe.pipeline.models.llava_next import LlavaNextAdapter
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

OV_SPECIALS = ["<|im_start|>", "<|im_end|>", "<image>", "<video>"]

# llava-hf/llava-onevision-qwen2-*-ov-hf's chat_template.json, byte for byte: "<|im_start|>user <image>\n{text}
# <|im_end|>", no default system prompt, all images of a turn first, then videos, then the text.
OV_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>' }}{% endfor %}"
    "{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}"
    "{% endfor %}{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ '\\n' + content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_VOCAB = 256
# The real checkpoints' pinpoints: every (h, w) with h, w in 384, 768, ..., 2304 (36 resolutions).
OV_PINPOINTS = [[h, w] for h in range(384, 2305, 384) for w in range(384, 2305, 384)]
TINY_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


def ov_tokenizer():
    return build_word_tokenizer(OV_SPECIALS, unk="<unk>", pad="<|endoftext|>")


def padded_vocab(qwen_vocab: int) -> int:
    """The -hf conversion adds <image>, <video> and pads the embedding to a multiple of 64."""
    return -(-(qwen_vocab + 2) // 64) * 64


def qwen2_text(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int,
               tie: bool = False) -> dict[str, Any]:
    return {"model_type": "qwen2", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "tie_word_embeddings": tie,
            "rope_parameters": {"rope_type": "default", "rope_theta": 1000000.0},
            "bos_token_id": 151643, "eos_token_id": 151645}


def siglip_so400m() -> dict[str, Any]:
    """SigLIP-so400m-patch14-384 as the -hf checkpoints store it: 26 of its 27 layers (the original
    LLaVA-OV reads layer -2, so the conversion drops the last one and reads -1), no pooling head."""
    return {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": 26, "num_attention_heads": 16, "image_size": 384, "patch_size": 14,
            "vision_use_head": False}


def ov_config(text: dict[str, Any], vision: dict[str, Any], pinpoints: list, **ids: int) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(text_config=text, vision_config=vision, image_grid_pinpoints=pinpoints,
                                vision_feature_layer=-1, vision_feature_select_strategy="full",
                                vision_aspect_ratio="anyres_max_9", tie_word_embeddings=text["tie_word_embeddings"],
                                **ids)


def real_ids() -> dict[str, int]:
    return {"image_token_index": 151646, "video_token_index": 151647}


def llava_ov_7b_config() -> LlavaOnevisionConfig:
    return ov_config(qwen2_text(3584, 28, 28, 4, 18944, padded_vocab(152064)), siglip_so400m(), OV_PINPOINTS,
                     **real_ids())


def llava_ov_05b_config() -> LlavaOnevisionConfig:
    return ov_config(qwen2_text(896, 24, 14, 2, 4864, padded_vocab(151936), tie=True), siglip_so400m(),
                     OV_PINPOINTS, **real_ids())


def llava_ov_72b_config() -> LlavaOnevisionConfig:
    return ov_config(qwen2_text(8192, 80, 64, 8, 29568, padded_vocab(152064)), siglip_so400m(), OV_PINPOINTS,
                     **real_ids())


def tiny_llava_ov_config() -> LlavaOnevisionConfig:
    """2 Qwen2 layers (hidden 64, 4 q / 2 kv heads) on a 2-layer SigLIP seeing 56 px -> 4x4 tokens."""
    ids = ov_tokenizer().convert_tokens_to_ids
    text = qwen2_text(64, 2, 4, 2, 128, TINY_VOCAB)
    text.update(max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
              "vision_use_head": False}
    return ov_config(text, vision, TINY_PINPOINTS, image_token_index=ids("<image>"),
                     video_token_index=ids("<video>"))


class LlavaOnevisionAdapter(LlavaNextAdapter):
    hf_class = LlavaOnevisionForConditionalGeneration
    family = "llava_onevision"
    model_types = ("llava_onevision",)
    modeling = modeling_llava_onevision

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import (LlavaOnevisionImageProcessor, LlavaOnevisionProcessor,
                                  LlavaOnevisionVideoProcessor)

        v = config.vision_config
        images = LlavaOnevisionImageProcessor(size={"height": v.image_size, "width": v.image_size},
                                              image_grid_pinpoints=config.image_grid_pinpoints,
                                              image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])  # SigLIP's
        return LlavaOnevisionProcessor(image_processor=images, tokenizer=ov_tokenizer(),
                                       video_processor=LlavaOnevisionVideoProcessor(),
                                       num_image_tokens=(v.image_size // v.patch_size) ** 2,
                                       vision_feature_select_strategy=config.vision_feature_select_strategy,
                                       vision_aspect_ratio=config.vision_aspect_ratio,
                                       chat_template=OV_CHAT_TEMPLATE)

    def crops_grid(self, image_size) -> tuple[int, int]:
        rows, cols = super().crops_grid(image_size)
        side = self.side
        max_views = int(self.model.config.vision_aspect_ratio.strip("anyres_max_"))  # as the model parses it
        ratio = math.sqrt(rows * cols / (max_views * side**2))
        if ratio > 1.1:  # the model interpolates the grid down to this size
            rows, cols = int(rows // ratio), int(cols // ratio)
        return rows, cols

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        side = self.side
        per_sample = inputs.get("batch_num_images")
        if per_sample is not None:
            counts = [int(n) for n in per_sample]
            sample = next(s for s in range(len(counts)) if index < sum(counts[: s + 1]))
            if counts[sample] != 1:  # multi-image sample: base view + one newline, no crops
                return (Segment("base", 0, side, side), Segment("newline", side * side, 1, 0, newline=True))
        return super().segments(inputs, index, n_tokens)
