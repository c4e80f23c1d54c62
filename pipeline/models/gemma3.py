"""Gemma 3 adapter (Gemma 3 text model, SigLIP tower at 896 px): one fixed view per image,
bidirectional attention among an image's tokens.

Layout: the processor expands the placeholder <start_of_image> into
"\\n\\n<start_of_image>" + 256 x <image_soft_token> + "<end_of_image>\\n\\n"; the 64 x 64 SigLIP
patches of the 896 x 896 view are average-pooled 4 x 4 into a 16 x 16 row-major ``base`` grid
(``mm_tokens_per_image`` = 256). The image is resized whole (no crop); pan-and-scan crops are
off, as in the checkpoint's preprocessor_config.json.

Attention: inside the decoder, tokens of the same image attend to each other in both
directions (the processor's ``token_type_ids`` mark them; the model ORs a block mask onto the
causal one), while every other token is causal; layers alternate sliding-window (1024
tokens) and global attention 5:1. The image K/V are cached like any other. What changes:
an image token's K/V at layer l > 0 depend on the WHOLE image (including tokens after it in
the sequence), not only on the image tokens before it; they still depend on no later text,
so extraction may cut the sequence after the last image token as for causal families.
``run_capture`` therefore forwards ``token_type_ids`` (cut like the ids): without them the
model would fall back to causal image attention and the K/V would not be Gemma 3's.

Rotary: standard RoPE, theta 10k on sliding layers and 1M (linear scaling x8) on global ones;
queries and keys pass a per-head RMSNorm before RoPE; scores scale by query_pre_attn_scalar^-0.5.
Gemma 3 has no attention-logit soft-capping, so the knock-out's recomputed heads (plain
softmax) are exact; knock-out and ``answer`` go through the same AttentionInterface.
"""

from __future__ import annotations

from typing import Any

from transformers import Gemma3Config, Gemma3ForConditionalGeneration, PreTrainedTokenizerFast

from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

GEMMA_SPECIALS = ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
                  "<image_soft_token>"]
GEMMA_IMAGE_TOKENS = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>",
                      "eoi_token": "<end_of_image>"}

# google/gemma-3-4b-it's chat template, structurally: <bos> written by the template, "model" as the
# assistant's role, images where they stand in the content.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' }}{% if message['content'] is string %}{{ message['content'] | trim }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'image' %}{{ '<start_of_image>' }}"
    "{% elif item['type'] == 'text' %}{{ item['text'] | trim }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<end_of_turn>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

TINY_VOCAB = 256


def gemma_tokenizer() -> PreTrainedTokenizerFast:
    """Word tokenizer with Gemma 3's specials and the image tokens its processor reads by name."""
    tok = build_word_tokenizer(GEMMA_SPECIALS, unk="<unk>", pad="<pad>", named=GEMMA_IMAGE_TOKENS)
    tok.bos_token, tok.eos_token = "<bos>", "<eos>"
    return tok


def siglip_896(layers: int = 27) -> dict[str, Any]:
    return {"model_type": "siglip_vision_model", "hidden_size": 1152, "intermediate_size": 4304,
            "num_hidden_layers": layers, "num_attention_heads": 16, "image_size": 896, "patch_size": 14,
            "vision_use_head": False}


def gemma3_4b_config() -> Gemma3Config:
    """google/gemma-3-4b-it's config.json: 34 layers, hidden 2560, 8 q / 4 kv heads of 256, sliding
    window 1024 (5 local : 1 global), SigLIP-so400m at 896 px, 256 tokens per image."""
    text = {"vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34,
            "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256, "query_pre_attn_scalar": 256,
            "sliding_window": 1024, "max_position_embeddings": 131072, "rms_norm_eps": 1e-6,
            "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
                                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    return Gemma3Config(text_config=text, vision_config=siglip_896(), mm_tokens_per_image=256,
                        boi_token_index=255999, eoi_token_index=256000, image_token_index=262144)


def tiny_gemma3_config() -> Gemma3Config:
    """2 layers (one sliding, one global), hidden 64, 4 q / 2 kv heads of 16; a 2-layer SigLIP seeing
    112 px (8 x 8 patches) pooled 2 x 2 into 4 x 4 = 16 image tokens."""
    ids = gemma_tokenizer().convert_tokens_to_ids
    text = {"vocab_size": TINY_VOCAB, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "query_pre_attn_scalar": 16,
            "sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 4096, "bos_token_id": ids("<bos>"), "eos_token_id": ids("<eos>"),
            "pad_token_id": ids("<pad>")}
    vision = {"model_type": "siglip_vision_model", "hidden_size": 32, "intermediate_size": 64,
              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 112, "patch_size": 14,
              "vision_use_head": False}
    return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=16,
                        boi_token_index=ids("<start_of_image>"), eoi_token_index=ids("<end_of_image>"),
                        image_token_index=ids("<image_soft_token>"))


class Gemma3Adapter(ModelAdapter):
    family = "gemma3"
    hf_class = Gemma3ForConditionalGeneration
    image_placeholder = "<start_of_image>"
    nested_images = True

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import Gemma3ImageProcessor, Gemma3Processor

        side = int(config.vision_config.image_size)
        images = Gemma3ImageProcessor(size={"height": side, "width": side}, do_pan_and_scan=False,
                                      image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return Gemma3Processor(image_processor=images, tokenizer=gemma_tokenizer(),
                               image_seq_length=int(config.mm_tokens_per_image), chat_template=GEMMA3_CHAT_TEMPLATE)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        side = round(int(self.model.config.mm_tokens_per_image) ** 0.5)
        return (Segment("base", 0, side, side),)
