"""The generic adapter: ``--model any:HUB_ID_OR_DIR`` for image-text-to-text checkpoints that have
no family adapter, as long as their image tokens are marked by an image token id in the input ids.

What it relies on, and nothing more:
  * the model loads with ``AutoModelForImageTextToText`` and its decoder is
    ``model.model.language_model`` (or ``text_model``) with ``layers[i].self_attn``;
  * the config (``image_token_id`` / ``image_token_index``) or the processor
    (``image_token_id``) names the image token id, and the processor expands its
    ``image_token`` placeholder into one such id per image token: the positions are exactly
    ``input_ids == image_token_id`` of the processor's own output;
  * the K/V come from the model's own cache, as for every family (``capture.gather_batch``).
The grid: when the processor returns ``image_grid_thw`` (Qwen-style), the (h/merge) x
(w/merge) grid; otherwise one ``base`` segment of 1 x n tokens (tiles, thumbnails, newline
tokens are not told apart: write a family adapter for that). ``--prefix`` is inserted right
before the processor's image placeholder in the chat template's text. Images go to the
processor as one list per sample.

Refused with one line: architectures that feed the image through cross-attention layers
(Llama-3.2-Vision, ``MllamaForConditionalGeneration``): the image never enters the decoder's
self-attention cache, so there are no image K/V to store.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForImageTextToText

from kvpipe.errors import ModelError
from kvpipe.pipeline.models.base import ModelAdapter, Segment

# model_type -> why the generic adapter cannot serve it
CROSS_ATTENTION = {"mllama": "MllamaForConditionalGeneration (Llama-3.2-Vision)"}


def refusal(config: Any) -> str:
    """Why the generic adapter cannot capture image K/V of this architecture ("" when it can)."""
    model_type = getattr(config, "model_type", "")
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if model_type in CROSS_ATTENTION or getattr(text, "cross_attention_layers", None):
        name = CROSS_ATTENTION.get(model_type, model_type)
        return (f"{name} reads the image through cross-attention layers: the image never enters the decoder's "
                f"self-attention cache, so there are no image keys/values to store")
    return ""


class GenericAdapter(ModelAdapter):
    hf_class = AutoModelForImageTextToText
    family = "generic"
    model_types = ()  # never chosen by model type: only through any:
    nested_images = True
    multi_image = False  # token counts per image are not known from the processor's output alone

    def __init__(self, model: Any, processor: Any, source: dict[str, Any]):
        why = refusal(model.config)
        if why:
            raise ModelError(f"--model {source.get('name')}: {why}")
        placeholder = getattr(processor, "image_token", None)
        if not placeholder:
            raise ModelError(f"--model {source.get('name')}: the processor {type(processor).__name__} names no "
                             f"image token (processor.image_token); kvpipe cannot place the image")
        self.image_placeholder = str(placeholder)
        super().__init__(model, processor, source)

    def _image_token_id(self) -> int:
        try:
            return super()._image_token_id()
        except ModelError:
            value = getattr(self.processor, "image_token_id", None)
            if value is None:
                raise
            return int(value)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        grid = inputs.get("image_grid_thw")
        merge = getattr(getattr(self.processor, "image_processor", None), "merge_size", None)
        if grid is not None and merge:
            t, h, w = (int(x) for x in grid[index])
            if t * h * w // merge**2 == n_tokens:
                return (Segment("base", 0, t * h // merge, w // merge),)
        return (Segment("base", 0, 1, n_tokens),)
