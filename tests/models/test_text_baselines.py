"""Table 1's post-proj and SigLIP cells of the text-grounded tasks (ImageNet-S, RefCOCO).

Oracles: an MLM's stored text post_proj is its own input-embedding row of each query's final
token; SigLIP's per-patch post_proj is the attention-pooling head applied to one patch, computed
here by hand in float64 from the head's weights, and equal to the model's own head fed that
patch alone; its text post_proj is the text tower's final-position state through its head.
End to end: tiny stores give post_proj rows in semantic-seg and refexp-seg, and `kvpipe paper`
fills Table 1's post-proj and SigLIP cells of ImageNet-S and RefCOCO from them.
"""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.models.capture import Selection, run_capture, run_text_capture
from kvpipe.probes import run_probe
from kvpipe.probes.paper import write_paper
from kvpipe.store import FeatureStore

from fixtures.images import noise_image

TEXTS = ["red dog", "a blue car left of the cat", "person"]


@pytest.mark.parametrize("name", ["tiny-llava-ov", "tiny-qwen25vl"])
def test_text_post_proj_is_the_input_embedding_row_of_the_final_token(name):
    adapter = load_model(name)
    sel = Selection((0, 1), tuple(range(adapter.n_kv_heads)), ("keys", "values", "post_proj"))
    feats, ids = run_text_capture(adapter, TEXTS, sel, "chat")
    table = adapter.model.get_input_embeddings().weight.detach().float()
    assert feats["post_proj"].shape == (len(TEXTS), adapter.hidden_size)
    for q, tokens in enumerate(ids):
        assert torch.equal(feats["post_proj"][q], table[tokens[-1]])
    # the same pass still gives the final-token K/V
    assert feats["values"].shape == (2, adapter.n_kv_heads, len(TEXTS), adapter.head_dim)
    assert not torch.equal(feats["post_proj"][0], feats["post_proj"][1])


def _layer_norm(x: np.ndarray, ln) -> np.ndarray:
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + ln.eps) * _np(ln.weight) + _np(ln.bias)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))


@pytest.fixture(scope="module")
def siglip():
    return load_model("tiny-siglip")


def test_siglip_patch_embedding_equals_the_pooling_head_by_hand(siglip):
    batch = siglip.preprocess([noise_image(130, 90, 1), noise_image(64, 64, 2)])
    got = run_capture(siglip, batch, Selection((0, 1), (0,), ("hidden", "post_proj")))
    with torch.no_grad():
        last = siglip.model(**batch.inputs).last_hidden_state  # post-layernorm final states
    head = siglip.model.head
    d = last.shape[-1]
    w_v, b_v = _np(head.attention.in_proj_weight)[2 * d:], _np(head.attention.in_proj_bias)[2 * d:]
    for i in range(2):
        x = _np(last[i])  # (16 patches, 32)
        a = (x @ w_v.T + b_v) @ _np(head.attention.out_proj.weight).T + _np(head.attention.out_proj.bias)
        h = _gelu_tanh(_layer_norm(a, head.layernorm) @ _np(head.mlp.fc1.weight).T + _np(head.mlp.fc1.bias))
        want = a + h @ _np(head.mlp.fc2.weight).T + _np(head.mlp.fc2.bias)
        assert got[i]["post_proj"].shape == (16, d)
        np.testing.assert_allclose(got[i]["post_proj"].numpy(), want, rtol=0, atol=2e-5)
        # the model's own head, fed one patch repeated: attention over equal keys is the identity
        with torch.no_grad():
            own = head(last[i, 5].expand(1, 3, d).contiguous())[0]
        torch.testing.assert_close(got[i]["post_proj"][5], own, rtol=0, atol=2e-6)
    assert not np.allclose(got[0]["post_proj"].numpy(), got[1]["post_proj"].numpy())


def test_siglip_text_embedding_is_the_final_position_through_the_text_head(siglip):
    sel = Selection((0, 1), (0,), ("hidden", "post_proj"))
    feats, ids = siglip.text_features(TEXTS, sel, "chat")
    text, tokenizer = siglip.text_tower()
    length = text.config.max_position_embeddings
    assert [len(t) for t in ids] == [length] * len(TEXTS)  # padded to the tower's length, as trained
    assert ids[0][-1] == tokenizer.pad_token_id and ids[0][:2] == tokenizer("red dog")["input_ids"]
    with torch.no_grad():
        states = text(input_ids=torch.tensor(ids)).last_hidden_state  # final-layer-normed
    want = _np(states[:, -1]) @ _np(text.head.weight).T + _np(text.head.bias)
    assert feats["post_proj"].shape == (len(TEXTS), siglip.hidden_size)
    np.testing.assert_allclose(feats["post_proj"].numpy(), want, rtol=0, atol=2e-5)
    assert siglip.text_features(TEXTS, Selection((0,), (0,), ("hidden",)), "chat")[0] == {}


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """tiny-llava-ov and tiny-siglip stores of the synthetic dataset, probed by both text tasks."""
    root = tmp_path_factory.mktemp("text-baselines")
    stores = {}
    for name in ("tiny-llava-ov", "tiny-siglip"):
        out = root / name
        extract(ExtractConfig(model=name, dataset="synthetic", out=str(out), limit=4, batch_size=2, part_size=4))
        stores[name] = (out, {task: run_probe(out, task) for task in ("semantic-seg", "refexp-seg")})
    return stores


def test_extracted_text_post_proj_equals_each_model(probed):
    ov = FeatureStore.open(probed["tiny-llava-ov"][0])
    assert ov.text_kinds() == ("keys", "values", "post_proj")
    adapter = load_model("tiny-llava-ov")
    table = adapter.model.get_input_embeddings().weight.detach().float().numpy()
    last_ids = [ids[-1] for ids in pq.read_table(ov.root / "text.parquet").column("token_ids").to_pylist()]
    np.testing.assert_array_equal(ov.text("post_proj"), table[last_ids])
    sg = FeatureStore.open(probed["tiny-siglip"][0])
    assert sg.meta.kinds == ("hidden", "post_proj") and sg.text_kinds() == ("post_proj",)
    assert sg.meta.text_queries == ov.meta.text_queries
    want, _ = load_model("tiny-siglip").text_features(list(sg.meta.text_queries), Selection((0,), (0,), ("post_proj",)),
                                                      "chat")
    np.testing.assert_array_equal(sg.text("post_proj"), want["post_proj"].numpy())
    from kvpipe.store.verify import verify_store

    assert verify_store(sg.root).ok and verify_store(ov.root).ok


def _rows(run, kind):
    return [r for r in run.table.to_pylist() if r["kind"] == kind]


def test_text_probes_score_post_proj_of_both_models(probed):
    for task in ("semantic-seg", "refexp-seg"):
        ov, sg = probed["tiny-llava-ov"][1][task], probed["tiny-siglip"][1][task]
        assert {r["metric"] for r in _rows(ov, "post_proj")} >= {"mIoU"} and _rows(ov, "values")
        assert {r["kind"] for r in sg.table.to_pylist() if r["layer"] >= 0 or r["kind"] == "post_proj"} == {"post_proj"}
        assert not ov.skipped and not sg.skipped  # SigLIP's block outputs have no text counterpart: not swept
        for run in (ov, sg):
            value = next(r["value"] for r in _rows(run, "post_proj") if r["metric"] == "mIoU")
            assert 0.0 <= value <= 1.0


def test_paper_table1_fills_the_post_proj_and_siglip_cells(probed, tmp_path):
    stores = [str(probed[n][0]) for n in ("tiny-llava-ov", "tiny-siglip")]
    result = write_paper(stores, tmp_path / "paper", renames={"tiny-llava-ov": "llava-ov", "tiny-siglip": "siglip"})
    t1 = result.tables["table1"]
    for column, task in (("ImageNet-S mIoU", "semantic-seg"), ("RefCOCO mIoU", "refexp-seg")):
        for row, name in (("Visual Encoder (post-proj)", "tiny-llava-ov"), ("SigLIP without MLM FT", "tiny-siglip")):
            want = next(r["value"] for r in _rows(probed[name][1][task], "post_proj") if r["metric"] == "mIoU")
            cell = t1.cell(row, column)
            assert cell.value == pytest.approx(100 * want) and cell.where.startswith("post-proj @")
            assert cell.paper is not None  # the paper's number beside kvpipe's
    # SigLIP's other columns still read its block outputs: no fg-seg results here, so missing
    assert t1.cell("SigLIP without MLM FT", "Pascal-5i mIoU").value is None
