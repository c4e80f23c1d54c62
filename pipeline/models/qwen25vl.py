"""Qwen2.5-VL adapter: Qwen2-VL's token layout with a windowed-attention vision tower."""

from __future__ import annotations


from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

from kvpipe.pipeline.models.qwen2vl import (Qwen2VLAdapter, qwen7b_text_config, qwen_tokenizer,
                                            special_ids, tiny_text_config)


def tiny_qwen25vl_config() -> Qwen2_5_VLConfig:
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
              "out_hidden_size": 64, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 56, "fullatt_block_indexes": [1]}
    return Qwen2_5_VLConfig(text_config=tiny_text_config(True), vision_config=vision,
                            **special_ids(qwen_tokenizer()))


def qwen25vl_7b_config() -> Qwen2_5_VLConfig:
    vision = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16,
              "out_hidden_size": 3584, "patch_size": 14, "spatial_merge_size": 2,
              "temporal_patch_size": 2, "window_size": 112, "fullatt_block_indexes": [7, 15, 23, 31]}
    return Qwen2_5_VLConfig(text_config=qwen7b_text_config(), vision_config=vision,
                            **special_ids(qwen_tokenizer()))


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen25vl"
    model_types = ("qwen2_5_vl",)
    hf_class = Qwen2_5_VLForConditionalGeneration
    processor_names = ("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor")
