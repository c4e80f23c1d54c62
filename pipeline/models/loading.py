"""Resolve ``--model`` (registry name, hub id or local directory) into a ready adapter.

Why one function: the CLI, the benchmarks and the tests all load models the same way, and
every failure (unknown name, missing directory, unsupported family, offline hub) must become
one clear line instead of a traceback from deep inside transformers.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.base import MODELS, ModelAdapter, ModelEntry

INITS = ("pretrained", "random")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}, not {name!r}") from None


def adapter_for_model_type(model_type: str) -> type[ModelAdapter]:
    for _, entry in MODELS.items():
        if model_type in entry.adapter.model_types:
            return entry.adapter
    known = sorted({t for _, e in MODELS.items() for t in e.adapter.model_types})
    raise ModelError(f"model type {model_type!r} is not supported; kvpipe knows {', '.join(known)}")


def _random_model(entry: ModelEntry, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    config = entry.preset()
    torch.manual_seed(seed)
    cls = entry.adapter.model_class()
    with torch.device("cpu"):
        model = cls._from_config(config, dtype=dtype)
    if entry.tiny:  # tiny models: a larger init scale so features differ visibly across inputs
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    return model


def load_model(name_or_path: str, *, dtype: str = "float32", device: str = "cpu",
               init: str = "pretrained", revision: str | None = None, seed: int = 0) -> ModelAdapter:
    """Build the adapter for a registry name, a local checkpoint directory or a hub id."""
    if init not in INITS:
        raise UsageError(f"--init must be one of {', '.join(INITS)}, not {init!r}")
    torch_dtype = parse_dtype(dtype)
    if name_or_path in MODELS:
        entry = MODELS.get(name_or_path)
        if entry.tiny or init == "random":
            if revision:
                raise UsageError(f"--revision makes no sense with {'a tiny preset' if entry.tiny else '--init random'}")
            model = _random_model(entry, torch_dtype, seed)
            processor = entry.adapter.build_processor(model.config, tiny=entry.tiny)
            source = {"name": name_or_path, "checkpoint": None, "revision": None,
                      "init": "random", "seed": seed, "family": entry.adapter.family}
            return _finish(entry.adapter, model, processor, source, device)
        return _from_pretrained(entry.checkpoint or name_or_path, name_or_path, torch_dtype, device, revision)
    if init == "random":
        raise UsageError(f"--init random needs a registry name (one of {', '.join(MODELS.names())}), "
                         f"not {name_or_path!r}")
    looks_local = os.path.sep in name_or_path and not name_or_path.count("/") == 1 or os.path.exists(name_or_path)
    if looks_local and not os.path.isdir(name_or_path):
        raise UsageError(f"--model {name_or_path}: no such directory; give a registry name "
                         f"({', '.join(MODELS.names())}), a hub id or a checkpoint directory")
    return _from_pretrained(name_or_path, name_or_path, torch_dtype, device, revision)


def _from_pretrained(checkpoint: str, name: str, dtype: torch.dtype, device: str,
                     revision: str | None) -> ModelAdapter:
    from transformers import AutoConfig, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(checkpoint, revision=revision)
    except Exception as err:  # OSError for offline / missing repo, ValueError for bad configs
        raise ModelError(f"cannot load the config of --model {checkpoint}: {str(err).splitlines()[0]} "
                         f"(offline? set HF_HUB_OFFLINE=1 and pass a local checkpoint directory)") from None
    adapter_cls = adapter_for_model_type(config.model_type)
    try:
        model = adapter_cls.model_class().from_pretrained(checkpoint, revision=revision, dtype=dtype)
        processor = AutoProcessor.from_pretrained(checkpoint, revision=revision)
    except Exception as err:
        raise ModelError(f"cannot load --model {checkpoint}: {str(err).splitlines()[0]}") from None
    source = {"name": name, "checkpoint": checkpoint, "revision": revision, "init": "pretrained",
              "family": adapter_cls.family, "commit": getattr(config, "_commit_hash", None)}
    return _finish(adapter_cls, model, processor, source, device)


def _finish(adapter_cls: type[ModelAdapter], model: Any, processor: Any, source: dict[str, Any],
            device: str) -> ModelAdapter:
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {device}: {str(err).splitlines()[0]}") from None
    return adapter_cls(model, processor, source)
