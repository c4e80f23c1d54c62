"""DINO (facebook/dino-vitb16, -vitb8): a plain ViT (``ViTModel``) trained self-supervised.

One CLS token precedes the patch tokens (14 x 14 of a 224 px image for /16). dino-vitb8 runs at
480p as DINO's DAVIS evaluation does (catalog resolution ``short=480/64``): each image keeps its
aspect ratio, so the position embeddings are interpolated. The adapter serves any
``vit`` checkpoint; the DINO preset's preprocessing constants are the original DINO
evaluation's (ImageNet mean/std); a loaded checkpoint's own processor file takes precedence.
"""

from __future__ import annotations

from typing import Any

from transformers import ViTConfig, ViTImageProcessor, ViTModel

from kvpipe.pipeline.models.encoder import BILINEAR, VisionEncoderAdapter


def dino_vitb16_config() -> ViTConfig:
    """facebook/dino-vitb16's config."""
    return ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=16, qkv_bias=True, layer_norm_eps=1e-12, hidden_act="gelu")


def dino_vitb8_config() -> ViTConfig:
    """facebook/dino-vitb8's config: ViT-B with 8 px patches (28 x 28 at 224 px)."""
    return ViTConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=8, qkv_bias=True, layer_norm_eps=1e-12, hidden_act="gelu")


def tiny_dino_vitb8_config() -> ViTConfig:
    """2 blocks, width 32, 8 px patches; the catalog feeds it short side 32 (4 patch rows)."""
    return ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=32, patch_size=8)


def tiny_dino_config() -> ViTConfig:
    """2 blocks, width 32, 64 px -> 4 x 4 patch tokens after the CLS token."""
    return ViTConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                     image_size=64, patch_size=16)


class VitEncoderAdapter(VisionEncoderAdapter):
    hf_class = ViTModel
    family = "vit"
    model_types = ("vit",)
    prefix_tokens = 1  # CLS
    resample = BILINEAR  # facebook/dino-vitb16's preprocessor_config.json

    @classmethod
    def image_processor_class(cls) -> type:
        return ViTImageProcessor

    def decoder_layers(self) -> list[Any]:
        return list(self.model.layers) if hasattr(self.model, "layers") else list(self.model.encoder.layer)
