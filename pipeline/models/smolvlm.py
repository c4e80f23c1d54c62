"""SmolVLM2 adapter (the Idefics3 architecture: SigLIP tower, pixel-shuffle connector, Llama text
model; SmolVLM2's class is ``SmolVLMForConditionalGeneration``): images split into tiles plus a
global view.

Layout, from the processor's own prompt string: an image whose longest edge (after resizing
to ``size.longest_edge``) exceeds the tile size is split into rows x cols tiles of 384 px, each
tile written as ``<fake_token_around_image><row_r_col_c>`` + 81 x ``<image>`` (27 x 27 patches,
pixel-shuffled 3 x 3 into 9 x 9 tokens), rows separated by "\\n"; then the global view (the
whole image resized to one tile) as ``<fake_token_around_image><global-img>`` + 81 x ``<image>``
+ ``<fake_token_around_image>``. So the image tokens are the tiles first, in row-major order,
and the global view LAST. kvpipe's segments: ``base`` = the global view (the whole image:
the segment the probes read, at its offset after the tiles), then one segment per tile,
``tile_r_c`` (1-based as in the prompt), each a 9 x 9 row-major grid. Which tile a run of
image tokens is comes from the marker token before it in the input ids. A small image (not
split) is the global view alone.

The decoder is causal (Llama; SmolVLM2-2.2B: 24 layers, 32 heads, no GQA), so an image
token's K/V depend on the image tiles before it and earlier text only: the global view's K/V
see every tile, a tile's see the tiles before it. Knock-out and ``answer`` use the same
AttentionInterface as the other Llama-based families. The processor needs ``num2words``.
"""

from __future__ import annotations

from typing import Any

from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration

from kvpipe.errors import ModelError
from kvpipe.pipeline.models.base import ModelAdapter, Segment
from kvpipe.pipeline.models.llava_next import tiny_llama_text
from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

MAX_TILES_PER_SIDE = 8
TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, MAX_TILES_PER_SIDE + 1) for c in range(1, MAX_TILES_PER_SIDE + 1)]
SMOL_SPECIALS = ["<|im_start|>", "<end_of_utterance>", "<fake_token_around_image>", "<global-img>", "<image>",
                 "<video>", *TILE_TOKENS]

# HuggingFaceTB/SmolVLM2-2.2B-Instruct's chat template (transformers' SmolVLM default).
SMOL_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'] is string %}{{': ' + message['content']}}{% else %}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)



def smol_tokenizer():
    return build_word_tokenizer(SMOL_SPECIALS, unk="<unk>", pad="<|endoftext|>")


def smolvlm2_22b_config() -> SmolVLMConfig:
    """HuggingFaceTB/SmolVLM2-2.2B-Instruct's config.json: SmolLM2-1.7B (Llama: 24 layers, hidden
    2048, 32 heads = 32 KV heads, rope theta 130k, vocab 49280) on a 27-layer SigLIP at 384 px,
    pixel shuffle x3 -> 81 tokens per tile."""
    text = {"model_type": "llama", "vocab_size": 49280, "hidden_size": 2048, "intermediate_size": 8192,
            "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 32,
            "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_type": "default", "rope_theta": 130000.0}, "tie_word_embeddings": False}
    vision = {"hidden_size": 1152, "intermediate_size": 4304, "num_hidden_layers": 27, "num_attention_heads": 16,
              "image_size": 384, "patch_size": 14}
    return SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=3, image_token_id=49190)


def tiny_smolvlm2_config() -> SmolVLMConfig:
    """2 Llama layers (hidden 64, 4 heads = 4 KV heads) on a 2-layer tower: 112 px tiles, 8 x 8
    patches shuffled 2 x 2 into 4 x 4 = 16 tokens per tile; images up to 4 x 4 tiles."""
    tok = smol_tokenizer()
    ids = tok.convert_tokens_to_ids
    text = tiny_llama_text(tok, 4, 130000.0, "<|im_start|>", "<end_of_utterance>", "<|endoftext|>")
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
              "image_size": 112, "patch_size": 14}
    return SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2, image_token_id=ids("<image>"))


class SmolVLMAdapter(ModelAdapter):
    family = "smolvlm"
    multi_view = True  # base view + crops / tiles (--views base stores the base view only)
    hf_class = SmolVLMForConditionalGeneration
    image_placeholder = "<image>"
    nested_images = True
    multi_image = False  # the tile markers of several images in one prompt are not split per image yet

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor

        v = config.vision_config
        tile = int(v.image_size)
        images = SmolVLMImageProcessor(size={"longest_edge": 4 * tile}, max_image_size={"longest_edge": tile},
                                       image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
        return SmolVLMProcessor(image_processor=images, tokenizer=smol_tokenizer(),
                                video_processor=SmolVLMVideoProcessor(), chat_template=SMOL_CHAT_TEMPLATE,
                                image_seq_len=cls.tile_side(config) ** 2)

    @staticmethod
    def tile_side(config: Any) -> int:
        """Tokens along one side of a tile: patches per side / the pixel-shuffle factor."""
        v = config.vision_config
        return int(v.image_size) // int(v.patch_size) // int(config.scale_factor)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        side = self.tile_side(self.model.config)
        ids = inputs["input_ids"][index]
        runs = (ids == self.image_token_id).nonzero()[:, 0]
        per_tile = side * side
        if n_tokens % per_tile:
            raise ModelError(f"{n_tokens} image tokens are not whole tiles of {per_tile}")
        markers = self.processor.tokenizer.convert_ids_to_tokens(
            [int(ids[int(runs[t * per_tile]) - 1]) for t in range(n_tokens // per_tile)])
        tiles, base = [], None
        for t, marker in enumerate(markers):
            if marker == "<global-img>":
                base = Segment("base", t * per_tile, side, side)
            else:  # "<row_r_col_c>"
                tiles.append(Segment("tile" + marker.strip("<>").replace("row", "").replace("_col", ""),
                                     t * per_tile, side, side))
        if base is None:
            raise ModelError("the SmolVLM prompt has no <global-img> view")
        return (base, *tiles)
