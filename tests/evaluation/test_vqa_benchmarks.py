"""Question-answering benchmarks: readers of each official layout, lmms-eval parsing, scores by hand."""

from __future__ import annotations

import math
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.vqa import BENCHMARKS, create_benchmark, paired_rows, paired_table
from kvpipe.pipeline.vqa.common import extract_letter, leading_letter
from kvpipe.pipeline.vqa.mme import parse_pred_ans
from kvpipe.pipeline.vqa.pope import parse_lmms_eval, parse_pope, pope_metrics
from kvpipe.pipeline.vqa.spair_vqa import LABELS, draw_markers, marker_radius

from fixtures.layouts_vqa import (BLINK_COLUMNS, BLINK_IMAGES, CV_COLUMNS, POPE_ROWS, SPAIR_VQA_PAIRS, blink_rows,
                                  coco_name, color_of, columns_of, cv_rows, make_blink, make_cvbench_hub,
                                  make_cvbench_saved, make_mme_hub, make_mme_original, make_pope_hub,
                                  make_pope_original, make_pope_saved, make_spair_vqa, write_parquet)

POPE_POST = "\nAnswer the question using a single word or phrase."


def close(a, b, tol=6):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def table(rows):
    return {(r["subset"], r["metric"]): r["value"] for r in rows}


# --- answer parsing (lmms-eval rules) ---------------------------------------------------------------


def test_pope_parsing_is_lmms_eval_exact_match_or_original_pope():
    assert [parse_lmms_eval(t) for t in ("Yes", " no \n", "YES")] == ["yes", "no", "yes"]
    # lmms-eval compares the whole lower-cased answer: anything longer is neither yes nor no
    assert [parse_lmms_eval(t) for t in ("Yes, there is", "No.", "yes.", "")] == ["other"] * 4
    # the original POPE evaluate.py: first sentence, "no" if the words hold No / no / not
    assert parse_pope("Yes, there is a dog. No cat.") == "yes"
    assert parse_pope("No, there is no dog") == "no"
    assert parse_pope("There is not a dog in it") == "no"
    assert parse_pope("No.") == "no" and parse_pope("Nope") == "yes"


def test_mme_parse_pred_ans_edge_cases():
    cases = {"Yes": "yes", "No.": "no", "Yes, there is": "yes", "no, it is not": "no", "y": "yes", "N": "no",
             "x": "other", "There is a dog": "other", "Not really": "no", "The answer is yes": "other",
             "y.": "yes", "": "other"}
    assert {t: parse_pred_ans(t) for t in cases} == cases


def test_multiple_choice_letter_extraction_edge_cases():
    abcd = "ABCD"
    cases = {"The answer is (B)": "B", "B) a cat": "B", "(C)": "C", "A.": "A", "d": "D",
             "The correct answer is (B).": "B", "I think the answer is C because it is": "C", "answer: d": "D",
             "Option (C) fits, not the first": "C", "(E)": "", "none": "", "Dog": "D",  # lmms-eval reads a leading D
             "B.\nBecause (A) is wrong": "B"}
    assert {t: extract_letter(t, abcd) for t in cases} == cases
    assert extract_letter("C", "AB") == "" and extract_letter("The answer is", "AB") == ""
    # CV-Bench's lmms-eval rule is the first letter, whatever it is
    assert [leading_letter(t) for t in ("The answer is (B)", "B) a cat", "(c)", "  d.", "42")] == \
        ["T", "B", "C", "D", ""]


# --- POPE -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pope_hub(tmp_path_factory) -> Path:
    return make_pope_hub(tmp_path_factory.mktemp("pope_hub"))


def pope_view(items):
    return [(it.qid, it.subset, it.question, it.answer, it.image_ids) for it in items]


def test_pope_reads_lmms_lab_hub_layout(pope_hub):
    bench = create_benchmark("pope", root=str(pope_hub))
    items = bench.items()
    # data/ (the default config) is read, not Full/ as well: six questions, splits in order
    assert [it.qid for it in items] == ["random/1", "random/2", "popular/1", "popular/2", "adversarial/1",
                                        "adversarial/2"]
    first = items[0]
    assert first.question == "Is there a person in the image?" and first.answer == "yes"
    assert first.prompt == "Is there a person in the image?" + POPE_POST
    assert first.image_ids == (coco_name(104),) and first.choices == () and first.benchmark == "pope"
    for it in items:
        img = it.images[0]()
        n = next(r[4] for r in POPE_ROWS if r[0] == it.subset and r[1] == it.qid.split("/")[1])
        assert img.mode == "RGB" and close(img.getpixel((5, 5)), color_of(n))
    assert pickle.loads(pickle.dumps(items[3].images[0]))().size == (12, 10)  # loaders travel to workers
    assert [it.qid for it in create_benchmark("pope", root=str(pope_hub), split="adversarial,Random").items()] == \
        ["random/1", "random/2", "adversarial/1", "adversarial/2"]
    assert len(create_benchmark("pope", root=str(pope_hub), limit=4).items()) == 4


def test_pope_full_config_saved_copy_and_original_layout_agree(pope_hub, tmp_path):
    expected = pope_view(create_benchmark("pope", root=str(pope_hub)).items())
    assert pope_view(create_benchmark("pope", root=str(pope_hub / "Full")).items()) == expected
    saved = make_pope_saved(tmp_path / "saved")
    assert pope_view(create_benchmark("pope", root=str(saved)).items()) == expected
    original = make_pope_original(tmp_path / "orig")
    items = create_benchmark("pope", root=str(original)).items()
    assert pope_view(items) == expected
    assert close(items[2].images[0]().getpixel((3, 3)), color_of(102))
    # the images may live elsewhere
    moved = tmp_path / "coco_images"
    (original / "val2014").rename(moved)
    with pytest.raises(DataError, match="image_root"):
        create_benchmark("pope", root=str(original)).items()
    assert pope_view(create_benchmark("pope", root=str(original), image_root=str(moved)).items()) == expected


def test_pope_scores_equal_hand_counts(pope_hub):
    bench = create_benchmark("pope", root=str(pope_hub))
    items = bench.items()  # gold per split: yes, no
    texts = {"random/1": "Yes", "random/2": "no",  # TP, TN
             "popular/1": "No", "popular/2": "Yes, there is",  # FN, unparsed (neither yes nor no)
             "adversarial/1": "yes", "adversarial/2": "yes"}  # TP, FP
    got = table(bench.score(items, texts))
    assert got[("random", "accuracy")] == 1.0 and got[("random", "f1")] == 1.0
    assert got[("popular", "precision")] == 0.0 and got[("popular", "recall")] == 0.0 and got[("popular", "f1")] == 0.0
    assert got[("adversarial", "precision")] == 0.5 and got[("adversarial", "recall")] == 1.0
    assert math.isclose(got[("adversarial", "f1")], 2 * 0.5 * 1.0 / 1.5)
    # all six: TP 2, FP 1, FN 1, TN 1, one unparsed
    assert got[("all", "accuracy")] == 3 / 6 and math.isclose(got[("all", "precision")], 2 / 3)
    assert math.isclose(got[("all", "recall")], 2 / 3) and math.isclose(got[("all", "f1")], 2 / 3)
    assert got[("all", "yes_ratio")] == 0.5 and got[("all", "pred_yes_ratio")] == 0.5 and got[("all", "n")] == 6
    # the original POPE parser reads "Yes, there is" as yes: a false positive
    pope = table(create_benchmark("pope", root=str(pope_hub), parser="pope").score(items, texts))
    assert pope[("popular", "pred_yes_ratio")] == 0.5 and pope[("popular", "precision")] == 0.0
    assert math.isclose(pope[("all", "precision")], 0.5)
    assert math.isclose(pope[("all", "f1")], 2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    with pytest.raises(UsageError, match="no prediction for 1 of 6"):
        bench.score(items, {k: v for k, v in texts.items() if k != "random/2"})


def test_pope_metrics_four_questions_by_hand():
    # gold yes, yes, no, no; predicted yes, no, yes, yes: TP 1, FN 1, FP 2, TN 0
    m = pope_metrics(["yes", "yes", "no", "no"], ["yes", "no", "yes", "yes"])
    assert m["accuracy"] == 0.25 and math.isclose(m["precision"], 1 / 3) and m["recall"] == 0.5
    assert math.isclose(m["f1"], 2 * (1 / 3) * 0.5 / (1 / 3 + 0.5))
    assert m["pred_yes_ratio"] == 0.75 and m["yes_ratio"] == 0.5  # lmms-eval: share of gold "yes"


# --- MME --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mme_hub(tmp_path_factory) -> Path:
    return make_mme_hub(tmp_path_factory.mktemp("mme_hub"))


def mme_view(items):
    return sorted((it.subset, it.meta["question_id"], it.question, it.answer) for it in items)


def test_mme_reads_hub_and_original_release(mme_hub, tmp_path):
    items = create_benchmark("mme", root=str(mme_hub)).items()
    assert len(items) == 10 and [it.qid for it in items[:2]] == ["count/000000001.jpg#0", "count/000000001.jpg#1"]
    assert [it.subset for it in items[::2]] == ["count", "count", "color", "artwork", "code_reasoning"]
    first = items[0]
    assert first.question == "Are there two dogs in the image? Please answer yes or no."
    assert first.prompt == "Are there two dogs in the image?" + POPE_POST and first.answer == "yes"
    assert items[1].answer == "no" and first.image_ids == ("count/000000001.jpg",)
    assert items[5].images[0]().getpixel((1, 1)) == color_of(2)  # color/000000003.jpg is image 2
    original = make_mme_original(tmp_path / "orig")
    orig_items = create_benchmark("mme", root=str(original)).items()
    assert mme_view(orig_items) == mme_view(items)
    art = next(it for it in orig_items if it.subset == "artwork")
    assert close(art.images[0]().getpixel((1, 1)), color_of(3))


def test_mme_subsets_and_whole_image_limit(mme_hub):
    assert {it.subset for it in create_benchmark("mme", root=str(mme_hub), split="count,Color").items()} == \
        {"count", "color"}
    assert len(create_benchmark("mme", root=str(mme_hub), split="paper").items()) == 6  # count + color present
    assert len(create_benchmark("mme", root=str(mme_hub), limit=3).items()) == 4  # rounded up to whole images
    with pytest.raises(UsageError, match="no category 'counts'"):
        create_benchmark("mme", root=str(mme_hub), split="counts").items()


def test_mme_scores_equal_hand_computation(mme_hub):
    bench = create_benchmark("mme", root=str(mme_hub))
    items = bench.items()
    q = [it.qid for it in items]
    texts = dict(zip(q, [
        "Yes", "No.",  # count image 1: both right
        "Yes, there is", "yes",  # count image 2: one of two right
        "No", "Yes",  # color: both wrong
        "yes", "no",  # artwork: both right
        "y", "maybe",  # code_reasoning: one right ("maybe" is other)
    ]))
    got = table(bench.score(items, texts))
    # count: acc = mean(100, 50) = 75, acc+ = mean(100, 0) = 50
    assert (got[("count", "acc")], got[("count", "acc_plus")], got[("count", "score")]) == (75.0, 50.0, 125.0)
    assert (got[("color", "acc")], got[("color", "acc_plus")]) == (0.0, 0.0)
    assert got[("artwork", "score")] == 200.0 and got[("code_reasoning", "score")] == 50.0
    assert got[("perception", "score")] == 325.0 and got[("cognition", "score")] == 50.0
    assert got[("all", "score")] == 375.0 and got[("count", "n")] == 4
    with pytest.raises(UsageError, match="two questions together"):
        bench.score(items[:3], {k: texts[k] for k in q[:3]})


# --- BLINK ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def blink_root(tmp_path_factory) -> Path:
    return make_blink(tmp_path_factory.mktemp("blink"))


def test_blink_reads_hub_converted_and_saved_layouts(blink_root):
    items = create_benchmark("blink", root=str(blink_root)).items()  # every sub-task folder present, val split
    assert [it.qid for it in items] == ["val_Art_Style_1", "val_Art_Style_2", "val_Art_Style_3", "val_Counting_1",
                                        "val_Counting_2", "val_Visual_Similarity_1", "val_Visual_Similarity_2"]
    art3 = items[2]
    assert art3.subset == "Art_Style" and art3.answer == "B" and art3.choices == ("the second image", "the third image")
    assert art3.prompt == ("Note: You only need to respond with A, B without providing any additional information.\n"
                           "Question 3 of Art_Style?\nSelect from the following choices.\n(A) the second image\n"
                           "(B) the third image")
    assert art3.image_ids == ("val_Art_Style_3/image_1", "val_Art_Style_3/image_2", "val_Art_Style_3/image_3")
    # row 2 sits in the second row group of its file; each image is its own colour
    assert [close(f().getpixel((4, 4)), color_of(30 + j)) for j, f in enumerate(art3.images)] == [True] * 3
    count = items[3]
    assert len(count.images) == 1 and count.answer == "C" and count.prompt.startswith(
        "Note: You only need to respond with A, B, C, D without")
    assert close(count.images[0]().getpixel((2, 2)), color_of(110))
    sim = items[6]
    assert sim.answer == "B" and len(sim.images) == 3 and close(sim.images[2]().getpixel((0, 0)), color_of(222))
    assert sim.meta["data_split"] == "val" and sim.meta["sub_task"] == "Visual Similarity"


def test_blink_subset_selection(blink_root):
    chosen = create_benchmark("blink", root=str(blink_root), split="art style,counting").items()
    assert sorted({it.subset for it in chosen}) == ["Art_Style", "Counting"] and len(chosen) == 5
    with pytest.raises(DataError, match="Object_Localization does not exist"):
        create_benchmark("blink", root=str(blink_root), split="perception").items()
    with pytest.raises(UsageError, match="no sub-task 'Art'"):
        create_benchmark("blink", root=str(blink_root), split="Art")
    with pytest.raises(DataError, match="no val2 split"):
        create_benchmark("blink", root=str(blink_root), split="Art_Style", data_split="val2").items()


def test_blink_scores_equal_hand_computation(blink_root):
    bench = create_benchmark("blink", root=str(blink_root), split="Art_Style,Counting")
    items = bench.items()  # gold: A, B, B | C, D
    texts = dict(zip([it.qid for it in items], ["A", "The answer is (B)", "C", "(C) 2", "B) a cat"]))
    assert [bench.parse(it, texts[it.qid]) for it in items] == ["A", "B", "other", "C", "B"]
    got = table(bench.score(items, texts))
    assert math.isclose(got[("Art_Style", "accuracy")], 2 / 3) and got[("Counting", "accuracy")] == 0.5
    assert math.isclose(got[("all", "accuracy")], (2 / 3 + 1 / 2) / 2)  # lmms-eval's group: mean of sub-tasks
    assert got[("all", "accuracy_pooled")] == 3 / 5 and got[("all", "n")] == 5


# --- CV-Bench ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cv_root(tmp_path_factory) -> Path:
    return make_cvbench_hub(tmp_path_factory.mktemp("cvbench"))


def test_cvbench_reads_hub_and_saved_copy(cv_root, tmp_path):
    items = create_benchmark("cvbench", root=str(cv_root)).items()
    assert [it.qid for it in items] == ["0", "1", "2", "3", "4", "5"]
    assert [it.subset for it in items] == ["Count", "Count", "Relation", "Relation", "Depth", "Distance"]
    first = items[0]
    assert first.answer == "C" and first.choices == ("0", "1", "2", "3", "4")
    assert first.prompt == ("Note: You only need to respond with A, B, C, D, E without providing any additional "
                            "information.\n\nHow about question 0? Select from the following choices.\n(A) 0\n(B) 1\n"
                            "(C) 2\n(D) 3\n(E) 4")
    assert first.meta["source"] == "ADE20K" and first.meta["type"] == "2D"
    assert items[5].images[0]().getpixel((3, 3)) == color_of(305)
    saved = make_cvbench_saved(tmp_path / "saved")
    view = [(it.qid, it.subset, it.prompt, it.answer) for it in items]
    assert [(it.qid, it.subset, it.prompt, it.answer) for it in create_benchmark("cvbench", root=str(saved)).items()] \
        == view
    assert [it.subset for it in create_benchmark("cvbench", root=str(cv_root), split="3D").items()] == \
        ["Depth", "Distance"]
    with pytest.raises(UsageError, match="no task 'Counting'"):
        create_benchmark("cvbench", root=str(cv_root), split="Counting")


def test_cvbench_ids_stay_unique_when_idx_restarts_per_file(tmp_path):
    rows = cv_rows()
    for r in rows:
        if r["type"] == "3D":
            r["idx"] -= 4  # 0, 1 again
    write_parquet(tmp_path / "test_2d.parquet", columns_of(rows[:4], CV_COLUMNS))
    write_parquet(tmp_path / "test_3d.parquet", columns_of(rows[4:], CV_COLUMNS))
    assert [it.qid for it in create_benchmark("cvbench", root=str(tmp_path)).items()] == \
        ["2D_0", "2D_1", "2D_2", "2D_3", "3D_0", "3D_1"]


def test_cvbench_scores_equal_hand_computation(cv_root):
    bench = create_benchmark("cvbench", root=str(cv_root))
    items = bench.items()  # gold: C, A, B, A, A, B; sources ADE20K, COCO, COCO, ADE20K, Omni3D, Omni3D
    texts = dict(zip([it.qid for it in items], ["C", "The answer is (A)", "(b) right", "A", "A.", "a"]))
    assert [bench.parse(it, texts[it.qid]) for it in items] == ["C", "T", "B", "A", "A", "A"]
    got = table(bench.score(items, texts))
    assert got[("Count", "accuracy")] == 0.5 and got[("Relation", "accuracy")] == 1.0
    assert got[("Depth", "accuracy")] == 1.0 and got[("Distance", "accuracy")] == 0.0
    assert (got[("ADE20K", "accuracy")], got[("COCO", "accuracy")], got[("Omni3D", "accuracy")]) == (1.0, 0.5, 0.5)
    assert got[("2D", "accuracy")] == 0.75 and got[("3D", "accuracy")] == 0.5
    assert math.isclose(got[("all", "accuracy")], 4 / 6) and got[("all", "combined")] == (0.75 + 0.5) / 2


# --- SPair-71k as VQA -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def spair_root(tmp_path_factory) -> Path:
    return make_spair_vqa(tmp_path_factory.mktemp("spair"))


def test_spair_vqa_builds_blink_style_questions(spair_root):
    bench = create_benchmark("spair-vqa", root=str(spair_root))
    items = bench.items()
    # one question per usable pair: pair 3 has 3 keypoints, pair 4's keypoints are 2-4 px apart
    assert sorted(it.meta["pair"] for it in items) == [SPAIR_VQA_PAIRS[0][0], SPAIR_VQA_PAIRS[1][0]]
    for it in items:
        name, src, trg, skps, tkps, box = next(p for p in SPAIR_VQA_PAIRS if p[0] == it.meta["pair"])
        k, m = it.meta["keypoint"], it.meta
        assert it.answer == m["gold"] and it.choices == ("Point A", "Point B", "Point C", "Point D")
        assert m["source_keypoint"] == skps[k] and m["candidates"][LABELS.index(it.answer)] == tkps[k]
        assert len(set(m["candidate_keypoints"])) == 4 and k in m["candidate_keypoints"]
        assert [tkps[j] for j in m["candidate_keypoints"]] == m["candidates"]
        thr = 0.1 * max(box[2] - box[0], box[3] - box[1])
        cands = m["candidates"]
        assert all(math.dist(a, b) > thr for i, a in enumerate(cands) for b in cands[i + 1:])
        cat = name.rsplit(":", 1)[1]
        assert (m["source_image"], m["target_image"]) == (f"{cat}/{src}", f"{cat}/{trg}")
        assert it.prompt.startswith("Note: You only need to respond with A, B, C, D without providing")
        assert "labeled with REF" in it.prompt and it.prompt.endswith("(C) Point C\n(D) Point D")
        source, target = (f() for f in it.images)
        assert source.size == target.size == (100, 80)
        assert source.getpixel(tuple(skps[k])) == (255, 0, 0)  # the REF marker's centre dot
        assert all(target.getpixel(tuple(c)) == (255, 0, 0) for c in cands)
        assert pickle.loads(pickle.dumps(it.images[1]))().tobytes() == target.tobytes()
    # seeded: the same seed gives the same questions, other seeds shuffle letters and keypoints
    again = create_benchmark("spair-vqa", root=str(spair_root)).items()
    assert [(it.qid, it.answer, it.meta["candidates"]) for it in again] == \
        [(it.qid, it.answer, it.meta["candidates"]) for it in items]
    others = {tuple((it.qid, it.answer) for it in create_benchmark("spair-vqa", root=str(spair_root),
                                                                    seed=s).items()) for s in range(8)}
    assert len(others) > 1
    assert len(create_benchmark("spair-vqa", root=str(spair_root), n_questions="1").items()) == 1
    assert len(create_benchmark("spair-vqa", root=str(spair_root), min_separation=0).items()) == 3


def test_spair_vqa_scoring_and_paired_table(spair_root):
    bench = create_benchmark("spair-vqa", root=str(spair_root))
    items = bench.items()
    wrong = {"A": "B", "B": "C", "C": "D", "D": "A"}
    texts = {items[0].qid: f"The answer is ({items[0].answer})", items[1].qid: wrong[items[1].answer]}
    got = table(bench.score(items, texts))
    assert got[("all", "accuracy")] == 0.5 and got[("cat", "n")] == 2
    mlm = bench.correct(items, texts)
    assert mlm == {items[0].qid: True, items[1].qid: False}
    t = paired_table([mlm[it.qid] for it in items], [False, True])
    assert t["counts"] == {"mlm_right_value_right": 0, "mlm_right_value_wrong": 1, "mlm_wrong_value_right": 1,
                           "mlm_wrong_value_wrong": 0}


def test_markers_are_drawn_where_asked():
    img = draw_markers(Image.new("RGB", (200, 100), (255, 255, 255)), [(20, 50), (190, 50)], ["A", "B"])
    r = marker_radius((200, 100))
    assert r == 4 and img.getpixel((20, 50)) == (255, 0, 0) and img.getpixel((20 + r, 50)) == (255, 0, 0)
    assert img.getpixel((100, 10)) == (255, 255, 255)  # untouched away from the markers
    # the label of the point near the right border is drawn on its left, inside the image
    assert any(img.getpixel((x, y))[1] < 128 for x in range(165, 186) for y in range(40, 61))


# --- paired tasks -----------------------------------------------------------------------------------


def test_paired_table_counts_and_percentages():
    mlm = [True, True, False, False, True, False, False, False]
    val = [True, False, True, False, True, True, True, False]
    t = paired_table(mlm, val)
    assert t["n"] == 8 and t["counts"] == {"mlm_right_value_right": 2, "mlm_right_value_wrong": 1,
                                           "mlm_wrong_value_right": 3, "mlm_wrong_value_wrong": 2}
    assert t["percent"] == {"mlm_right_value_right": 25.0, "mlm_right_value_wrong": 12.5,
                            "mlm_wrong_value_right": 37.5, "mlm_wrong_value_wrong": 25.0}
    # Table 5's rows: MLM right, values right but MLM wrong, values wrong but MLM right, either right
    assert (t["mlm_right"], t["value_right_mlm_wrong"], t["value_wrong_mlm_right"], t["either_right"]) == \
        (37.5, 37.5, 12.5, 75.0)
    assert t["value_right"] == 62.5
    rows = table(paired_rows(t, "Art_Style"))
    assert rows[("Art_Style", "either_right_pct")] == 75.0 and rows[("Art_Style", "mlm_wrong_value_right_count")] == 3
    with pytest.raises(UsageError, match="differ in length"):
        paired_table([True], [True, False])
    with pytest.raises(UsageError, match="no paired answers"):
        paired_table([], [])


# --- errors and imports -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pope", "mme", "blink", "cvbench", "spair-vqa"])
def test_bad_roots_are_one_line_errors(name, tmp_path):
    with pytest.raises(UsageError, match="--data-root is required"):
        create_benchmark(name).items()
    with pytest.raises(DataError, match="does not exist"):
        create_benchmark(name, root=str(tmp_path / "missing")).items()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError) as err:
        create_benchmark(name, root=str(tmp_path / "empty")).items()
    assert str(tmp_path / "empty") in str(err.value) and "\n" not in str(err.value)


def test_bad_options_and_columns(tmp_path, pope_hub):
    with pytest.raises(UsageError, match="unknown benchmark 'popes'"):
        create_benchmark("popes")
    with pytest.raises(UsageError, match="has no option 'parsers'"):
        create_benchmark("pope", root=str(pope_hub), parsers="pope")
    with pytest.raises(UsageError, match="parser='gpt'"):
        create_benchmark("pope", root=str(pope_hub), parser="gpt")
    with pytest.raises(UsageError, match="no split 'rand'"):
        create_benchmark("pope", root=str(pope_hub), split="rand")
    with pytest.raises(UsageError, match="n_questions=0"):
        create_benchmark("spair-vqa", root=str(tmp_path), n_questions=0)
    rows = blink_rows("Art_Style", "val", 1, ["x", "y"], ["(A)"], 0)
    cols = columns_of(rows, tuple(c for c in BLINK_COLUMNS if c != "prompt"))
    write_parquet(tmp_path / "Art_Style" / "val-00000-of-00001.parquet", cols, BLINK_IMAGES)
    with pytest.raises(DataError, match="has no column 'prompt'"):
        create_benchmark("blink", root=str(tmp_path)).items()
    bad = make_pope_original(tmp_path / "pope_bad")
    (bad / "output" / "coco" / "coco_pope_random.json").write_text('{"question_id": 1}\n')
    with pytest.raises(DataError, match="coco_pope_random.json line 1"):
        create_benchmark("pope", root=str(bad), split="random").items()


def test_readers_do_not_import_torch():
    code = ("import sys, kvpipe.pipeline.vqa, kvpipe.pipeline.datasets.spair; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
    assert {"blink", "cvbench", "mme", "pope", "spair-vqa"} <= set(BENCHMARKS.names())
