"""Resolve ``--model`` (registry name, hub id or local directory) into a ready adapter.

Why one function: the CLI, the benchmarks and the tests all load models the same way, and
every failure (unknown name, missing directory, unsupported family, offline hub) must become
one clear line instead of a traceback from deep inside transformers.
"""

from __future__ import annotations

from typing import Any

import torch

from kvpipe.device import resolve_device
from kvpipe.errors import ModelError, UsageError
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.models.catalog import MODELS, ModelEntry, model_source
from kvpipe.pipeline.models.options import check_init, dtype_name

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    name = dtype_name(name)
    if name == "auto":
        raise UsageError("--dtype auto must be resolved for a device first (resolve_dtype)")
    return DTYPES[name]


def resolve_dtype(spec: str, device: str) -> str:
    """``--dtype auto``: bfloat16 on a GPU, float32 on a CPU (what each runs fast and exactly)."""
    name = dtype_name(spec)
    if name == "auto":
        return "bfloat16" if str(device).startswith("cuda") else "float32"
    return name


def adapter_for_model_type(model_type: str) -> type[ModelAdapter]:
    for _, entry in MODELS.items():
        if model_type in entry.adapter.model_types:
            return entry.adapter
    known = sorted({t for _, e in MODELS.items() for t in e.adapter.model_types})
    raise ModelError(f"model type {model_type!r} is not supported; kvpipe knows {', '.join(known)}")


IMAGE_TOKENS = ("<image>", "<image_soft_token>", "<IMG_CONTEXT>")  # LLaVA / SmolVLM, Gemma 3, InternVL
OFFLINE_TOKEN_ATTRS = {"image_token_index": IMAGE_TOKENS, "image_token_id": IMAGE_TOKENS,
                       "video_token_index": ("<video>",), "boi_token_index": ("<start_of_image>",),
                       "eoi_token_index": ("<end_of_image>",)}


def align_offline_token_ids(config: Any, tokenizer: Any) -> None:
    """A random model runs with the offline tokenizer, so its image/video token ids must be
    that tokenizer's (the presets carry the real checkpoints' ids, e.g. 151646 for <image>)."""
    vocab = tokenizer.get_vocab()
    for attr, tokens in OFFLINE_TOKEN_ATTRS.items():
        token = next((t for t in tokens if t in vocab), None)
        if hasattr(config, attr) and token is not None:
            setattr(config, attr, vocab[token])


def _random_model(entry: ModelEntry, config: Any, dtype: torch.dtype, seed: int,
                  device: str = "cpu") -> torch.nn.Module:
    """Tiny presets are built on the CPU (same weights on every machine); full-size random
    models are built where they will run, since initialising 8B parameters on a CPU takes minutes."""
    torch.manual_seed(seed)
    cls = entry.adapter.model_class()
    try:
        build_on = torch.device("cpu" if entry.tiny else device)
    except RuntimeError as err:
        raise UsageError(f"--device {device}: {_first_line(err)}") from None
    with build_on:
        model = cls._from_config(config, dtype=dtype)
    if entry.tiny:  # tiny models: a larger init scale so features differ visibly across inputs
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.08)
    return model


def load_model(name_or_path: str, *, dtype: str = "auto", device: str = "auto",
               init: str = "pretrained", revision: str | None = None, seed: int = 0) -> ModelAdapter:
    """Build the adapter for a registry name, a local checkpoint directory or a hub id.

    ``device``/``dtype`` "auto": the first GPU in bfloat16 when there is one, else the CPU in float32."""
    check_init(init)
    device = resolve_device(device)
    torch_dtype = parse_dtype(resolve_dtype(dtype, device))
    where, target = model_source(name_or_path, init)
    if where == "registry":
        entry = MODELS.get(name_or_path)
        if entry.tiny or init == "random":
            if revision:
                raise UsageError(f"--revision makes no sense with {'a tiny preset' if entry.tiny else '--init random'}")
            config = entry.preset()
            processor = entry.adapter.build_processor(config, tiny=entry.tiny)
            if hasattr(processor, "tokenizer"):  # a vision encoder's processor has none
                align_offline_token_ids(config, processor.tokenizer)
            model = _random_model(entry, config, torch_dtype, seed, device)
            source = {"name": name_or_path, "checkpoint": None, "revision": None,
                      "init": "random", "seed": seed, "family": entry.adapter.family}
            return _finish(entry.adapter, model, processor, source, device)
        return _from_pretrained(entry.checkpoint or name_or_path, name_or_path, torch_dtype, device, revision)
    generic = where.startswith("any-")
    return _from_pretrained(target, name_or_path, torch_dtype, device, revision, local=where.endswith("local"),
                            generic=generic)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


def _from_pretrained(checkpoint: str, name: str, dtype: torch.dtype, device: str,
                     revision: str | None, local: bool = False, generic: bool = False) -> ModelAdapter:
    from transformers import AutoConfig

    hint = ("is it a saved checkpoint directory (save_pretrained of the model and its processor)?" if local
            else "offline? set HF_HUB_OFFLINE=1 and pass a local checkpoint directory")
    try:
        config = AutoConfig.from_pretrained(checkpoint, revision=revision)
    except Exception as err:  # OSError for offline / missing repo, ValueError for bad configs
        raise ModelError(f"cannot load the config of --model {checkpoint}: {_first_line(err)} ({hint})") from None
    if generic:  # any:TARGET: the generic adapter, or one line saying why it cannot serve this architecture
        from kvpipe.pipeline.models.generic import GenericAdapter, refusal

        why = refusal(config)
        if why:
            raise ModelError(f"--model {name}: {why}")
        adapter_cls: type[ModelAdapter] = GenericAdapter
    else:
        adapter_cls = adapter_for_model_type(config.model_type)
    try:
        model = adapter_cls.model_class().from_pretrained(checkpoint, revision=revision, dtype=dtype)
        processor = adapter_cls.load_processor(checkpoint, revision)
    except Exception as err:
        raise ModelError(f"cannot load --model {checkpoint}: {_first_line(err)}") from None
    problem = adapter_cls.processor_problem(processor)
    if problem:
        raise ModelError(f"--model {name} {problem}")
    source = {"name": name, "checkpoint": checkpoint, "revision": revision, "init": "pretrained",
              "family": adapter_cls.family, "commit": getattr(config, "_commit_hash", None)}
    return _finish(adapter_cls, model, processor, source, device)


def _finish(adapter_cls: type[ModelAdapter], model: Any, processor: Any, source: dict[str, Any],
            device: str) -> ModelAdapter:
    try:
        model = model.to(device)
    except (RuntimeError, AssertionError) as err:
        raise UsageError(f"--device {device}: {_first_line(err)}") from None
    return adapter_cls(model, processor, source)
