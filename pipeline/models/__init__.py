"""Model adapters: one file per MLM family, looked up by name in ``MODELS``."""

from kvpipe.pipeline.models import llava_next, llava_ov, qwen2vl, qwen25vl  # noqa: F401  (register)
from kvpipe.pipeline.models import clip, dino, dinov2, siglip  # noqa: F401  (vision-encoder baselines)
from kvpipe.pipeline.models.base import MODELS, Batch, ModelAdapter, Segment, TokenLayout
from kvpipe.pipeline.models.loading import load_model

__all__ = ["MODELS", "Batch", "ModelAdapter", "Segment", "TokenLayout", "load_model"]
