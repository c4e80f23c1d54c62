"""LLaVA-NeXT adapter (Llama-3 text model, CLIP tower) and the any-res layout it shares with OneVision.

LLaVA-NeXT's ``pack_image_features`` lays out one image as
  1. the base view: the image resized to the tower's input, side x side tokens, NO newlines
     (with the "default" strategy the CLIP CLS token is dropped first);
  2. the crops: the tiles of the best pinpoint resolution stitched into one
     (tiles_h * side) x (tiles_w * side) grid, cropped back to the image's aspect ratio
     (``unpad_image``), and each row followed by one ``image_newline`` token.
The grid is computed with transformers' own functions, so the layout is the model's by construction.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration
from transformers.models.llava_next import modeling_llava_next

from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer, with_bos

LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<image>"]

# llava-hf/llama3-llava-next-8b-hf's chat_template.json, byte for byte: images first, then the text, no
# system prompt; <|begin_of_text|> is not in the template, the tokenizer prepends it.
LLAMA3_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'}}"
    "{# Render all images first #}{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}"
    "{{ '<image>' }}{% endfor %}{# Render all text next #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ '\\n' + content['text'] + '<|eot_id|>' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

TINY_VOCAB = 256
LLAMA3_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
TINY_PINPOINTS = [[h // 6, w // 6] for h, w in LLAMA3_PINPOINTS]  # the same shapes for a 56 px tower


def llama3_tokenizer():
    """Word tokenizer with Llama-3's specials; like the real one it prepends <|begin_of_text|>."""
    return with_bos(build_word_tokenizer(LLAMA3_SPECIALS, unk="<unk>", pad="<pad>"), "<|begin_of_text|>")


def tiny_llama_text(tok: Any, kv_heads: int, theta: float, bos: str, eos: str, pad: str) -> dict[str, Any]:
    """A 2-layer Llama text config (hidden 64, 4 query heads of 16) on an offline tokenizer's ids."""
    ids = tok.convert_tokens_to_ids
    return {"model_type": "llama", "vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
            "max_position_embeddings": 4096, "rope_parameters": {"rope_type": "default", "rope_theta": theta},
            "bos_token_id": ids(bos), "eos_token_id": ids(eos), "pad_token_id": ids(pad), "tie_word_embeddings": False}


def tiny_clip_vision() -> dict[str, Any]:
    """A 2-layer CLIP tower seeing 56 px: 4 x 4 patches of 14 px."""
    return {"model_type": "clip_vision_model", "hidden_size": 32, "intermediate_size": 64,
            "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 56, "patch_size": 14,
            "projection_dim": 32}


def tiny_llava_next_config() -> LlavaNextConfig:
    """2 Llama layers (hidden 64, 4 q / 2 kv heads) on a 2-layer CLIP tower seeing 56 px -> 4x4 tokens."""
    tok = llama3_tokenizer()
    ids = tok.convert_tokens_to_ids
    text = tiny_llama_text(tok, 2, 500000.0, "<|begin_of_text|>", "<|eot_id|>", "<pad>")
    vision = tiny_clip_vision()
    return LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=ids("<image>"),
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=TINY_PINPOINTS, image_seq_length=16)


def llama3_llava_next_8b_config() -> LlavaNextConfig:
    """llava-hf/llama3-llava-next-8b-hf: Llama-3-8B-Instruct (vocab 128256 + <image>, <pad>, padded
    to a multiple of 64) on CLIP ViT-L/14-336, features from the second-to-last layer."""
    text = {"model_type": "llama", "vocab_size": 128320, "hidden_size": 4096, "intermediate_size": 14336,
            "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 500000.0},
            "bos_token_id": 128000, "eos_token_id": 128009}
    vision = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_hidden_layers": 24, "num_attention_heads": 16, "image_size": 336, "patch_size": 14,
              "projection_dim": 768, "hidden_act": "quick_gelu"}
    return LlavaNextConfig(text_config=text, vision_config=vision, image_token_index=128256,
                           vision_feature_layer=-2, vision_feature_select_strategy="default",
                           image_grid_pinpoints=LLAMA3_PINPOINTS, image_seq_length=576)


# The inputs LLaVA-NeXT / OV read with .tolist() while packing image features (see accelerate).
SIZES_ON_HOST = ("image_sizes", "batch_num_images")


class LlavaNextAdapter(ModelAdapter):
    hf_class = LlavaNextForConditionalGeneration
    family = "llava_next"
    multi_view = True  # base view + crops / tiles (--views base stores the base view only)
    model_types = ("llava_next",)
    image_placeholder = "<image>"
    modeling: ClassVar[Any] = modeling_llava_next  # where get_anyres_image_grid_shape / unpad_image live

    def accelerate(self) -> list[str]:
        # transformers reads each image's size with .tolist() while packing the image features:
        # on the device that is a host synchronisation per image (and per sample for OV's
        # batch_num_images), each leaving the GPU idle until the host launches the next kernels.
        self.host_inputs = SIZES_ON_HOST
        return ["image sizes read on the host (no device syncs while packing features)"] + super().accelerate()

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        v = config.vision_config
        images = LlavaNextImageProcessor(size={"shortest_edge": v.image_size},
                                         crop_size={"height": v.image_size, "width": v.image_size},
                                         image_grid_pinpoints=config.image_grid_pinpoints)
        # num_additional_image_tokens=1: CLIP emits a CLS token, which "default" then drops.
        return LlavaNextProcessor(image_processor=images, tokenizer=llama3_tokenizer(), patch_size=v.patch_size,
                                  vision_feature_select_strategy=config.vision_feature_select_strategy,
                                  num_additional_image_tokens=1, chat_template=LLAMA3_CHAT_TEMPLATE)

    @property
    def side(self) -> int:
        v = self.model.config.vision_config
        return int(v.image_size) // int(v.patch_size)

    def crops_grid(self, image_size: torch.Tensor) -> tuple[int, int]:
        """Rows and columns of the stitched, unpadded crops grid (pack_image_features' arithmetic)."""
        cfg, side = self.model.config, self.side
        tiles_h, tiles_w = self.modeling.get_anyres_image_grid_shape(
            image_size, cfg.image_grid_pinpoints, cfg.vision_config.image_size)
        grid = torch.empty(1, tiles_h * side, tiles_w * side, device="meta")  # only its shape matters
        rows, cols = self.modeling.unpad_image(grid, image_size).shape[1:]
        return int(rows), int(cols)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        side = self.side
        rows, cols = self.crops_grid(inputs["image_sizes"][index])
        return (Segment("base", 0, side, side), Segment("crops", side * side, rows, cols, newline=True))
