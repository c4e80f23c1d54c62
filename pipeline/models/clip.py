"""CLIP vision tower (openai/clip-vit-large-patch14 and -336): ``CLIPVisionModel``.

One CLS token precedes the patch tokens; OpenAI's processor centre-crops, so the adapter
keeps its crop size (224 or 336 px: 16 x 16 or 24 x 24 patches) and resizes the whole image.
"""

from __future__ import annotations

from typing import Any

from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

from kvpipe.pipeline.models.encoder import BICUBIC, CLIP_MEAN, CLIP_STD, VisionEncoderAdapter


def clip_vit_l14_config(image_size: int = 224) -> CLIPVisionConfig:
    """openai/clip-vit-large-patch14(-336)'s vision config."""
    return CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=image_size, patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5,
                            projection_dim=768)


def tiny_clip_config() -> CLIPVisionConfig:
    """2 blocks, width 32, 56 px -> 4 x 4 patch tokens after the CLS token."""
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                            image_size=56, patch_size=14, hidden_act="quick_gelu", projection_dim=32)


class ClipEncoderAdapter(VisionEncoderAdapter):
    hf_class = CLIPVisionModel
    family = "clip"
    model_types = ("clip", "clip_vision_model")
    prefix_tokens = 1  # CLS
    mean, std = CLIP_MEAN, CLIP_STD
    resample = BICUBIC

    @classmethod
    def image_processor_class(cls) -> type:
        return CLIPImageProcessor

    def decoder_layers(self) -> list[Any]:
        return list(self.model.vision_model.encoder.layers) if hasattr(self.model, "vision_model") \
            else list(self.model.encoder.layers)
