"""DINOv2 (facebook/dinov2-base, -large): ``Dinov2Model``.

One CLS token precedes the patch tokens (these checkpoints have no register tokens). The
position embeddings are for 518 px but the checkpoints' processor feeds 224 px crops, so the
adapter resizes whole images to 224 px (16 x 16 patches); Dinov2Model always interpolates
its position embeddings to the input.
"""

from __future__ import annotations

from typing import Any

from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

from kvpipe.pipeline.models.encoder import BICUBIC, VisionEncoderAdapter

EVAL_SIDE = 224  # crop_size of facebook/dinov2-*'s preprocessor_config.json


def dinov2_config(hidden: int, layers: int, heads: int) -> Dinov2Config:
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, mlp_ratio=4,
                        image_size=518, patch_size=14, layerscale_value=1.0, layer_norm_eps=1e-6)


def tiny_dinov2_config() -> Dinov2Config:
    """2 blocks, width 32, 56 px -> 4 x 4 patch tokens after the CLS token."""
    return Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, mlp_ratio=2,
                        image_size=56, patch_size=14)


class Dinov2EncoderAdapter(VisionEncoderAdapter):
    hf_class = Dinov2Model
    family = "dinov2"
    model_types = ("dinov2",)
    prefix_tokens = 1  # CLS
    interpolate_flag = False  # Dinov2Model always interpolates
    resample = BICUBIC

    @classmethod
    def image_processor_class(cls) -> type:
        return BitImageProcessor

    @classmethod
    def preset_side(cls, config: Any, tiny: bool) -> int:
        return int(config.image_size) if tiny else EVAL_SIDE

    def decoder_layers(self) -> list[Any]:
        return list(self.model.encoder.layer)
