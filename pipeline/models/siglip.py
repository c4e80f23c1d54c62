"""SigLIP vision tower on its own: the encoder of LLaVA-OneVision before MLM fine-tuning.

google/siglip-so400m-patch14-384 is a full SigLIP checkpoint (text and vision); the adapter
loads its vision tower (``SiglipVisionModel``) with all 27 blocks (the LLaVA-OV tower keeps
26) and no CLS token: the 27 x 27 patch tokens of a 384 px image are the whole sequence.

Table 1's "SigLIP without MLM FT" cells of the text-grounded tasks need SigLIP's own
image-text space, so the store also holds post_proj: each patch token passed alone through
the attention-pooling head (MaskCLIP's reading for CLIP: attention over a single key is the
identity, leaving the value and output projections, then the head's MLP residual), and the
text queries' post_proj: the text tower's embedding, which pools at the final position of
the 64-token padded text, as SigLIP was trained. The text tower is loaded on first use.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (SiglipImageProcessor, SiglipTextConfig, SiglipTextModel, SiglipVisionConfig,
                          SiglipVisionModel)

from kvpipe.errors import ModelError
from kvpipe.pipeline.models.encoder import BICUBIC, VisionEncoderAdapter
from kvpipe.store.schema import HIDDEN, POST_PROJ


def siglip_so400m_384_config() -> SiglipVisionConfig:
    """google/siglip-so400m-patch14-384's vision config."""
    return SiglipVisionConfig(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                              image_size=384, patch_size=14, hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)


def siglip_so400m_384_text_config() -> SiglipTextConfig:
    """google/siglip-so400m-patch14-384's text config (its joint space is 1152 wide, as the vision head's)."""
    return SiglipTextConfig(vocab_size=32000, hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                            num_attention_heads=16, max_position_embeddings=64, projection_size=1152,
                            hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, pad_token_id=1,
                            bos_token_id=None, eos_token_id=1)


def tiny_siglip_config() -> SiglipVisionConfig:
    """2 blocks, width 32, 56 px -> 4 x 4 patch tokens."""
    return SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=56, patch_size=14)


def tiny_siglip_text_config() -> SiglipTextConfig:
    """2 blocks, width 32, texts padded to 16 tokens; a vocabulary the offline word tokenizer fits in."""
    return SiglipTextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=16, projection_size=32, pad_token_id=1,
                            bos_token_id=None, eos_token_id=1)


TEXT_PRESETS = {"siglip": siglip_so400m_384_text_config, "tiny-siglip": tiny_siglip_text_config}
TINY_INIT_STD = 0.08  # as the loader initialises tiny presets: features differ visibly across inputs


class SiglipEncoderAdapter(VisionEncoderAdapter):
    hf_class = SiglipVisionModel
    family = "siglip"
    model_types = ("siglip", "siglip_vision_model")
    kinds = (HIDDEN, POST_PROJ)
    prefix_tokens = 0  # no CLS token
    mean = std = (0.5, 0.5, 0.5)
    resample = BICUBIC

    def __init__(self, model: torch.nn.Module, processor: Any, source: dict[str, Any]):
        super().__init__(model, processor, source)
        self.source["features"] += (
            f"; {POST_PROJ}: each patch token of the final (post-layernorm) states through the attention-pooling "
            f"head alone (value and output projections, then the head's MLP residual: MaskCLIP-style), and "
            f"the text queries' SigLIP text embeddings (final position of the max_length-padded text)")
        self._text: tuple[torch.nn.Module, Any] | None = None

    @classmethod
    def image_processor_class(cls) -> type:
        return SiglipImageProcessor

    def decoder_layers(self) -> list[Any]:
        return list(self.model.vision_model.encoder.layers) if hasattr(self.model, "vision_model") \
            else list(self.model.encoder.layers)

    @property
    def encodes_queries(self) -> bool:
        return True  # the text tower embeds the queries (post_proj)

    # ---- the image side of the joint space ----------------------------------------------
    def pooling_head(self) -> Any:
        tower = getattr(self.model, "vision_model", self.model)
        head = getattr(tower, "head", None)
        if head is None:
            raise ModelError(f"{self.source.get('name')}: this SigLIP vision tower has no attention-pooling head "
                             f"(vision_use_head is off), so it has no {POST_PROJ}; extract with --kinds {HIDDEN}")
        return head

    def project_patches(self, tokens: torch.Tensor) -> torch.Tensor:
        """Each token alone through the pooling head: one key makes the attention weights 1, so the
        probe's query drops out and the output is out_proj(v_proj(x)), then + mlp(layernorm(.))."""
        head = self.pooling_head()
        attn = head.attention
        width = tokens.shape[-1]
        v = torch.nn.functional.linear(tokens, attn.in_proj_weight[2 * width:], attn.in_proj_bias[2 * width:])
        pooled = attn.out_proj(v)
        return pooled + head.mlp(head.layernorm(pooled))

    # ---- the text side ----------------------------------------------------------------
    def text_tower(self) -> tuple[torch.nn.Module, Any]:
        """(SiglipTextModel, tokenizer) on the vision tower's device and dtype, loaded once."""
        if self._text is None:
            text, tokenizer = self._load_text_tower()
            self._text = (text.to(self.device, next(self.model.parameters()).dtype).eval().requires_grad_(False),
                          tokenizer)
        return self._text

    def _load_text_tower(self) -> tuple[torch.nn.Module, Any]:
        src, name = self.source, self.source.get("name")
        if src.get("init") == "pretrained":
            from transformers import AutoTokenizer

            checkpoint, revision = src.get("checkpoint"), src.get("revision")
            try:
                return (SiglipTextModel.from_pretrained(checkpoint, revision=revision),
                        AutoTokenizer.from_pretrained(checkpoint, revision=revision))
            except Exception as err:
                first = (str(err).strip().splitlines() or [type(err).__name__])[0]
                raise ModelError(f"--model {name}: cannot load SigLIP's text tower and tokenizer from {checkpoint} "
                                 f"({first}); text queries need a full SigLIP checkpoint (text and vision)") from None
        if name not in TEXT_PRESETS:
            raise ModelError(f"--model {name}: no text preset for a random SigLIP; use siglip or tiny-siglip")
        from kvpipe.pipeline.models.tokenizer import build_word_tokenizer

        torch.manual_seed(int(src.get("seed") or 0) + 1)  # not the vision tower's stream
        with torch.device("cpu"):
            text = SiglipTextModel(TEXT_PRESETS[name]())
        if name.startswith("tiny-"):
            with torch.no_grad():
                for p in text.parameters():
                    if p.dim() >= 2:
                        p.normal_(0.0, TINY_INIT_STD)
        return text, build_word_tokenizer([], unk="<unk>", pad="</s>")

    @torch.inference_mode()
    def text_features(self, texts: list[str], sel: Any, template: str) -> tuple[dict[str, torch.Tensor],
                                                                                list[list[int]]]:
        """{"post_proj": [Q, dim]}: SigLIP's text embeddings (``get_text_features``) of the texts padded
        to the tower's length without an attention mask, as SigLIP is trained and used."""
        if POST_PROJ not in sel.kinds:
            return {}, [[] for _ in texts]
        text, tokenizer = self.text_tower()
        length = int(text.config.max_position_embeddings)
        enc = tokenizer(list(texts), padding="max_length", max_length=length, truncation=True, return_tensors="pt")
        ids = enc["input_ids"]
        emb = text(input_ids=ids.to(self.device)).pooler_output.float().cpu()
        if emb.shape[-1] != self.hidden_size:
            raise ModelError(f"--model {self.source.get('name')}: the text embeddings are {emb.shape[-1]} wide, "
                             f"the image embeddings {self.hidden_size}; the checkpoint's towers do not share a space")
        return {POST_PROJ: emb}, ids.tolist()
