"""The model catalog: every ``--model`` name as data (adapter, checkpoint, config preset).

Why data: ``kvpipe models`` and every usage error list these names without importing torch or
transformers; an entry's adapter class and config preset are imported when the model is
loaded. Adding a family = one adapter file + its entries here (timm's ``_pretrained`` style).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Literal

from kvpipe.errors import UsageError
from kvpipe.registry import Registry, import_target

_PKG = "kvpipe.pipeline.models"


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: which adapter, which checkpoint, which config preset for random init.

    ``adapter`` and ``preset`` are ``"module:attr"`` inside kvpipe.pipeline.models."""

    adapter_path: str
    checkpoint: str | None  # default hub id; None for tiny presets (always built in code)
    preset_path: str  # a function returning the transformers config for init="random"
    description: str = ""
    tiny: bool = False
    preset_args: tuple[Any, ...] = ()
    # The architecture at a glance, written here as data so that listing imports no model code
    # (tests/models/test_catalog_shapes.py checks them against the preset config and processor):
    tokens_448: int | None = None  # image tokens of one 448 x 448 image (every view, tile and newline)
    layers: int | None = None  # decoder layers (an encoder's blocks)
    kv_heads: int | None = None  # KV heads per layer (1 for an encoder's "hidden" kind)
    # a vision encoder's input resolution (RESOLUTIONS below): what the paper's baseline used
    resolution: str | None = None

    @property
    def adapter_module(self) -> str:
        """The adapter's module (its family file), e.g. ``qwen25vl``; imports nothing."""
        return self.adapter_path.partition(":")[0]

    @property
    def adapter(self) -> Any:
        """The adapter class (imported now)."""
        return import_target(f"{_PKG}.{self.adapter_path}")

    def preset(self) -> Any:
        """The transformers config of the full-size (or tiny) architecture."""
        return import_target(f"{_PKG}.{self.preset_path}")(*self.preset_args)


MODELS: Registry[ModelEntry] = Registry("model", "--model")

Source = Literal["registry", "local", "hub", "any-local", "any-hub"]
ANY = "any:"  # --model any:HUB_ID_OR_DIR: the generic adapter (pipeline/models/generic.py)


def model_source(name_or_path: str, init: str = "pretrained") -> tuple[Source, str]:
    """Where ``--model`` points, decided without importing model code: ("registry", name),
    ("local", directory) or ("hub", "org/name"), or for ``any:TARGET`` ("any-local", directory)
    or ("any-hub", "org/name"); a one-line UsageError for a misspelt name, a missing directory,
    or --init random without a registry name."""
    if name_or_path in MODELS:
        return "registry", name_or_path
    if name_or_path.startswith(ANY):
        target = name_or_path[len(ANY):]
        if init == "random":
            raise UsageError(f"--init random needs a registry name, not {name_or_path!r} (the generic adapter "
                             f"loads a saved checkpoint)")
        path = os.path.expanduser(target)
        if _looks_local(path):
            if not os.path.isdir(path):
                raise UsageError(f"--model {name_or_path}: no such directory")
            return "any-local", path
        if target.count("/") != 1:
            raise UsageError(f"--model {name_or_path}: after 'any:' give a hub id (org/name) or a checkpoint directory")
        return "any-hub", target
    if init == "random":
        raise UsageError(f"--init random needs a registry name (one of {', '.join(MODELS.names())}), "
                         f"not {name_or_path!r}")
    path = os.path.expanduser(name_or_path)
    if "/" not in path and not os.path.exists(path):  # hub ids are "org/name": this is a mistyped name
        MODELS.get(name_or_path)  # raises "unknown model ..., known: ..."
    if _looks_local(path):
        if not os.path.isdir(path):
            raise UsageError(f"--model {name_or_path}: no such directory; give a registry name "
                             f"({', '.join(MODELS.names())}), a hub id or a checkpoint directory")
        return "local", path
    return "hub", name_or_path


def _looks_local(path: str) -> bool:
    """A path, not a hub id ("org/name"): it exists, is explicitly relative/absolute, or is nested deeper."""
    return (os.path.exists(path) or path.startswith((".", "/")) or path.count("/") > 1
            or (os.sep != "/" and os.sep in path))


def resolved_hw(resolution: str, height: int, width: int) -> tuple[int, int]:
    """The (height, width) an encoder of ``resolution`` is fed for an image of that size.

    ``"HxW"``: every image resized whole to H x W. ``"short=N/M"``: the short side to N, the long
    side to N x long / short floored to a multiple of M -- DINO's ``read_frame`` in
    facebookresearch/dino ``eval_video_segmentation.py`` (N = 480, M = 64: an 854 x 480 DAVIS
    frame becomes 832 x 480, 104 x 60 patches of 8 px)."""
    if resolution.startswith("short="):
        n, _, m = resolution[len("short="):].partition("/")
        short, multiple = int(n), int(m or 1)
        if height > width:
            return int(short * height / width // multiple * multiple), short
        return short, int(short * width / height // multiple * multiple)
    h, _, w = resolution.partition("x")
    return int(h), int(w)


def check_resolution(resolution: str) -> str:
    """A one-line UsageError unless ``resolution`` is "HxW" or "short=N/M" (positive integers)."""
    try:
        if resolution.startswith("short="):
            n, sep, m = resolution[len("short="):].partition("/")
            ok = int(n) > 0 and int(m) > 0 and bool(sep)
        else:
            h, sep, w = resolution.partition("x")
            ok = int(h) > 0 and int(w) > 0 and bool(sep)
    except ValueError:
        ok = False
    if not ok:
        raise UsageError(f"resolution {resolution!r} must be HxW (e.g. 384x384) or short=N/M (e.g. short=480/64)")
    return resolution


def _add(name: str, adapter: str, checkpoint: str | None, preset: str, description: str, *preset_args: Any,
         tiny: bool = False, shape: tuple[int, int, int] | None = None, resolution: str | None = None) -> None:
    """``shape``: (image tokens of a 448 x 448 image, layers, KV heads); ``resolution``: an encoder's input."""
    tokens, layers, kv_heads = shape or (None, None, None)
    MODELS.add(name, ModelEntry(adapter, checkpoint, preset, description, tiny, tuple(preset_args),
                                tokens, layers, kv_heads, resolution and check_resolution(resolution)))


def _family(name: str, label: str, adapter: str, checkpoint: str, preset: str, shape: tuple[int, int, int],
            size: str, tiny_shape: tuple[int, int, int]) -> None:
    """A family's default checkpoint ``name`` (its full-size preset ``preset`` in the adapter's module)
    and its tiny preset ``tiny-NAME`` (``tiny_NAME_config`` there); ``label`` names the family."""
    module = adapter.partition(":")[0]
    _add(name, adapter, checkpoint, f"{module}:{preset}", f"{label} {size}", shape=shape)
    _add(f"tiny-{name}", adapter, None, f"{module}:tiny_{name}_config", f"2-layer random {label} for tests",
         tiny=True, shape=tiny_shape)


# MLMs
_add("qwen25vl", "qwen25vl:Qwen25VLAdapter", "Qwen/Qwen2.5-VL-7B-Instruct", "qwen25vl:qwen25vl_7b_config",
     "Qwen2.5-VL 7B Instruct", shape=(256, 28, 4))
_add("tiny-qwen25vl", "qwen25vl:Qwen25VLAdapter", None, "qwen25vl:tiny_qwen25vl_config",
     "2-layer random Qwen2.5-VL for tests and the demo", tiny=True, shape=(256, 2, 2))
_add("qwen2vl", "qwen2vl:Qwen2VLAdapter", "Qwen/Qwen2-VL-7B-Instruct", "qwen2vl:qwen2vl_7b_config",
     "Qwen2-VL 7B Instruct", shape=(256, 28, 4))
_add("tiny-qwen2vl", "qwen2vl:Qwen2VLAdapter", None, "qwen2vl:tiny_qwen2vl_config",
     "2-layer random Qwen2-VL for tests and the demo", tiny=True, shape=(256, 2, 2))
_add("llava-ov", "llava_ov:LlavaOnevisionAdapter", "llava-hf/llava-onevision-qwen2-7b-ov-hf",
     "llava_ov:llava_ov_7b_config", "LLaVA-OneVision Qwen2 7B (ov)", shape=(3699, 28, 4))
_add("llava-ov-0.5b", "llava_ov:LlavaOnevisionAdapter", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
     "llava_ov:llava_ov_05b_config", "LLaVA-OneVision Qwen2 0.5B (ov)", shape=(3699, 24, 2))
_add("llava-ov-72b", "llava_ov:LlavaOnevisionAdapter", "llava-hf/llava-onevision-qwen2-72b-ov-hf",
     "llava_ov:llava_ov_72b_config", "LLaVA-OneVision Qwen2 72B (ov)", shape=(3699, 80, 8))
_add("tiny-llava-ov", "llava_ov:LlavaOnevisionAdapter", None, "llava_ov:tiny_llava_ov_config",
     "2-layer random LLaVA-OneVision (Qwen2, SigLIP) for tests", tiny=True, shape=(88, 2, 2))
_add("llava-next-llama3", "llava_next:LlavaNextAdapter", "llava-hf/llama3-llava-next-8b-hf",
     "llava_next:llama3_llava_next_8b_config", "LLaVA-NeXT (LLaVA-1.6) Llama-3 8B", shape=(2928, 32, 8))
_add("tiny-llava-next-llama3", "llava_next:LlavaNextAdapter", None, "llava_next:tiny_llava_next_config",
     "2-layer random LLaVA-NeXT (Llama-3, CLIP) for tests", tiny=True, shape=(88, 2, 2))
_family("llava15", "LLaVA-1.5", "llava15:Llava15Adapter", "llava-hf/llava-1.5-7b-hf", "llava15_7b_config",
        (576, 32, 32), "7B (Vicuna, CLIP ViT-L/14-336)", (16, 2, 4))
_family("qwen3vl", "Qwen3-VL", "qwen3vl:Qwen3VLAdapter", "Qwen/Qwen3-VL-8B-Instruct", "qwen3vl_8b_config",
        (196, 36, 8), "8B Instruct (DeepStack, interleaved MRoPE)", (196, 2, 2))
_family("gemma3", "Gemma 3", "gemma3:Gemma3Adapter", "google/gemma-3-4b-it", "gemma3_4b_config",
        (256, 34, 4), "4B it (SigLIP 896 px, bidirectional image attention)", (16, 2, 2))
_family("smolvlm2", "SmolVLM2", "smolvlm:SmolVLMAdapter", "HuggingFaceTB/SmolVLM2-2.2B-Instruct", "smolvlm2_22b_config",
        (1377, 24, 32), "2.2B Instruct (Idefics3 architecture: tiles + global view)", (272, 2, 4))
_family("internvl3", "InternVL3", "internvl:InternVLAdapter", "OpenGVLab/InternVL3-8B-hf", "internvl3_8b_config",
        (256, 28, 4), "8B (-hf format; tiles + thumbnail)", (160, 2, 2))
# Vision encoders (the paper's baselines): they store the "hidden" kind. ``resolution``: the input
# the paper's number comes from (docs/PROTOCOLS.md "Vision-encoder baselines" says why each).
_add("siglip", "siglip:SiglipEncoderAdapter", "google/siglip-so400m-patch14-384", "siglip:siglip_so400m_384_config",
     "SigLIP so400m/14 at 384 px, vision tower (LLaVA-OneVision's, before MLM fine-tuning)", shape=(729, 27, 1),
     resolution="384x384")
_add("tiny-siglip", "siglip:SiglipEncoderAdapter", None, "siglip:tiny_siglip_config",
     "2-block random SigLIP vision tower for tests", tiny=True, shape=(16, 2, 1), resolution="56x56")
_add("clip-vit-l14", "clip:ClipEncoderAdapter", "openai/clip-vit-large-patch14", "clip:clip_vit_l14_config",
     "CLIP ViT-L/14 at 224 px, vision tower", shape=(256, 24, 1), resolution="224x224")
_add("clip-vit-l14-336", "clip:ClipEncoderAdapter", "openai/clip-vit-large-patch14-336", "clip:clip_vit_l14_config",
     "CLIP ViT-L/14 at 336 px, vision tower", 336, shape=(576, 24, 1), resolution="336x336")
_add("tiny-clip", "clip:ClipEncoderAdapter", None, "clip:tiny_clip_config",
     "2-block random CLIP vision tower for tests", tiny=True, shape=(16, 2, 1), resolution="56x56")
_add("dino-vitb16", "dino:VitEncoderAdapter", "facebook/dino-vitb16", "dino:dino_vitb16_config",
     "DINO ViT-B/16 at 224 px", shape=(196, 12, 1), resolution="224x224")
_add("dino-vitb8", "dino:VitEncoderAdapter", "facebook/dino-vitb8", "dino:dino_vitb8_config",
     "DINO ViT-B/8 at 480p (short side 480, DINO's DAVIS protocol; Table 2's DINO row)", shape=(3360, 12, 1),
     resolution="short=480/64")
_add("dino-vitb8-224", "dino:VitEncoderAdapter", "facebook/dino-vitb8", "dino:dino_vitb8_config",
     "DINO ViT-B/8 at 224 px (the checkpoint's own input size)", shape=(784, 12, 1), resolution="224x224")
_add("tiny-dino", "dino:VitEncoderAdapter", None, "dino:tiny_dino_config",
     "2-block random ViT (DINO architecture) for tests", tiny=True, shape=(16, 2, 1), resolution="64x64")
_add("tiny-dino-vitb8", "dino:VitEncoderAdapter", None, "dino:tiny_dino_vitb8_config",
     "2-block random ViT/8 at short side 32 (dino-vitb8's 480p rule, scaled down) for tests", tiny=True,
     shape=(16, 2, 1), resolution="short=32/16")
_add("dinov2-base", "dinov2:Dinov2EncoderAdapter", "facebook/dinov2-base", "dinov2:dinov2_config",
     "DINOv2 ViT-B/14 at 224 px", 768, 12, 12, shape=(256, 12, 1), resolution="224x224")
_add("dinov2-large", "dinov2:Dinov2EncoderAdapter", "facebook/dinov2-large", "dinov2:dinov2_config",
     "DINOv2 ViT-L/14 at 224 px", 1024, 24, 16, shape=(256, 24, 1), resolution="224x224")
_add("tiny-dinov2", "dinov2:Dinov2EncoderAdapter", None, "dinov2:tiny_dinov2_config",
     "2-block random DINOv2 for tests", tiny=True, shape=(16, 2, 1), resolution="56x56")
