"""The model-adapter contract and the model registry.

Why: everything that knows module paths or processor quirks of one MLM family lives in one
small adapter; the extraction loop only asks an adapter to (1) turn images into model inputs
cut after the last image token, (2) say where the image tokens are and how they map to the
image (the token layout), and (3) name its decoder layers. Adding a family = one file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Sequence

import torch
from PIL import Image

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.capture import gather_batch, run_text_capture
from kvpipe.store.schema import POST_PROJ

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

    def base_only(self) -> "TokenLayout":
        """The base view's tokens alone (``kvpipe extract --views base``): its positions and its
        segment at offset 0. The model still sees every token; only the stored ones change."""
        seg = self.base
        if len(self.segments) == 1 and seg.offset == 0:
            return self
        keep = self.positions[seg.offset: seg.offset + seg.n_tokens]
        return TokenLayout(keep, (Segment(seg.name, 0, seg.rows, seg.cols, seg.newline),))


@dataclass
class Batch:
    """Model inputs for a batch of images, cut after the last image token."""

    inputs: dict[str, Any]
    layouts: list[TokenLayout]
    prefix_ids: list[list[int]]  # the token ids before each image's first image token
    # the sample (row of the inputs) of each layout; None: layout i is sample i (one image per sample)
    samples: list[int] | None = None

    def sample_of(self, i: int) -> int:
        return i if self.samples is None else self.samples[i]

    def views(self, views: str) -> "Batch":
        """This batch storing ``views``: "all" (every image token) or "base" (the base view only)."""
        if views == "all":
            return self
        return replace(self, layouts=[lay.base_only() for lay in self.layouts])


class ModelAdapter:
    """Base class: subclasses wrap one transformers MLM family."""

    family: ClassVar[str] = ""
    model_types: ClassVar[tuple[str, ...]] = ()  # transformers config.model_type values (default: (family,))
    image_placeholder: ClassVar[str] = ""  # text the processor expands into image tokens
    kinds: ClassVar[tuple[str, ...]] = ("keys", "values", POST_PROJ)  # the store kinds it captures
    encodes_text: ClassVar[bool] = True  # text queries get a text-only pass (semantic-seg, refexp-seg)
    nested_images: ClassVar[bool] = False  # the processor takes a batch's images as one list per sample
    # an image becomes more than its base view (crops, tiles, newlines): ``--views base`` stores less
    multi_view: ClassVar[bool] = False
    # several images in one prompt (``preprocess_sequences``): each image's token count follows
    # from the processor's output alone, and the oracle tests pass for the family
    multi_image: ClassVar[bool] = True
    # Inputs the forward pass reads on the host (image sizes in Python loops): left there, a
    # device copy would cost one host synchronisation per read. Set by ``accelerate``.
    host_inputs: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "family" in cls.__dict__ and "model_types" not in cls.__dict__:  # the family is its model_type
            cls.model_types = (cls.family,)

    def __init__(self, model: torch.nn.Module, processor: Any, source: dict[str, Any]):
        self.model = model.eval().requires_grad_(False)  # kvpipe never trains: no autograd graph, ever
        self.processor = processor
        self.source = source  # provenance written to the store (name, checkpoint, revision, init)
        tok = processor.tokenizer
        tok.padding_side = "right"  # right padding keeps every image's positions unbatched
        self.image_token_id = self._image_token_id()

    # ---- to be provided by subclasses -------------------------------------------------
    hf_class: ClassVar[type | None] = None  # the transformers model class (or override model_class)

    @classmethod
    def model_class(cls) -> type:
        if cls.hf_class is None:
            raise NotImplementedError
        return cls.hf_class

    @classmethod
    def build_processor(cls, config: Any) -> Any:
        """An offline processor (word tokenizer + the family's image processor + template)."""
        raise NotImplementedError

    def _image_token_id(self) -> int:
        """The id the processor writes at every image token (the model's config says it)."""
        cfg = self.model.config
        value = getattr(cfg, "image_token_id", None)
        if value is None:
            value = getattr(cfg, "image_token_index", None)
        if value is None:
            raise ModelError(f"{type(cfg).__name__} names no image token id (image_token_id / image_token_index)")
        return int(value)

    def segments(self, inputs: dict[str, Any], index: int, n_tokens: int) -> tuple[Segment, ...]:
        """The token grid(s) of image ``index`` of a processed batch."""
        raise NotImplementedError

    def preprocessor(self) -> "ModelAdapter":
        """A copy of this adapter without the model's weights (its config only): enough for
        ``preprocess``, and cheap to send to loader processes on other cores."""
        import copy
        from types import SimpleNamespace

        light = copy.copy(self)
        light.model = SimpleNamespace(config=self.model.config)
        return light

    def accelerate(self) -> list[str]:
        """Swap in faster, numerically equivalent kernels; returns what was changed. For every
        MLM: the decoder's elementwise work as fused kernels (``text_kernels``, CUDA only)."""
        from kvpipe.pipeline.models.text_kernels import fuse_decoder_kernels

        return fuse_decoder_kernels(self.language_model(), self.device)

    def decoder_layers(self) -> list[torch.nn.Module]:
        return list(self.language_model().layers)

    def language_model(self) -> torch.nn.Module:
        """The decoder: ``model.language_model`` (``model.text_model`` in Idefics3 / SmolVLM)."""
        inner = self.model.model
        found = getattr(inner, "language_model", None)
        return found if found is not None else inner.text_model

    def attention_modules(self) -> list[torch.nn.Module]:
        """The self-attention module of each decoder layer (what attention knock-out patches)."""
        return [layer.self_attn for layer in self.decoder_layers()]

    # ---- extraction hooks (vision encoders override these) -------------------------------
    @classmethod
    def load_processor(cls, checkpoint: str, revision: str | None) -> Any:
        """The processor saved with a checkpoint (hub id or directory)."""
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(checkpoint, revision=revision)

    @classmethod
    def processor_problem(cls, processor: Any) -> str:
        """Why a loaded processor cannot serve this family ("" when it can)."""
        if not (hasattr(processor, "tokenizer") and hasattr(processor, "image_processor")):
            return (f"has no multimodal processor (found {type(processor).__name__}); "
                    f"save the processor next to the model")
        return ""

    def check_options(self, kinds: tuple[str, ...], *, prefix: str, keys: str | None) -> None:
        """One-line UsageError for an extraction option this model cannot honour."""
        other = [k for k in kinds if k not in self.kinds]
        if other:
            raise UsageError(f"--kinds {','.join(other)} is a vision encoder's kind (--model siglip, dinov2-base, "
                             f"...); {self.source.get('name')} is an MLM: use {', '.join(self.kinds)}")

    def gather(self, batch: Batch, sel: Any, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], list[int]]:
        """Run one batch and gather every image's features on the device in the store dtype:
        (kind -> tensor with the token axis second to last, tokens per image). An MLM's image
        K/V come from its own cache (``capture.gather_batch``)."""

        return gather_batch(self, batch, sel, dtype)

    @property
    def encodes_queries(self) -> bool:
        """Whether a dataset's text queries get a text pass (``text_features``) into the store."""
        return self.encodes_text

    def text_features(self, texts: list[str], sel: Any, template: str) -> tuple[dict[str, torch.Tensor], list[list[int]]]:
        """Each text query's features of the selected kinds (float32, CPU) and its token ids: an
        MLM's final-token K/V and input-embedding row (``capture.run_text_capture``)."""
        return run_text_capture(self, texts, sel, template)

    def input_meta(self, prefix: str, template: str, keys_rope: str) -> dict[str, Any]:
        """The store metadata fixed by the model's input: template, prefix, every token id
        before the image, the image token id and the stored keys' convention."""
        probe = self.preprocess([Image.new("RGB", (56, 56))], prefix, template)
        return {"template": template, "prefix": prefix, "prefix_token_ids": tuple(probe.prefix_ids[0]),
                "image_token_id": self.image_token_id, "keys_rope": keys_rope}

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

    def preprocess(self, images: list[Image.Image], prefix: str | Sequence[str] = "",
                   template: str = "chat") -> Batch:
        """Tokenise a batch and cut it after the last image token (text after it is waste).

        ``prefix``: one text for every image, or one per image (``--prefix-from``); sequences of
        different lengths are right-padded, so each image keeps the positions of an unbatched run.
        """
        wanted = [prefix] * len(images) if isinstance(prefix, str) else list(prefix)
        if len(wanted) != len(images):
            raise ValueError(f"{len(wanted)} prefixes for {len(images)} images")
        prompts: dict[str, str] = {}
        for p in wanted:
            if p not in prompts:
                prompts[p] = self.prompt(p, template)
        enc = self.processor(text=[prompts[p] for p in wanted], images=self.per_sample(images),
                             return_tensors="pt", padding=True, padding_side="right")
        ids = enc["input_ids"]
        is_image = ids == self.image_token_id
        if not bool(is_image.any(dim=1).all()):
            raise ModelError("the processor produced a sequence without image tokens")
        last = int(torch.where(is_image.any(0))[0].max()) + 1
        # every per-token input (ids, attention mask, token type ids, ...) is cut at the same column
        inputs = {k: (v[:, :last] if isinstance(v, torch.Tensor) and v.shape == ids.shape else v)
                  for k, v in enc.items()}
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

    def check_multi_image(self) -> None:
        """A one-line UsageError when this family cannot extract several images in one prompt."""
        if not self.multi_image:
            raise UsageError(f"--multi-image: {self.source.get('name')} ({self.family or 'this model'}) cannot "
                             f"place several images in one prompt in kvpipe; extract without --multi-image")

    def sequence_prompt(self, n_images: int, template: str) -> str:
        """The text of a prompt holding ``n_images`` images: with the chat template the prompt
        ``kvpipe answer`` builds (``chat_prompt``: the images of one user turn, then the text),
        whose text after the last image is cut away; ``none``: the placeholders alone."""
        if template == "none":
            return self.image_placeholder * n_images
        if template != "chat":
            raise UsageError(f"--template must be one of {', '.join(TEMPLATES)}, not {template!r}")
        return self.chat_prompt(".", n_images)

    def preprocess_sequences(self, sequences: list[list[Image.Image]], template: str = "chat") -> Batch:
        """Tokenise a batch of multi-image prompts (one per sample) and cut it after the last
        image token; one layout per image, in order, each knowing its sample (``Batch.samples``).

        Why a prompt per sample: an image's K/V depend on every image before it in its prompt
        (causal attention), so the images of one question are stored as the MLM sees them when it
        answers the question (``kvpipe answer``), not one by one."""
        self.check_multi_image()
        prompts = [self.sequence_prompt(len(seq), template) for seq in sequences]
        enc = self.processor(text=prompts, images=[list(seq) for seq in sequences], return_tensors="pt",
                             padding=True, padding_side="right")
        ids = enc["input_ids"]
        is_image = ids == self.image_token_id
        last = int(torch.where(is_image.any(0))[0].max()) + 1
        inputs = {k: (v[:, :last] if isinstance(v, torch.Tensor) and v.shape == ids.shape else v)
                  for k, v in enc.items()}
        layouts, prefixes, samples, flat = [], [], [], 0
        for i, seq in enumerate(sequences):
            pos = torch.where(is_image[i])[0]
            at = 0
            for _ in seq:
                segments = self.segments(enc, flat, -1)
                n = sum(seg.n_tokens for seg in segments)
                layouts.append(TokenLayout(pos[at:at + n], segments))
                prefixes.append(ids[i, : int(pos[at])].tolist() if at < pos.numel() else [])
                samples.append(i)
                at, flat = at + n, flat + 1
            if at != pos.numel():
                raise ModelError(f"the token layouts of sample {i}'s {len(seq)} images cover {at} tokens but the "
                                 f"sequence has {int(pos.numel())}; the adapter {self.family} does not match this "
                                 f"processor's multi-image prompts")
        return Batch(inputs, layouts, prefixes, samples)

    def per_sample(self, images: list[Image.Image]) -> list[Any]:
        """One image per sample, as this family's processor wants it: a flat list, or one list
        per sample for processors that read a flat list as one sample's images (``nested_images``)."""
        return [[im] for im in images] if self.nested_images else list(images)

    def chat_prompt(self, prompt: str, n_images: int) -> str:
        """One user turn of the model's own chat template: the images in order, then ``prompt``;
        followed by the assistant's header (the generation prompt)."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        return self.processor.apply_chat_template([{"role": "user", "content": content}],
                                                  add_generation_prompt=True, tokenize=False)

    def chat_inputs(self, prompts: list[str], images: list[list[Image.Image]]) -> dict[str, Any]:
        """Generation inputs for a batch of questions, each with its own images (one or several).

        Left padding, set for this call only, puts every row's last prompt token in the last
        column, which generation needs; extraction keeps the tokenizer's right padding.
        Images go to the processor nested per question, so processors that treat a multi-image
        question differently (LLaVA-OneVision does not tile those images) see which is which.
        """
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists")
        texts = [self.chat_prompt(p, len(imgs)) for p, imgs in zip(prompts, images)]
        nested = [list(imgs) for imgs in images]
        enc = self.processor(text=texts, images=nested if any(nested) else None, return_tensors="pt",
                             padding=True, padding_side="left")
        return dict(enc)

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
