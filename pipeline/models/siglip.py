"""SigLIP vision tower on its own: the encoder of LLaVA-OneVision before MLM fine-tuning.

google/siglip-so400m-patch14-384 is a full SigLIP checkpoint (text and vision); the adapter
loads its vision tower (``SiglipVisionModel``) with all 27 blocks (the LLaVA-OV tower keeps
26) and no CLS token: the 27 x 27 patch tokens of a 384 px image are the whole sequence.
"""

from __future__ import annotations

from typing import Any

from transformers import SiglipImageProcessor, SiglipVisionConfig, SiglipVisionModel

from kvpipe.pipeline.models.encoder import BICUBIC, VisionEncoderAdapter


def siglip_so400m_384_config() -> SiglipVisionConfig:
    """google/siglip-so400m-patch14-384's vision config."""
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def tiny_siglip_config() -> SiglipVisionConfig:
    """2 blocks, width 32, 56 px -> 4 x 4 patch tokens."""
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)


class SiglipEncoderAdapter(VisionEncoderAdapter):
    hf_class = SiglipVisionModel
    family = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    prefix_tokens = 0  # no CLS token
    mean = std = (0.5, 0.5, 0.5)
    resample = BICUBIC

    @classmethod
    def image_processor_class(cls) -> type:
        return SiglipImageProcessor

    def decoder_layers(self) -> list[Any]:
        return list(self.model.vision_model.encoder.layers) if hasattr(self.model, "vision_model") \
            else list(self.model.encoder.layers)
