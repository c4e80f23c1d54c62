"""The paper's early / middle / late split of 28 layers (8 / 10 / 10) is the one `intervene` uses.

``kvpipe intervene --layers late`` calls ``knockout_condition`` with the store's layer count; the
28-layer checkpoints of the paper (LLaVA-OneVision 7B, Qwen2.5-VL 7B) must get layers 18-27, and the
head sets must come from those layers only.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvpipe.pipeline.evaluation.intervene import knockout_condition
from kvpipe.pipeline.models.catalog import MODELS
from kvpipe.probes.input_agnostic import FLAG, THRESHOLD_PREFIX, VARIANCE

N_LAYERS, N_KV_HEADS = 28, 4
# input-agnostic heads (variance below the threshold 450): one in every layer, head = layer % 4
AGNOSTIC = {(layer, layer % N_KV_HEADS) for layer in range(N_LAYERS)}


def variance_table(path):
    rows = []
    for layer in range(N_LAYERS):
        for head in range(N_KV_HEADS):
            value = 200.0 if (layer, head) in AGNOSTIC else 600.0
            common = {"model": "m", "dataset": "coco", "task": "input-agnostic", "layer": layer, "head": head,
                      "kind": "keys"}
            rows += [{**common, "metric": VARIANCE, "value": value},
                     {**common, "metric": FLAG, "value": float(value < 450.0)}]
    rows.append({"model": "m", "dataset": "coco", "task": "input-agnostic", "layer": -1, "head": -1, "kind": "keys",
                 "metric": THRESHOLD_PREFIX + "valley", "value": 450.0})
    pq.write_table(pa.Table.from_pylist(rows), path)
    return path


@pytest.mark.parametrize("model", ["llava-ov", "qwen25vl"])
def test_the_papers_checkpoints_have_28_layers_and_4_kv_heads(model):
    text = MODELS.get(model).preset().get_text_config()
    assert (text.num_hidden_layers, text.num_key_value_heads) == (N_LAYERS, N_KV_HEADS)


@pytest.mark.parametrize("spec, first, count", [("early", 0, 8), ("middle", 8, 10), ("late", 18, 10)])
def test_intervene_layers_are_8_10_10_of_28(tmp_path, spec, first, count):
    table = variance_table(tmp_path / "results.parquet")
    cond = knockout_condition(table, heads="input-agnostic", layers=spec, n_layers=N_LAYERS, n_kv_heads=N_KV_HEADS)
    assert cond.details["layer_list"] == list(range(first, first + count))
    assert cond.heads == frozenset((layer, layer % N_KV_HEADS) for layer in range(first, first + count))
    assert cond.name == f"input-agnostic-{spec}"


def test_late_controls_stay_in_the_late_layers(tmp_path):
    table = variance_table(tmp_path / "results.parquet")
    for heads in ("input-dependent", "random"):
        cond = knockout_condition(table, heads=heads, layers="late", n_layers=N_LAYERS, n_kv_heads=N_KV_HEADS,
                                  control_seed=3)
        assert sorted(layer for layer, _ in cond.heads) == list(range(18, 28))  # one per late layer, as the treatment
        assert cond.details["treatment_heads"] == 10
