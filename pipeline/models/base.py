"""The model-adapter contract and the model registry.

Why: everything that knows module paths or processor quirks of one MLM family lives in one
small adapter; the extraction loop only asks an adapter to (1) turn images into model inputs
cut after the last image token, (2) say where the image tokens are and how they map to the
image (the token layout), and (3) name its decoder layers. Adding a family = one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from PIL import Image

from kvpipe.errors import ModelError, UsageError
from kvpipe.registry import Registry

TEMPLATES = ("chat", "none")


@dataclass(frozen=True)
class Segment:
    """A rectangle of image tokens inside one image's token run.

    name: "base" (the whole image at the encoder's base resolution), "crops" (any-res
        high-resolution tiles stitched into one grid), ...
    offset: index of the segment's first token within the image's tokens.
    rows, cols: the token grid; tokens are row-major.
    newline: True when each row is followed by one extra "newline" token (LLaVA any-res),
        so a row occupies cols + 1 tokens.
    """

    name: str
    offset: int
    rows: int
    cols: int
    newline: bool = False

    @property
    def n_tokens(self) -> int:
        return self.rows * (self.cols + int(self.newline))

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "offset": self.offset, "rows": self.rows, "cols": self.cols,
                "newline": self.newline}


@dataclass(frozen=True)
class TokenLayout:
    """Where one image's tokens sit in the sequence and what they depict."""

    positions: torch.Tensor  # sequence indices of the image tokens, ascending
    segments: tuple[Segment, ...]

    @property
    def n_tokens(self) -> int:
        return int(self.positions.numel())

    @property
    def base(self) -> Segment:
        return self.segments[0]

    def segments_json(self) -> str:
        return json.dumps([s.to_dict() for s in self.segments])


@dataclass
class Batch:
    """Model inputs for a batch of images, cut after the last image token."""

    inputs: dict[str, Any]
    layouts: list[TokenLayout]
    prefix_ids: list[list[int]]  # the token ids before each image's first image token


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: which adapter, which checkpoint, which config preset for random init."""

    adapter: type["ModelAdapter"]
    checkpoint: str | None  # default hub id; None for tiny presets (always built in code)
    preset: Callable[[], Any]  # returns the transformers config for init="random"
    description: str = ""
    tiny: bool = False


MODELS: Registry[ModelEntry] = Registry("model", "--model")


class ModelAdapter:
    """Base class: subclasses wrap one transformers MLM family."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers config.model_type values
    image_placeholder: ClassVar[str] = ""  # text the processor expands into image tokens

    def __init__(self, model: torch.nn.Module, processor: Any, source: dict[str, Any]):
        self.model = model.eval()
        self.processor = processor
        self.source = source  # provenance written to the store (name, checkpoint, revision, init)
        tok = processor.tokenizer
        tok.padding_side = "right"  # right padding keeps every image's positions unbatched
        self.image_token_id = self._image_token_id()

    # ---- to be provided by subclasses -------------------------------------------------
    @classmethod
    def model_class(cls) -> type:
        raise NotImplementedError

    @classmethod
    def build_processor(cls, config: Any) -> Any:
        """An offline processor (word tokenizer + the family's image processor + template)."""
        raise NotImplementedError

    def _image_token_id(self) -> int:
        raise NotImplementedError

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        """The token grid(s) of image ``index`` of a processed batch."""
        raise NotImplementedError

    def accelerate(self) -> list[str]:
        """Swap in faster, numerically equivalent kernels; returns what was changed (default: none)."""
        return []

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.model.model.language_model.layers)

    def language_model(self) -> torch.nn.Module:
        return self.model.model.language_model

    # ---- shared behaviour ------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config.get_text_config()

    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def n_kv_heads(self) -> int:
        return int(self.text_config.num_key_value_heads)

    @property
    def head_dim(self) -> int:
        cfg = self.text_config
        return int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)

    @property
    def hidden_size(self) -> int:
        return int(self.text_config.hidden_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def prompt(self, prefix: str, template: str) -> str:
        """The text before (and including) the image placeholder.

        With the chat template the placeholder sits where the model's own template puts an
        image in a user turn; the prefix is inserted right before it, so it precedes the image.
        """
        if template == "none":
            return prefix + self.image_placeholder
        if template != "chat":
            raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, not {template!r}")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "."}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=False, tokenize=False)
        cut = text.find(self.image_placeholder)
        if cut < 0:
            raise ModelError(f"the chat template of {self.source.get('name')} has no image placeholder "
                             f"{self.image_placeholder!r}; use --template none")
        return text[:cut] + prefix + self.image_placeholder

    def preprocess(self, images: list[Image.Image], prefix: str = "", template: str = "chat") -> Batch:
        """Tokenise a batch and cut it after the last image token (text after it is waste)."""
        text = self.prompt(prefix, template)
        enc = self.processor(text=[text] * len(images), images=images, return_tensors="pt",
                             padding=True)
        ids = enc["input_ids"]
        is_image = ids == self.image_token_id
        if not bool(is_image.any(dim=1).all()):
            raise ModelError("the processor produced a sequence without image tokens")
        last = int(torch.where(is_image.any(0))[0].max()) + 1
        inputs = dict(enc)
        inputs["input_ids"] = ids[:, :last]
        inputs["attention_mask"] = enc["attention_mask"][:, :last]
        if "mm_token_type_ids" in inputs:
            inputs["mm_token_type_ids"] = inputs["mm_token_type_ids"][:, :last]
        layouts, prefixes = [], []
        for i in range(len(images)):
            pos = torch.where(is_image[i])[0]
            layouts.append(TokenLayout(pos, self.segments(enc, i, int(pos.numel()))))
            prefixes.append(ids[i, : int(pos[0])].tolist())
            n = sum(s.n_tokens for s in layouts[-1].segments)
            if n != pos.numel():
                raise ModelError(f"token layout of image {i} covers {n} tokens but the sequence has "
                                 f"{int(pos.numel())}; the adapter {self.family} does not match this processor")
        return Batch(inputs, layouts, prefixes)

    def text_batch(self, texts: list[str], template: str = "chat") -> tuple[dict[str, Any], list[int]]:
        """Inputs for a text-only pass and the index of each text's final token."""
        if template == "chat":
            prompts = []
            for t in texts:
                msgs = [{"role": "user", "content": [{"type": "text", "text": t}]}]
                full = self.processor.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)
                prompts.append(full[: full.find(t) + len(t)] if t in full else full)
        else:
            prompts = list(texts)
        enc = self.processor.tokenizer(prompts, return_tensors="pt", padding=True)
        last = (enc["attention_mask"].sum(1) - 1).tolist()
        return dict(enc), [int(x) for x in last]
