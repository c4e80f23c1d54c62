"""Qwen3-VL adapter: Qwen2-VL's token layout, DeepStack visual features, interleaved MRoPE.

How it differs from Qwen2/2.5-VL:
  * patches are 16 px (not 14): 2 x 2 merged patches make one LM token, so an image of
    (h, w) patches is a (h/2) x (w/2) row-major grid of <|image_pad|> tokens between
    <|vision_start|> and <|vision_end|> (a 448 x 448 image: 14 x 14 = 196 tokens);
  * DeepStack: features of three vision blocks (8, 16, 24 in the 8B model) pass their own
    mergers and are ADDED to the decoder's hidden states after decoder layers 0, 1, 2, at the
    image positions only (``_deepstack_process``). The image K/V of layer l therefore still
    depend only on the image and the text before it: the injection touches image positions,
    and causal attention keeps later text out. ``post_proj`` is the main merger's output (the
    LM's ``inputs_embeds`` at image positions), without the DeepStack additions;
  * rotary: MRoPE with (t, h, w) positions per image token, the three axes' frequencies
    interleaved across the head dimension (T H W T H W ...; ``mrope_section`` [24, 20, 20]
    says how many frequencies go to each axis) instead of Qwen2-VL's contiguous sections.
    Cached keys are post-RoPE as usual; text after an image continues from its largest position;
  * the decoder has per-head RMSNorm on queries and keys (Qwen3), applied before RoPE: the
    pre-RoPE keys of ``--keys pre-rope`` are the k_proj output, before that norm;
  * the chat template has no default system prompt.
Knock-out and ``answer`` run through the same AttentionInterface as Qwen2.5-VL.
"""

from __future__ import annotations

from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from kvpipe.pipeline.models.qwen2vl import Qwen2VLAdapter, qwen_tokenizer, special_ids, TINY_VOCAB

# Qwen/Qwen3-VL-8B-Instruct's chat template, structurally: no default system prompt, images in place.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def qwen3vl_8b_config() -> Qwen3VLConfig:
    """Qwen/Qwen3-VL-8B-Instruct's config.json: Qwen3-8B text model (36 layers, 32 q / 8 kv heads,
    head_dim 128), a 27-block SigLIP-2-shaped vision tower with 16 px patches and DeepStack at
    blocks 8, 16, 24."""
    text = {"vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 36,
            "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
            "max_position_embeddings": 262144, "rms_norm_eps": 1e-6,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": [24, 20, 20],
                                "mrope_interleaved": True}}
    vision = {"depth": 27, "hidden_size": 1152, "intermediate_size": 4304, "num_heads": 16,
              "out_hidden_size": 4096, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 2304, "deepstack_visual_indexes": [8, 16, 24]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special_ids(qwen_tokenizer()))


def tiny_qwen3vl_config() -> Qwen3VLConfig:
    """2 layers, hidden 64, 4 q / 2 kv heads (head_dim 16); a 2-block tower (16 px patches) whose
    block 0 feeds DeepStack into decoder layer 0's output."""
    text = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                                "mrope_interleaved": True},
            "bos_token_id": 2, "eos_token_id": 3, "pad_token_id": 1}
    vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2, "out_hidden_size": 64,
              "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
              "num_position_embeddings": 64, "deepstack_visual_indexes": [0]}
    return Qwen3VLConfig(text_config=text, vision_config=vision, **special_ids(qwen_tokenizer()))


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3vl"
    model_types = ("qwen3_vl",)
    chat_template = QWEN3_CHAT_TEMPLATE
    # Qwen/Qwen3-VL-8B-Instruct's preprocessor_config.json
    image_processor_kw = {"size": {"shortest_edge": 65536, "longest_edge": 16777216},
                          "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}

    hf_class = Qwen3VLForConditionalGeneration
    processor_names = ("Qwen3VLProcessor", "Qwen3VLVideoProcessor")
