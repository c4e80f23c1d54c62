"""Protocol choices of the model-in-the-loop experiments, each checked by hand: the knock-out's
random control (Table 3, A.6.3), MME* (Table 3) and the BLINK question count of Figure 3."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.layouts_vqa import BLINK_COLUMNS, BLINK_IMAGES, cell, columns_of, write_parquet

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.evaluation.evaluate import Condition
from kvpipe.pipeline.evaluation.head_sets import VarianceTable, select_heads
from kvpipe.pipeline.evaluation.intervene import knockout_condition
from kvpipe.pipeline.vqa import create_benchmark
from kvpipe.pipeline.vqa.base import VQAItem


# ------------------------------------------------------------------------ knock-out controls
def small_table() -> VarianceTable:
    """2 layers x 2 KV heads; (0, 0) and (1, 1) input-agnostic. A control of the same size per
    layer draws one head per layer: 4 possible sets, one of which is the treatment itself."""
    variance = {(0, 0): 100.0, (0, 1): 800.0, (1, 0): 900.0, (1, 1): 150.0}
    return VarianceTable(variance, {k: v < 450 for k, v in variance.items()}, 450.0, 2, 2)


def test_random_control_is_never_the_treatment_set():
    t = small_table()
    treatment = select_heads(t, "input-agnostic", [0, 1])
    assert treatment == frozenset({(0, 0), (1, 1)})
    draws = [select_heads(t, "random", [0, 1], seed=s) for s in range(40)]
    assert all(d != treatment for d in draws)  # blocking the treatment's own heads is no control
    assert all(sorted(l for l, _ in d) == [0, 1] for d in draws)  # one per layer, as the treatment
    assert any(d & treatment for d in draws)  # "a random combination of them": overlap is allowed
    assert len(set(draws)) == 3  # every other set of one head per layer occurs
    dep = select_heads(t, "input-dependent", [0, 1], seed=0)
    assert dep == frozenset({(0, 1), (1, 0)})  # outside the treatment


def test_random_control_refused_where_only_the_treatment_fits():
    variance = {(0, 0): 100.0, (0, 1): 120.0, (1, 0): 900.0, (1, 1): 150.0}
    t = VarianceTable(variance, {k: v < 450 for k, v in variance.items()}, 450.0, 2, 2)
    with pytest.raises(UsageError, match="every head of layers 0 is input-agnostic") as err:
        select_heads(t, "random", [0])
    assert "\n" not in str(err.value)


def test_run_json_records_the_overlap_with_the_treatment(tmp_path):
    cells = [(l, h, metric, x) for (l, h), v in small_table().variance.items()
             for metric, x in (("l2_variance", v), ("input_agnostic", float(v < 450)))]
    rows = [dict(zip(("layer", "head", "metric", "value"), c), model="m", dataset="d", task="input-agnostic",
                 kind="keys") for c in cells + [(-1, -1, "threshold_valley", 450.0)]]
    path = tmp_path / "results.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    dep = knockout_condition(path, heads="input-dependent", layers="0-1", n_layers=2, n_kv_heads=2, control_seed=0)
    assert dep.info()["overlap_with_treatment"] == 0 and dep.info()["treatment_heads"] == 2
    for seed in range(10):
        rnd = knockout_condition(path, heads="random", layers="0-1", n_layers=2, n_kv_heads=2, control_seed=seed)
        record = rnd.info()  # run.json's "info"
        assert record["overlap_with_treatment"] == len(rnd.heads & {(0, 0), (1, 1)}) < 2
    assert "overlap_with_treatment" not in Condition().info()


# ------------------------------------------------------------------------ MME*
def mme_item(cat: str, image: int, q: int, answer: str) -> VQAItem:
    return VQAItem(qid=f"{cat}/{image}/{q}", benchmark="mme", subset=cat, question="?", prompt="?", images=(),
                   image_ids=(f"{cat}/{image}",), choices=(), answer=answer,
                   meta={"question_id": f"{cat}/{image}.jpg"})


def test_mme_star_is_the_mean_of_the_papers_four_category_scores():
    """Per category, two images of two questions. Right answers: count 4/4 -> acc 100 + acc+ 100
    = 200; color 3/4 (image 1 both, image 2 one) -> 75 + 50 = 125; position 2/4 (one per
    image) -> 50 + 0 = 50; existence 0/4 -> 0. MME* = (200 + 125 + 50 + 0) / 4 = 93.75;
    OCR (not one of the four) does not count."""
    bench = create_benchmark("mme", root=None)
    right = {"count": [1, 1, 1, 1], "color": [1, 1, 1, 0], "position": [1, 0, 0, 1], "existence": [0, 0, 0, 0],
             "OCR": [1, 1, 1, 1]}
    items, preds = [], {}
    for cat, flags in right.items():
        for k, ok in enumerate(flags):
            it = mme_item(cat, k // 2, k % 2, "yes")
            items.append(it)
            preds[it.qid] = "Yes" if ok else "No"
    got = {(r["subset"], r["metric"]): r["value"] for r in bench.score(items, preds)}
    assert [got[(c, "score")] for c in ("count", "color", "position", "existence")] == [200, 125, 50, 0]
    assert got[("MME*", "score")] == pytest.approx(93.75)
    assert ("MME*", "score") not in {(r["subset"], r["metric"]) for r in bench.score(items[:4], {
        it.qid: preds[it.qid] for it in items[:4]})}  # only with all four categories


def test_mme_star_matches_the_paper_table_3():
    # Table 8 (LLaVA-OneVision 7B, base model) -> Table 3's MME* 173.3
    assert round((170.0 + 178.3 + 145.0 + 200.0) / 4, 1) == 173.3


# ------------------------------------------------------------------------ BLINK, Figure 3
def blink_rows(sub: str, split: str, n: int, answer: str | None = None) -> list[dict]:
    rows = []
    for k in range(n):
        row = {"idx": f"{split}_{sub}_{k}", "question": f"{sub} {k}?", "sub_task": sub.replace("_", " "),
               "choices": ["a", "b"], "answer": answer or "(B)", "prompt": f"{sub} {k}?\n(A) a\n(B) b",
               "explanation": ""}
        for j, col in enumerate(BLINK_IMAGES):
            row[col] = cell(k + j, "JPEG") if j == 0 else None
        rows.append(row)
    return rows


def make_perception_copy(root: Path, val: dict[str, int], test: dict[str, int], test_answer: str | None) -> Path:
    for sub in val:
        for split, n in (("val", val[sub]), ("test", test[sub])):
            write_parquet(root / sub / f"{split}-00000-of-00001.parquet",
                          columns_of(blink_rows(sub, split, n, test_answer if split == "test" else None),
                                     BLINK_COLUMNS), BLINK_IMAGES)
    return root


def test_blink_perception_counts_val_and_test(tmp_path):
    val = {"Counting": 2, "Object_Localization": 1, "Relative_Depth": 1, "Spatial_Relation": 3}
    test = {"Counting": 1, "Object_Localization": 2, "Relative_Depth": 1, "Spatial_Relation": 1}
    root = make_perception_copy(tmp_path / "b", val, test, "(A)")
    only_val = create_benchmark("blink", root=str(root), split="perception").items()
    assert len(only_val) == 7
    both = create_benchmark("blink", root=str(root), split="perception", data_split="val+test").items()
    assert len(both) == 7 + 5
    assert {it.meta["data_split"] for it in both} == {"val", "test"}
    assert sum(it.meta["data_split"] == "test" for it in both if it.subset == "Object_Localization") == 2
    hidden = make_perception_copy(tmp_path / "h", val, test, "hidden")
    with pytest.raises(DataError, match="test answers are not public") as err:
        create_benchmark("blink", root=str(hidden), split="perception", data_split="val+test").items()
    assert "\n" not in str(err.value)


def test_figure3_counts_match_the_dataset_card():
    from kvpipe.pipeline.vqa.blink import PERCEPTION_COUNTS
    from kvpipe.probes.figure3 import (BLINK_PERCEPTION_TEST, BLINK_PERCEPTION_VAL, CVBENCH_QUESTIONS,
                                       PAPER_QUESTIONS, questions_note)

    # The paper's 1,021 BLINK perception questions are val + test of the four sub-tasks.
    assert sum(PERCEPTION_COUNTS["val"].values()) == BLINK_PERCEPTION_VAL == 509
    assert sum(PERCEPTION_COUNTS["test"].values()) == BLINK_PERCEPTION_TEST == 512
    assert BLINK_PERCEPTION_VAL + BLINK_PERCEPTION_TEST == 1021
    assert PAPER_QUESTIONS == CVBENCH_QUESTIONS + 1021 == 3658
    assert questions_note("m", 3658) == ""
    note = questions_note("m", 2637 + 509)
    assert "BLINK perception val 509" in note and "512 perception test" in note
