"""InternVL3 adapter (the transformers-format "-hf" checkpoints: ``InternVLForConditionalGeneration``;
InternViT tower, pixel-shuffle MLP projector, Qwen2.5 text model): tiles plus a thumbnail.

Layout: the image processor (``GotOcr2ImageProcessor``, ``crop_to_patches``) picks the tile
grid whose aspect ratio is closest to the image's among 1..12 tiles of 448 px, crops the
resized image into those tiles (row-major) and, when there is more than one, appends a
THUMBNAIL (the whole image resized to 448 px). Each 448 px view is 32 x 32 patches, pixel
-shuffled 2 x 2 into 16 x 16 = 256 tokens; the prompt is ``<img>`` + 256 x n_views x
``<IMG_CONTEXT>`` + ``</img>``. kvpipe's segments: ``base`` = the thumbnail (the last 256
tokens; for a one-tile image the tile itself, which then is the whole image), then
``tile_k`` (k = 0, 1, ... in the processor's row-major tile order), each 16 x 16. The
processor's output does not say how many tile rows and columns the grid has (only the view
count), so tiles are numbered, not placed.

The decoder is causal Qwen2 (28 layers, 28 q / 4 kv heads in the 8B model): an image
token's K/V depend on the views before it and earlier text; the thumbnail's see every tile.
Knock-out and ``answer`` use the same AttentionInterface as the other Qwen2-based families.
"""

from __future__ import annotations

from typing import Any

from transformers import InternVLConfig, InternVLForConditionalGeneration

from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.llava_ov import qwen2_text
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

INTERNVL_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
INTERNVL_SPECIALS = ["<|im_start|>", "<|im_end|>", *INTERNVL_IMAGE_TOKENS.values()]

# OpenGVLab/InternVL3-8B-hf's chat template, structurally (Qwen2 turns; an image is "<IMG_CONTEXT>\n";
# the checkpoint's default system prompt is left out here).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY_VOCAB = 256


def internvl_tokenizer():
    return build_word_tokenizer(INTERNVL_SPECIALS, unk="<unk>", pad="<|endoftext|>", named=INTERNVL_IMAGE_TOKENS)


def internvl3_8b_config() -> InternVLConfig:
    """OpenGVLab/InternVL3-8B-hf's config.json: Qwen2.5-7B (28 layers, 28 q / 4 kv heads, vocab 151674)
    on InternViT-300M (24 layers, 448 px, 14 px patches), pixel shuffle 0.5 -> 256 tokens per view."""
    text = qwen2_text(3584, 28, 28, 4, 18944, 151674)
    vision = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16,
              "image_size": [448, 448], "patch_size": [14, 14], "layer_scale_init_value": 0.1,
              "use_mean_pooling": True}
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=151667, image_seq_length=256,
                          downsample_ratio=0.5, vision_feature_layer=-1, tie_word_embeddings=False)


def tiny_internvl3_config() -> InternVLConfig:
    """2 Qwen2 layers (hidden 64, 4 q / 2 kv heads) on a 2-layer tower: 112 px views, 8 x 8 patches
    pixel-shuffled into 4 x 4 = 16 tokens per view."""
    ids = internvl_tokenizer().convert_tokens_to_ids
    text = qwen2_text(64, 2, 4, 2, 128, TINY_VOCAB)
    text.update(max_position_embeddings=4096, bos_token_id=ids("<|endoftext|>"), eos_token_id=ids("<|im_end|>"),
                pad_token_id=ids("<|endoftext|>"))
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": [112, 112], "patch_size": [14, 14]}
    return InternVLConfig(text_config=text, vision_config=vision, image_token_id=ids("<IMG_CONTEXT>"),
                          image_seq_length=16, downsample_ratio=0.5, vision_feature_layer=-1,
                          tie_word_embeddings=False)


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    multi_view = True  # base view + crops / tiles (--views base stores the base view only)
    hf_class = InternVLForConditionalGeneration
    image_placeholder = "<IMG_CONTEXT>"
    multi_image = False  # a tiled image's views are counted from its token run, which several images share

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        side = int(config.vision_config.image_size[0])
        images = GotOcr2ImageProcessor(size={"height": side, "width": side}, crop_to_patches=True, min_patches=1,
                                       max_patches=12, image_mean=[0.485, 0.456, 0.406],
                                       image_std=[0.229, 0.224, 0.225])
        return InternVLProcessor(image_processor=images, tokenizer=internvl_tokenizer(),
                                 video_processor=InternVLVideoProcessor(),
                                 image_seq_length=int(config.image_seq_length), chat_template=INTERNVL_CHAT_TEMPLATE)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        per_view = int(self.model.config.image_seq_length)
        side = round(per_view**0.5)
        views = n_tokens // per_view
        if views == 1:
            return (Segment("base", 0, side, side),)
        tiles = [Segment(f"tile_{k}", k * per_view, side, side) for k in range(views - 1)]
        return (Segment("base", (views - 1) * per_view, side, side), *tiles)
