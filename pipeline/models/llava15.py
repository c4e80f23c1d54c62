"""LLaVA-1.5 adapter (Llama-2 / Vicuna text model, CLIP ViT-L/14-336): the classic baseline.

One fixed view per image: the CLIP tower sees 336 x 336 pixels, 14-pixel patches, so every
image is 24 x 24 = 576 tokens (the CLS token is dropped: ``vision_feature_select_strategy``
"default", features of the second-to-last layer), in one row-major ``base`` segment; there
are no tiles and no newline tokens. The decoder is causal everywhere (MHA: 32 KV heads in
the 7B model), so an image token's K/V depend only on the image and the text before it.

Preprocessing: the -hf checkpoint's processor resizes the shortest edge to 336 and crops the
centre (the original LLaVA-1.5 padded to a square instead). kvpipe keeps the checkpoint's
constants but resizes the whole image to 336 x 336 without the crop, as the base view of
LLaVA-NeXT does, so the 24 x 24 grid covers the whole image and token <-> pixel mapping is
proportional for every probe; the same processor serves ``answer`` and knock-out.
"""

from __future__ import annotations

from typing import Any

from transformers import LlavaConfig, LlavaForConditionalGeneration

from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.encoder import input_hw
from kvpipe.pipeline.models.llava_next import tiny_clip_vision, tiny_llama_text
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer, with_bos

LLAMA2_SPECIALS = ["<s>", "</s>", "<image>"]

# llava-hf/llava-1.5-7b-hf's chat_template.json: "USER: <image>\n{text} ASSISTANT:", images
# first, no system prompt; <s> is not in the template, the tokenizer prepends it.
LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>\n' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def llama2_tokenizer():
    """Word tokenizer with Llama-2's specials; like the real one it prepends <s>."""
    return with_bos(build_word_tokenizer(LLAMA2_SPECIALS, unk="<unk>", pad="<pad>"), "<s>")


def clip_l14(image_size: int = 336) -> dict[str, Any]:
    return {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
            "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": image_size, "patch_size": 14,
            "projection_dim": 768, "hidden_act": "quick_gelu"}


def llava15_7b_config() -> LlavaConfig:
    """llava-hf/llava-1.5-7b-hf: Vicuna-7B v1.5 (Llama-2 7B: 32 layers, 32 heads = 32 KV heads, vocab
    32000 + <image>, <pad>, padded to 32064) on CLIP ViT-L/14-336, features of its second-to-last layer."""
    text = {"model_type": "llama", "vocab_size": 32064, "hidden_size": 4096, "intermediate_size": 11008,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 4096, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 32001}
    return LlavaConfig(text_config=text, vision_config=clip_l14(), image_token_index=32000,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu", image_seq_length=576)


def tiny_llava15_config() -> LlavaConfig:
    """2 Llama layers (hidden 64, 4 heads = 4 KV heads, as Llama-2 7B has no GQA) on a 2-layer CLIP
    tower seeing 56 px -> 4 x 4 tokens."""
    tok = llama2_tokenizer()
    return LlavaConfig(text_config=tiny_llama_text(tok, 4, 10000.0, "<s>", "</s>", "<pad>"),
                       vision_config=tiny_clip_vision(), image_token_index=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       image_seq_length=16)


def whole_image(processor: Any, side: int) -> Any:
    """The image processor resizing the whole image to side x side (no centre crop)."""
    processor.size = {"height": side, "width": side}
    processor.do_center_crop = False
    return processor


class Llava15Adapter(ModelAdapter):
    family = "llava"
    hf_class = LlavaForConditionalGeneration
    image_placeholder = "<image>"

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import LlavaImageProcessor, LlavaProcessor

        v = config.vision_config
        images = whole_image(LlavaImageProcessor(image_mean=CLIP_MEAN, image_std=CLIP_STD), v.image_size)
        # num_additional_image_tokens=1: CLIP emits a CLS token, which "default" then drops.
        return LlavaProcessor(image_processor=images, tokenizer=llama2_tokenizer(), patch_size=v.patch_size,
                              vision_feature_select_strategy=config.vision_feature_select_strategy,
                              num_additional_image_tokens=1, chat_template=LLAVA15_CHAT_TEMPLATE)

    @classmethod
    def load_processor(cls, checkpoint: str, revision: str | None) -> Any:
        """The checkpoint's processor, resizing whole images to its crop size (no centre crop)."""
        processor = super().load_processor(checkpoint, revision)
        whole_image(processor.image_processor, input_hw(processor.image_processor)[0])
        return processor

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        v = self.model.config.vision_config
        side = int(v.image_size) // int(v.patch_size)
        return (Segment("base", 0, side, side),)
