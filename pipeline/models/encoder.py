"""The adapter contract for plain vision encoders (SigLIP, CLIP, DINO, DINOv2): baselines.

Why: the paper compares the MLM's image values with the patch tokens of vision encoders
(Table 1's "SigLIP without MLM FT", Table 2's CLIP and DINO). An encoder store holds one kind,
``hidden``: every transformer block's output (``hidden_states[1:]``, before any final norm) at
the patch positions, shaped like keys/values with a single "head" as wide as the encoder
([layer, 1, token, width]), so the reader, verify and every probe treat it like image values.

Token layout: patch tokens only (CLS and register tokens are dropped), one ``base`` segment.
Images go through the encoder's own image processor class and constants (mean, std,
resampling), but are resized to the encoder's square input size without a centre crop, so
the token grid covers the whole image, as the base view of an MLM does, and token <-> pixel
mapping (probes/tokens.py) is proportional. A checkpoint whose processor crops (CLIP, DINOv2)
keeps its crop size as the input size.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from PIL import Image

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.base import Batch, ModelAdapter, Segment, TokenLayout
from kvpipe.pipeline.models.capture import gather_hidden
from kvpipe.pipeline.models.catalog import MODELS, resolved_hw
from kvpipe.store.schema import HIDDEN

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BILINEAR, BICUBIC = 2, 3  # PIL resampling codes, as preprocessor_config.json stores them


def _field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def input_hw(processor: Any) -> tuple[int, int]:
    """The (height, width) a checkpoint's processor feeds its encoder: the crop size when it
    centre-crops, else its fixed size, else a square of its shortest edge."""
    crop = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop is not None and _field(crop, "height"):
        return _field(crop, "height"), _field(crop, "width")
    size = processor.size
    if _field(size, "height"):
        return _field(size, "height"), _field(size, "width")
    if _field(size, "shortest_edge"):
        return _field(size, "shortest_edge"), _field(size, "shortest_edge")
    raise ModelError(f"cannot tell the input size of image processor {type(processor).__name__} ({size})")


class VisionEncoderAdapter(ModelAdapter):
    """Base class: subclasses name the transformers classes, the number of tokens before the
    patches and the family's preprocessing constants."""

    kinds = (HIDDEN,)
    encodes_text = False
    multi_image = False  # one image per forward pass: no prompt to hold several
    prefix_tokens: ClassVar[int] = 1  # CLS (+ registers) before the patch tokens
    interpolate_flag: ClassVar[bool] = True  # forward takes interpolate_pos_encoding
    # preprocessing constants of the family's checkpoints, for presets built in code
    mean: ClassVar[tuple[float, ...]] = IMAGENET_MEAN
    std: ClassVar[tuple[float, ...]] = IMAGENET_STD
    resample: ClassVar[int] = BICUBIC

    def __init__(self, model: torch.nn.Module, processor: Any, source: dict[str, Any]):
        self.model = model.eval().requires_grad_(False)  # kvpipe never trains: no autograd graph, ever
        name = source.get("name")
        # the catalog's resolution (the paper's baseline input) overrides the processor's size;
        # a checkpoint given by path keeps its processor's own size
        self.resolution = MODELS.get(name).resolution if name in MODELS else None
        if self.resolution and not self.resolution.startswith("short="):
            processor = self.whole_image_processor(resolved_hw(self.resolution, 1, 1), processor.resample,
                                                   processor.image_mean, processor.image_std)
        self.processor = processor
        if self.short_side:
            size = f"short side {self.resolution[len('short='):].replace('/', ' px, long side a multiple of ')} px"
        else:
            size = "{}x{} px".format(*input_hw(processor))
        self.source = {**source, "features": (
            f"{HIDDEN}: output of every transformer block (hidden_states[1:], before the final norm) at the "
            f"patch tokens only (no CLS/register tokens); images resized to {size}, no crop")}
        self.image_token_id = -1

    @property
    def short_side(self) -> bool:
        """Images keep their aspect ratio (``short=N/M``): each is resized to its own size."""
        return bool(self.resolution and self.resolution.startswith("short="))

    # ---- to be provided by subclasses -------------------------------------------------
    @classmethod
    def image_processor_class(cls) -> type:
        raise NotImplementedError

    def decoder_layers(self) -> list[torch.nn.Module]:
        """The encoder's transformer blocks, in order."""
        raise NotImplementedError

    # ---- processors ---------------------------------------------------------------------
    @classmethod
    def whole_image_processor(cls, hw: tuple[int, int], resample: Any, mean: Any, std: Any) -> Any:
        return cls.image_processor_class()(size={"height": hw[0], "width": hw[1]}, do_center_crop=False,
                                           resample=resample, image_mean=list(mean), image_std=list(std),
                                           do_convert_rgb=True)

    @classmethod
    def build_processor(cls, config: Any, tiny: bool = False) -> Any:
        side = cls.preset_side(config, tiny)
        return cls.whole_image_processor((side, side), cls.resample, cls.mean, cls.std)

    @classmethod
    def preset_side(cls, config: Any, tiny: bool) -> int:
        """Input side of a preset built in code (default: the config's image size)."""
        return int(config.image_size)

    @classmethod
    def load_processor(cls, checkpoint: str, revision: str | None) -> Any:
        """The checkpoint's own image processor constants, without its centre crop."""
        from transformers import AutoImageProcessor

        saved = AutoImageProcessor.from_pretrained(checkpoint, revision=revision)
        return cls.whole_image_processor(input_hw(saved), saved.resample, saved.image_mean, saved.image_std)

    @classmethod
    def processor_problem(cls, processor: Any) -> str:
        return ""

    # ---- the model ----------------------------------------------------------------------
    @property
    def text_config(self) -> Any:
        return self.model.config  # the vision config: there is no text model

    @property
    def n_kv_heads(self) -> int:
        return 1

    @property
    def head_dim(self) -> int:
        return int(self.model.config.hidden_size)

    def accelerate(self) -> list[str]:
        return []  # the encoder's own kernels (the decoder fusions are for language models)

    def language_model(self) -> torch.nn.Module:
        raise ModelError(f"{self.source.get('name')} is a vision encoder; it has no language model")

    def check_options(self, kinds: tuple[str, ...], *, prefix: str, keys: str | None) -> None:
        name = self.source.get("name")
        other = [k for k in kinds if k not in self.kinds]
        if other:
            raise UsageError(f"--kinds {','.join(other)}: {name} is a vision encoder and stores "
                             f"{' and '.join(self.kinds)} only (keys and values come from an MLM)")
        if prefix:
            raise UsageError(f"--prefix needs an MLM: {name} is a vision encoder and reads no text")
        if keys is not None:
            raise UsageError(f"--keys needs an MLM: {name} is a vision encoder and stores no keys")

    def gather(self, batch: Batch, sel: Any, dtype: str = "float32") -> tuple[dict[str, torch.Tensor], list[int]]:
        """One forward pass per input size in the batch (one for a fixed resolution)."""
        sizes = batch.inputs.get("image_hw")
        if sizes is None:
            return gather_hidden(self, batch, sel, dtype)
        pixels = batch.inputs["pixel_values"]
        pieces: dict[int, torch.Tensor] = {}
        for hw in sorted({tuple(int(v) for v in row) for row in sizes.tolist()}):
            idx = [i for i, row in enumerate(sizes.tolist()) if tuple(row) == hw]
            sub = Batch({"pixel_values": pixels[idx, :, :hw[0], :hw[1]], **self._interpolate(hw)},
                        [batch.layouts[i] for i in idx], [batch.prefix_ids[i] for i in idx])
            arrays, counts = gather_hidden(self, sub, sel, dtype)
            for kind, arr in arrays.items():  # the token axis is second to last in every kind
                for i, part in zip(idx, arr.split(counts, dim=-2)):
                    pieces[(kind, i)] = part
        kinds = sorted({kind for kind, _ in pieces})
        order = {kind: [pieces[(kind, i)] for i in range(len(batch.layouts))] for kind in kinds}
        return ({kind: torch.cat(parts, dim=-2) for kind, parts in order.items()},
                [int(p.shape[-2]) for p in order[kinds[0]]])

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """[N, width] final states -> [N, dim] embeddings in the encoder's image-text space
        (post_proj); only encoders with a text tower (SigLIP) have one."""
        raise ModelError(f"{self.source.get('name')} has no image-text head; it stores {HIDDEN} only")

    def _interpolate(self, hw: tuple[int, int]) -> dict[str, Any]:
        size = self.model.config.image_size
        return {"interpolate_pos_encoding": True} if self.interpolate_flag and hw != (size, size) else {}

    def input_meta(self, prefix: str, template: str, keys_rope: str) -> dict[str, Any]:
        return {"template": "none", "prefix": "", "prefix_token_ids": (), "image_token_id": -1, "keys_rope": "none"}

    def preprocess(self, images: list[Image.Image], prefix: str = "", template: str = "chat") -> Batch:
        """Pixel values through the image processor; the layout is the patch grid after the
        ``prefix_tokens`` leading tokens (no text: ``prefix`` and ``template`` do not apply)."""
        config = self.model.config  # config only: a preprocessor() copy has no weights
        if self.short_side:
            return self._preprocess_own_sizes(images)
        pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
        rows, cols = int(pixels.shape[-2]) // config.patch_size, int(pixels.shape[-1]) // config.patch_size
        inputs: dict[str, Any] = {"pixel_values": pixels}
        if self.interpolate_flag and tuple(pixels.shape[-2:]) != (config.image_size, config.image_size):
            inputs["interpolate_pos_encoding"] = True
        positions = torch.arange(self.prefix_tokens, self.prefix_tokens + rows * cols)
        layout = TokenLayout(positions, (Segment("base", 0, rows, cols),))
        return Batch(inputs, [layout] * len(images), [[] for _ in images])

    def _preprocess_own_sizes(self, images: list[Image.Image]) -> Batch:
        """``short=N/M``: each image resized to its own size (``resolved_hw``), zero-padded to the
        batch's largest; ``image_hw`` says each one's size, so ``gather`` crops the padding off."""
        patch = self.model.config.patch_size
        hws = [resolved_hw(self.resolution, im.height, im.width) for im in images]
        singles = [self.processor(images=[im], size={"height": h, "width": w}, return_tensors="pt")["pixel_values"][0]
                   for im, (h, w) in zip(images, hws)]
        pixels = torch.zeros((len(images), 3, max(h for h, _ in hws), max(w for _, w in hws)))
        layouts = []
        for i, (px, (h, w)) in enumerate(zip(singles, hws)):
            pixels[i, :, :h, :w] = px
            rows, cols = h // patch, w // patch
            positions = torch.arange(self.prefix_tokens, self.prefix_tokens + rows * cols)
            layouts.append(TokenLayout(positions, (Segment("base", 0, rows, cols),)))
        inputs = {"pixel_values": pixels, "image_hw": torch.tensor(hws, dtype=torch.int64)}
        return Batch(inputs, layouts, [[] for _ in images])

    def text_batch(self, texts: list[str], template: str = "chat") -> tuple[dict[str, Any], list[int]]:
        raise ModelError(f"{self.source.get('name')} is a vision encoder; it has no text model for text queries")
