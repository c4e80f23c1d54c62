"""The feature-set metadata: one frozen dataclass, written as JSON into the root group.

Why: a store must describe itself completely (model, revision, template, token ids before the
image, which layers/heads/kinds, key RoPE convention, encoding), so anyone can recompute any
stored vector, and old code must refuse a newer layout clearly instead of misreading it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from kvpipe.errors import StoreError

SCHEMA_VERSION = 1
HIDDEN = "hidden"  # a vision encoder's block outputs: one "head" as wide as the encoder
KINDS = ("keys", "values", HIDDEN)  # per (layer, kv_head) token features [layer, head, token, dim]
POST_PROJ = "post_proj"  # visual features after the projector, as fed to the LM
ALL_KINDS = (*KINDS, POST_PROJ)
KEY_ROPE = ("post-rope", "pre-rope")
STORE_DTYPES = ("float32", "float16", "bfloat16", "int8")  # int8: lossy, a scale per token
META_ATTR = "kvpipe"


@dataclass(frozen=True)
class FeatureSetMeta:
    """Everything that defines one extraction (model, dataset, options) and how it is encoded."""

    model: dict[str, Any]  # name, checkpoint, revision, commit, init, seed, family
    dataset: dict[str, Any]  # the adapter's describe()
    layers: tuple[int, ...]  # model layer indices stored, ascending
    heads: tuple[int, ...]  # KV head indices stored, ascending
    kinds: tuple[str, ...]  # subset of ALL_KINDS
    keys_rope: str  # "post-rope" (as cached, what text queries see) or "pre-rope" (k_proj output);
    #                 "none" for a vision encoder's store (no keys)
    n_layers: int  # of the model
    n_kv_heads: int
    head_dim: int
    hidden_size: int
    compute_dtype: str
    store_dtype: str
    template: str  # "chat" or "none"
    prefix: str  # the text before every image ("" when none, or when each image has its own)
    prefix_token_ids: tuple[int, ...]  # every token id before the first image token; with per-image
    #                                    prefixes (prefix_choice), the template's alone (prefix "")
    image_token_id: int
    part_size: int
    n_images: int
    image_ids_sha256: str  # fingerprint of the dataset's ordered image ids
    text_queries: tuple[str, ...] = ()
    compressor: dict[str, Any] = field(default_factory=dict)
    # per-image prefixes (kvpipe extract --prefix-from / --prefix-control): {"source", "control",
    # "seed"}; each image's text is its manifest row's meta["prefix"]. {}: none (older stores too)
    prefix_choice: dict[str, Any] = field(default_factory=dict)
    command: str = ""
    kvpipe_version: str = ""
    schema_version: int = SCHEMA_VERSION

    # Fields that may differ between two runs writing the same feature set.
    _PROVENANCE = ("command", "kvpipe_version")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "store") -> "FeatureSetMeta":
        version = data.get("schema_version")
        if not isinstance(version, int):
            raise StoreError(f"{where} has no kvpipe schema version; it is not a kvpipe feature store")
        if version > SCHEMA_VERSION:
            raise StoreError(f"{where} uses store schema {version}, newer than this kvpipe "
                             f"({SCHEMA_VERSION}); upgrade kvpipe to read it")
        names = {f.name for f in dataclasses.fields(cls)}
        missing = names - set(data) - {"text_queries", "compressor", "prefix_choice", "command", "kvpipe_version"}
        if missing:
            raise StoreError(f"{where} metadata lacks {', '.join(sorted(missing))}; the store is damaged")
        kw = {k: v for k, v in data.items() if k in names}
        for k in ("layers", "heads", "kinds", "prefix_token_ids", "text_queries"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume into this store."""
        d = self.to_dict()
        for k in self._PROVENANCE:
            d.pop(k, None)
        if not d.get("prefix_choice"):
            d.pop("prefix_choice", None)  # stores without per-image prefixes keep their fingerprint
        return d

    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]

    def layer_index(self, layer: int) -> int:
        try:
            return self.layers.index(layer)
        except ValueError:
            raise StoreError(f"layer {layer} is not in this store (stored: {list(self.layers)})") from None

    def head_index(self, head: int) -> int:
        try:
            return self.heads.index(head)
        except ValueError:
            raise StoreError(f"KV head {head} is not in this store (stored: {list(self.heads)})") from None


def ids_fingerprint(image_ids: list[str]) -> str:
    return hashlib.sha256("\n".join(image_ids).encode()).hexdigest()


def structure_fingerprint(structure: dict[str, Any]) -> str:
    """Hash of the dataset-level annotations, so a changed pair list is another feature set."""
    return hashlib.sha256(json.dumps(structure, sort_keys=True).encode()).hexdigest()
