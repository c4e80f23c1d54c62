"""The catalog's shape columns (image tokens of a 448 x 448 image, layers, KV heads) are data written
into pipeline/models/catalog.py so that `kvpipe models` imports no model code; here they are checked
against each entry's config preset and the family's own processor (no weights are built)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kvpipe.pipeline.models import MODELS
from kvpipe.pipeline.models.loading import align_offline_token_ids

NEW_FAMILIES = {"llava15": "llava-hf/llava-1.5-7b-hf", "qwen3vl": "Qwen/Qwen3-VL-8B-Instruct",
                "gemma3": "google/gemma-3-4b-it", "smolvlm2": "HuggingFaceTB/SmolVLM2-2.2B-Instruct",
                "internvl3": "OpenGVLab/InternVL3-8B-hf"}


def measured(name: str) -> tuple[int, int, int]:
    """(tokens of a 448 x 448 image, layers, KV heads) from the preset config and the processor."""
    entry = MODELS.get(name)
    config = entry.preset()
    processor = entry.adapter.build_processor(config, tiny=entry.tiny)
    if hasattr(processor, "tokenizer"):
        align_offline_token_ids(config, processor.tokenizer)
    shell = torch.nn.Module()  # the adapter reads the config only: no weights
    shell.config = config
    adapter = entry.adapter(shell, processor, {"name": name})
    layout = adapter.preprocess([Image.new("RGB", (448, 448))]).layouts[0]
    return layout.n_tokens, adapter.n_layers, adapter.n_kv_heads


@pytest.mark.parametrize("name", MODELS.names())
def test_catalog_shape_columns_match_preset_and_processor(name):
    entry = MODELS.get(name)
    assert (entry.tokens_448, entry.layers, entry.kv_heads) == measured(name)


def test_new_families_are_listed_with_their_checkpoints():
    for name, checkpoint in NEW_FAMILIES.items():
        assert MODELS.get(name).checkpoint == checkpoint
        assert MODELS.get(f"tiny-{name}").tiny


def test_kvpipe_models_lists_the_shape_columns(capsys, monkeypatch):
    import sys

    from kvpipe.cli.app import main

    monkeypatch.setenv("COLUMNS", "250")
    monkeypatch.setattr(sys, "argv", ["kvpipe", "models", "*vl*"])
    try:
        main()
    except SystemExit as done:
        assert not done.code
    out = capsys.readouterr().out
    assert "layers" in out and "KV heads" in out
    row = next(line for line in out.splitlines() if "Qwen/Qwen3-VL-8B-Instruct" in line)
    assert all(f" {v} " in row for v in ("196", "36", "8"))
