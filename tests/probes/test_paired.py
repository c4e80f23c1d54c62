"""Paired tasks (the paper's Table 5) and Figure 3: the BLINK / SPair-as-VQA image datasets,
the art-style / visual-similarity / spair-vqa probes with oracle and uninformative features,
the 2x2 table against hand counts, Figure 3 from fake stores and score files, end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures.cli import invoke
from fixtures.layouts_vqa import color_of, make_blink, make_spair_vqa
from fixtures.probe_stores import GH, GW, PATCH, ToyImage, seg_stores, stripes, write_toy_store

from kvpipe.errors import DataError, StoreError, UsageError
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.vqa import create_benchmark, paired_table
from kvpipe.probes import PROBES, Target, run_probe
from kvpipe.probes.figure3 import (SEGMENTATION_TASKS, figure3, file_accuracy, mlm_accuracy, parse_point,
                                   read_spec)
from kvpipe.probes.paired import (PREDICTIONS, cosine_choice, mean_pool, pair_answers, paired_probe,
                                  read_mlm_answers)
from kvpipe.store import FeatureStore


def close(a, b, tol=8):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


# ------------------------------------------------------------------------------ image datasets
def test_blink_images_read_the_official_layout(tmp_path):
    root = make_blink(tmp_path / "BLINK")
    ds = create_dataset("blink", str(root))
    records = ds.records()
    # Art_Style (hub parquet): 3 questions x 3 images; Visual_Similarity (save_to_disk): 2 x 3
    assert [r.image_id for r in records[:4]] == ["val_Art_Style_1/image_1", "val_Art_Style_1/image_2",
                                                 "val_Art_Style_1/image_3", "val_Art_Style_2/image_1"]
    assert len(records) == 15 and len({r.image_id for r in records}) == 15
    # layouts_vqa colours image j of question k with color_of(start + 10 k + j): Art 0, Similarity 200
    assert close(records[1].image().getpixel((3, 3)), color_of(10 + 1))
    sim = next(r for r in records if r.image_id == "val_Visual_Similarity_2/image_3")
    assert close(sim.image().getpixel((3, 3)), color_of(200 + 20 + 2))
    assert records[0].annotation().meta == {"qid": "val_Art_Style_1", "subtask": "Art_Style", "role": "reference",
                                            "position": 0}
    questions = ds.structure()["questions"]
    # gold answers (A), (B), (B) for Art_Style and (A), (B) for Visual_Similarity -> option indices
    assert [(q["qid"], q["answer"]) for q in questions] == [
        ("val_Art_Style_1", 0), ("val_Art_Style_2", 1), ("val_Art_Style_3", 1),
        ("val_Visual_Similarity_1", 0), ("val_Visual_Similarity_2", 1)]
    assert questions[1]["reference"] == "val_Art_Style_2/image_1"
    assert questions[1]["candidates"] == ["val_Art_Style_2/image_2", "val_Art_Style_2/image_3"]
    # the same ids as the question reader's, which kvpipe answer uses
    items = create_benchmark("blink", str(root), split="paired").items()
    assert [i for it in items for i in it.image_ids] == [r.image_id for r in records]
    assert ds.tasks == ("art-style", "visual-similarity", "input-agnostic")


def test_blink_images_subtask_limit_and_errors(tmp_path):
    root = make_blink(tmp_path / "BLINK")
    art = create_dataset("blink", str(root), limit=5, subtask="Art_Style")
    assert len(art.records()) == 5
    assert [q["qid"] for q in art.structure()["questions"]] == ["val_Art_Style_1"]  # question 2 is cut
    assert art.tasks == ("art-style", "input-agnostic")
    with pytest.raises(UsageError, match="subtask='Counting'"):
        create_dataset("blink", str(root), subtask="Counting")
    with pytest.raises(UsageError, match="--data-root"):
        create_dataset("blink")
    with pytest.raises(DataError, match="no train split"):
        create_dataset("blink", str(root), split="train").records()


def test_spair_vqa_images_are_clean_and_match_the_questions(tmp_path):
    root = make_spair_vqa(tmp_path / "spair")
    ds = create_dataset("spair-vqa", str(root), n_questions=5)
    items = create_benchmark("spair-vqa", str(root), n_questions=5).items()
    records = ds.records()
    assert [r.image_id for r in records] == sorted({i for it in items for i in (it.meta["source_image"],
                                                                                it.meta["target_image"])})
    for r in records:  # unmarked: the white layout image, no red marker anywhere
        assert np.asarray(r.image()).min() >= 250
    questions = ds.structure()["questions"]
    assert [q["qid"] for q in questions] == [it.qid for it in items]
    for q, it in zip(questions, items):
        assert q["answer"] == "ABCD".index(it.answer)
        assert q["candidates"] == it.meta["candidates"] and q["source_keypoint"] == it.meta["source_keypoint"]
        assert (q["source"], q["target"]) == (it.meta["source_image"], it.meta["target_image"])
        gold = q["candidates"][q["answer"]]
        pair = it.meta["keypoint"]
        assert gold == it.meta["candidates"][it.meta["candidate_keypoints"].index(pair)]


# ------------------------------------------------------------------------------ helpers by hand
def test_mean_pool_and_cosine_choice_by_hand():
    data = np.array([[1, 0], [3, 0], [0, 2], [0, 4], [5, 5]], np.float32)
    pooled = mean_pool(data, np.array([0, 1, 2, 3, 4]), np.array([0, 2, 4]))
    np.testing.assert_allclose(pooled, [[2, 0], [0, 3], [5, 5]])
    ref = np.array([[1.0, 0.1], [1.0, 1.0]])
    opts = np.array([[[0, 1], [1, 0], [9, 9]], [[0, 1], [1, 0], [2, 2]]], np.float64)
    # question 0: only two options count (the third would tie best); question 1: the diagonal wins
    assert cosine_choice(ref, opts, np.array([2, 3])).tolist() == [1, 2]


# ------------------------------------------------------------------------------ toy question stores
def art_questions(n: int = 40, seed: int = 0, wrong: tuple[int, ...] = ()) -> tuple[list[ToyImage], dict]:
    """Art_Style questions: style labels 1-8 fill 4 rows of every image, a content label 9-12
    the other 2; the reference shares its content with the wrong option and its style with the
    gold one. ``wrong``: questions whose recorded gold is the other option (values miss them)."""
    rng = np.random.default_rng(seed)
    images, questions = [], []
    for k in range(n):
        s, t = rng.choice(np.arange(1, 9), 2, replace=False)
        c, d = rng.choice(np.arange(9, 13), 2, replace=False)
        qid = f"val_Art_Style_{k + 1}"
        ref = ToyImage(f"{qid}/image_1", stripes({int(c): (0, 2)}, fill=int(s)))
        good = ToyImage("", stripes({int(d): (4, 6)}, fill=int(s)))
        bad = ToyImage("", stripes({int(c): (2, 4)}, fill=int(t)))
        gold = int(rng.integers(2))
        options = [good, bad] if gold == 0 else [bad, good]
        for j, im in enumerate([ref, *options]):  # one prompt per question, as --multi-image stores them
            im.image_id, im.sequence, im.sequence_index = f"{qid}/image_{j + 1}", qid, j
        images += [ref, *options]
        questions.append({"qid": qid, "subtask": "Art_Style", "reference": ref.image_id,
                          "candidates": [o.image_id for o in options], "answer": 1 - gold if k in wrong else gold})
    return images, {"questions": questions}


def accuracy(run, kind, layer, head):
    return next(r["value"] for r in run.table.to_pylist()
                if (r["kind"], r["layer"], r["head"], r["metric"]) == (kind, layer, head, "accuracy"))


@pytest.mark.plots
def test_art_style_oracle_is_perfect_and_noise_is_chance(tmp_path):
    images, structure = art_questions()
    # two Visual_Similarity questions in the same store: art-style must leave them alone
    vs = [{"qid": f"vs{k}", "subtask": "Visual_Similarity", "reference": images[3 * k].image_id,
           "candidates": [images[3 * k + 1].image_id, images[3 * k + 2].image_id], "answer": 0} for k in range(2)]
    structure["questions"] += vs
    store = write_toy_store(tmp_path / "oracle", images, "oracle", structure)
    run = run_probe(store, "art-style")
    for kind in ("values", "keys"):
        for layer in (0, 1):
            assert accuracy(run, kind, layer, 0) == 1.0
            assert 0.25 < accuracy(run, kind, layer, 1) < 0.75  # head 1 is noise: chance is 0.5
    assert accuracy(run, "post_proj", -1, -1) == 1.0
    summary = {r["metric"]: r["value"] for r in run.table.to_pylist() if r["kind"] == "dataset"}
    assert summary == {"n_questions": 40, "n_questions_skipped": 0, "chance_accuracy": 0.5,
                       "images_in_one_prompt": 1.0}
    preds = pq.read_table(run.out_dir / PREDICTIONS).to_pylist()
    assert len(preds) == 9 * 40  # (2 kinds x 2 layers x 2 heads + post_proj) x questions
    assert all(p["correct"] == (p["predicted"] == p["answer"]) for p in preds)
    assert all(p["correct"] for p in preds if p["head"] == 0 or p["kind"] == "post_proj")
    # visual-similarity reads only its two questions
    vs_run = run_probe(store, "visual-similarity")
    assert {r["value"] for r in vs_run.table.to_pylist() if r["metric"] == "n_questions"} == {2.0}
    # a cached run into a new directory writes the predictions again
    again = run_probe(store, "art-style", out_dir=tmp_path / "again")
    assert again.cached and pq.read_table(tmp_path / "again" / PREDICTIONS).num_rows == 9 * 40


def test_art_style_with_shuffled_features_is_chance(tmp_path):
    images, structure = art_questions(seed=1)
    perm = np.random.default_rng(7).permutation(len(images))
    shuffled = [ToyImage(im.image_id, images[p].tokens, sequence=im.sequence, sequence_index=im.sequence_index)
                for im, p in zip(images, perm)]
    run = run_probe(write_toy_store(tmp_path / "shuffled", shuffled, "oracle", structure), "art-style")
    for kind in ("values", "keys", "post_proj"):
        layer, head = (-1, -1) if kind == "post_proj" else (0, 0)
        assert 0.25 < accuracy(run, kind, layer, head) < 0.75
    rand = run_probe(write_toy_store(tmp_path / "random", images, "random", structure), "art-style")
    mean = np.mean([r["value"] for r in rand.table.to_pylist() if r["metric"] == "accuracy"])
    assert 0.35 < mean < 0.65


def test_paired_probe_errors(tmp_path):
    images, structure = art_questions(4)
    store = write_toy_store(tmp_path / "s", images, "oracle", structure)
    with pytest.raises(StoreError, match="no visual-similarity questions.*subtask=Visual_Similarity"):
        run_probe(store, "visual-similarity")
    with pytest.raises(UsageError, match="not a paired task"):
        paired_probe(store, "fg-seg")
    with pytest.raises(UsageError, match="tokens='middle'"):
        run_probe(store, "art-style", {"tokens": "middle"})
    cut = write_toy_store(tmp_path / "cut", images[:-1], "oracle", structure)  # last question loses an image
    assert [r["value"] for r in run_probe(cut, "art-style").table.to_pylist()
            if r["metric"] == "n_questions_skipped"] == [1.0]


def spair_questions(n: int = 20, seed: int = 0) -> tuple[list[ToyImage], dict]:
    """Source keypoint token labelled 1 + gold; candidate k's token labelled 1 + k; background 0.
    Points at token centres (PATCH px per token), images of GH x GW tokens."""
    rng = np.random.default_rng(seed)
    images, questions = [], []
    for k in range(n):
        src, tgt = np.zeros((GH, GW), np.uint8), np.zeros((GH, GW), np.uint8)
        cells = rng.choice(GH * GW, 5, replace=False)
        sr, sc = divmod(int(cells[0]), GW)
        gold = int(rng.integers(4))
        src[sr, sc] = 1 + gold
        cands = []
        for j, cell in enumerate(cells[1:]):
            r, c = divmod(int(cell), GW)
            tgt[r, c] = 1 + j
            cands.append([c * PATCH + 3.0, r * PATCH + 5.0])
        images += [ToyImage(f"cat/s{k}", src), ToyImage(f"cat/t{k}", tgt)]
        questions.append({"qid": f"pair{k}/kp0", "category": "cat", "source": f"cat/s{k}", "target": f"cat/t{k}",
                          "source_keypoint": [sc * PATCH + 4.0, sr * PATCH + 2.0], "candidates": cands,
                          "answer": gold, "target_bbox": [0, 0, GW * PATCH - 1, GH * PATCH - 1]})
    return images, {"questions": questions}


def test_spair_vqa_probe_oracle_and_random(tmp_path):
    images, structure = spair_questions()
    run = run_probe(write_toy_store(tmp_path / "o", images, "oracle", structure), "spair-vqa")
    assert accuracy(run, "values", 1, 0) == 1.0 and accuracy(run, "post_proj", -1, -1) == 1.0
    summary = {r["metric"]: r["value"] for r in run.table.to_pylist() if r["kind"] == "dataset"}
    assert summary["chance_accuracy"] == 0.25 and summary["shared_token_questions"] == 0
    images, structure = spair_questions(80, seed=3)
    rand = run_probe(write_toy_store(tmp_path / "r", images, "random", structure), "spair-vqa")
    mean = np.mean([r["value"] for r in rand.table.to_pylist() if r["metric"] == "accuracy"])
    assert 0.15 < mean < 0.35


# ------------------------------------------------------------------------------ Table 5
ANSWER_SCHEMA = pa.schema([("model", pa.string()), ("benchmark", pa.string()), ("condition", pa.string()),
                           ("qid", pa.string()), ("subset", pa.string()), ("text", pa.string()),
                           ("parsed", pa.string()), ("gold", pa.string()), ("correct", pa.bool_())])


def write_answers(path: Path, correct: dict[str, bool], benchmark: str = "blink") -> Path:
    """An answers.parquet as kvpipe answer writes it (pipeline/evaluate.py's columns)."""
    rows = [{"model": "m", "benchmark": benchmark, "condition": "none", "qid": q, "subset": "Art_Style",
             "text": "(A)" if ok else "(B)", "parsed": "A" if ok else "B", "gold": "A", "correct": ok}
            for q, ok in correct.items()]
    pq.write_table(pa.Table.from_pylist(rows, schema=ANSWER_SCHEMA), path)
    return path


def test_paired_table_equals_hand_counts(tmp_path):
    # values (oracle head 0) are right except on questions 3, 5, 6, whose recorded gold is the other option
    images, structure = art_questions(9, wrong=(2, 4, 5))
    store = write_toy_store(tmp_path / "s", images, "oracle", structure)
    value = [True, True, False, True, False, False, True, True]  # questions 1-8; question 9 has no MLM answer
    mlm = [True, False, True, True, False, False, False, True]
    answers = {f"val_Art_Style_{k + 1}": m for k, m in enumerate(mlm)}
    answers["val_Art_Style_99"] = True  # not in the store
    path = write_answers(tmp_path / "answers.parquet", answers)

    probe = paired_probe(store, "art-style")
    pairs = pair_answers(probe, Target("values", 1, 0), read_mlm_answers(path, "blink"))
    assert pairs.value_correct == value and pairs.mlm_correct == mlm
    assert (pairs.only_in_store, pairs.only_in_answers) == (1, 1)
    # by hand: both right q1 q4 q8; MLM only q3; values only q2 q7; neither q5 q6
    table = paired_table(pairs.mlm_correct, pairs.value_correct)
    assert table["counts"] == {"mlm_right_value_right": 3, "mlm_right_value_wrong": 1,
                               "mlm_wrong_value_right": 2, "mlm_wrong_value_wrong": 2}
    assert (table["mlm_right"], table["value_right_mlm_wrong"], table["value_wrong_mlm_right"],
            table["either_right"]) == (50.0, 25.0, 12.5, 75.0)

    out = tmp_path / "t5"
    proc = invoke("paired", "--store", str(store), "--task", "art-style", "--answers", str(path),
                  "--layer", "1", "--head", "0", "--out", str(out))
    assert "Value ✓ MLM ✗" in proc.stdout and "25.0" in proc.stdout
    got = {r["metric"]: r["value"] for r in pacsv.read_csv(out / "paired.csv").to_pylist()}
    assert got["n"] == 8 and got["mlm_wrong_value_right_count"] == 2 and got["mlm_right_value_wrong_count"] == 1
    assert got["either_right_pct"] == 75.0
    per_q = pq.read_table(out / "paired_questions.parquet").to_pylist()
    assert [r["value_correct"] for r in per_q] == value and [r["mlm_correct"] for r in per_q] == mlm

    # default: the best (layer, head) of the values sweep (the first maximum); wrong benchmark refused
    best = invoke("paired", "--store", str(store), "--task", "art-style", "--answers", str(path))
    sweep = [r for r in run_probe(store, "art-style").table.to_pylist()
             if r["kind"] == "values" and r["metric"] == "accuracy"]
    top = max(sweep, key=lambda r: r["value"])
    assert f"layer {top['layer']}, KV head {top['head']}, best of the sweep" in " ".join(best.stdout.split())
    other = write_answers(tmp_path / "pope.parquet", answers, benchmark="pope")
    proc = invoke("paired", "--store", str(store), "--task", "art-style", "--answers", str(other), check=False)
    assert proc.returncode == 2 and "benchmark 'pope'" in proc.stderr


# ------------------------------------------------------------------------------ Figure 3
def scores_csv(path: Path, rows: list[tuple[str, str, float]]) -> Path:
    table = pa.Table.from_pylist([{"model": "m", "benchmark": "b", "subset": s, "metric": m, "value": v}
                                  for s, m, v in rows])
    pacsv.write_csv(table, path)
    return path


def test_mlm_accuracy_from_score_files_by_hand(tmp_path):
    cv = scores_csv(tmp_path / "cv.csv", [("Count", "accuracy", 0.9), ("all", "accuracy", 0.6), ("all", "n", 10)])
    blink = scores_csv(tmp_path / "blink.csv", [("all", "accuracy", 0.3), ("all", "accuracy_pooled", 0.25),
                                                ("all", "n", 4)])
    assert file_accuracy(cv) == (pytest.approx(6.0), 10)
    assert file_accuracy(blink) == (pytest.approx(1.0), 4)  # BLINK: the pooled accuracy, not the task mean
    assert mlm_accuracy([str(cv), str(blink)])[0] == pytest.approx(7 / 14)
    assert mlm_accuracy([str(cv), str(blink)], "mean")[0] == pytest.approx((0.6 + 0.25) / 2)
    answers = write_answers(tmp_path / "answers.parquet", {"a": True, "b": False, "c": True})
    assert file_accuracy(answers) == (2.0, 3)
    pacsv.write_csv(pa.table({"x": [1]}), tmp_path / "x.csv")
    with pytest.raises(UsageError, match="neither"):
        file_accuracy(tmp_path / "x.csv")


def test_point_and_spec_parsing(tmp_path):
    p = parse_point("qwen 7B:s3://bucket/fg,/data/coseg:/r/cv.csv,/r/blink.csv")
    assert p.name == "qwen 7B" and p.stores == ("s3://bucket/fg", "/data/coseg")
    assert p.scores == ("/r/cv.csv", "/r/blink.csv")
    with pytest.raises(UsageError, match="NAME:STORE1"):
        parse_point("only-a-name")
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"points": [{"name": "a", "stores": ["x", "y"], "scores": "s.csv"}]}))
    assert read_spec(spec)[0].scores == ("s.csv",)
    spec.write_text(json.dumps([{"name": "a"}]))
    with pytest.raises(UsageError, match="point 0 needs"):
        read_spec(spec)


def best_values(store: str, task: str) -> float:
    """The best image-value score of a probe's results table, read independently of figure3."""
    metric = PROBES.get(task).primary_metric
    rows = pq.read_table(Path(store) / "probes" / task / "results.parquet").to_pylist()
    return max(r["value"] for r in rows if r["kind"] == "values" and r["metric"] == metric and r["layer"] >= 0)


def test_figure3_points_from_stores_and_score_files(tmp_path):
    oracle = seg_stores(tmp_path / "oracle", "oracle")
    noise = seg_stores(tmp_path / "noise", "random")
    cv = scores_csv(tmp_path / "cv.csv", [("all", "accuracy", 0.6), ("all", "n", 10)])
    blink = scores_csv(tmp_path / "blink.csv", [("all", "accuracy", 0.3), ("all", "accuracy_pooled", 0.25),
                                                ("all", "n", 4)])
    weak = scores_csv(tmp_path / "weak.csv", [("all", "accuracy", 0.2), ("all", "n", 5)])
    res = figure3([parse_point(f"strong:{','.join(oracle)}:{cv},{blink}"),
                   parse_point(f"weak:{','.join(noise)}:{weak}")], tmp_path / "fig")
    strong_row, weak_row = res.rows
    assert strong_row["x_segmentation"] == pytest.approx(1.0)  # oracle head 0 is perfect on all four
    assert strong_row["y_mlm_accuracy"] == pytest.approx(7 / 14) and strong_row["mlm_questions"] == 14
    expected = np.mean([best_values(s, t) for s, t in zip(noise, SEGMENTATION_TASKS)])
    assert weak_row["x_segmentation"] == pytest.approx(expected) and expected < 0.9
    assert weak_row["y_mlm_accuracy"] == pytest.approx(0.2)
    assert weak_row["fg-seg_at"].startswith("L0H") and weak_row["fg-seg_at"].endswith(noise[0])
    assert res.png.exists() and Image.open(res.png).size[0] > 100
    csv_rows = pacsv.read_csv(res.csv).to_pylist()
    assert [r["model"] for r in csv_rows] == ["strong", "weak"]
    # the command line: cached probe results, same numbers
    proc = invoke("figure3", "--point", f"weak:{','.join(noise)}:{weak}", "--out", str(tmp_path / "cli"))
    row = pacsv.read_csv(tmp_path / "cli" / "figure3.csv").to_pylist()[0]
    assert row["x_segmentation"] == pytest.approx(expected) and "figure3.png" in proc.stdout
    with pytest.raises(UsageError, match="no store among .* supports refexp-seg"):
        figure3([parse_point(f"x:{','.join(oracle[:3])}:{cv}")], tmp_path / "bad")


# ------------------------------------------------------------------------------ end to end
def test_extract_blink_then_probe_and_pair(tmp_path):
    root = make_blink(tmp_path / "BLINK")
    store = tmp_path / "store"
    invoke("extract", "--model", "tiny-qwen25vl", "--dataset", "blink", "--data-root", str(root),
           "--option", "subtask=Art_Style", "--out", str(store), "--multi-image", "--batch-size", "2",
           "--part-size", "4")  # question 2 straddles parts 0 and 1: both parts run it whole
    fs = FeatureStore.open(store)
    assert len(fs.images()) == 9 and fs.meta.dataset["tasks"] == ["art-style", "input-agnostic"]
    assert fs.meta.dataset["multi_image"] is True
    rows = sorted(fs.images(), key=lambda r: r.index)
    assert [(r.sequence, r.sequence_index) for r in rows] == [(f"val_Art_Style_{q}", j)
                                                              for q in (1, 2, 3) for j in range(3)]
    # each image's first token sits after the images before it (and their delimiters) in its prompt
    for a, b in zip(rows, rows[1:]):
        if a.sequence == b.sequence:
            assert b.sequence_offset >= a.sequence_offset + a.n_tokens
    invoke("probe", "--task", "art-style", "--store", str(store))
    rows = pacsv.read_csv(store / "probes" / "art-style" / "results.csv").to_pylist()
    acc = [r for r in rows if r["metric"] == "accuracy"]
    assert len(acc) == 2 * 2 * 2 + 1 and all(abs(3 * r["value"] - round(3 * r["value"])) < 1e-9 for r in acc)
    preds = pq.read_table(store / "probes" / "art-style" / PREDICTIONS)
    assert set(preds.column("qid").to_pylist()) == {"val_Art_Style_1", "val_Art_Style_2", "val_Art_Style_3"}
    answers = write_answers(tmp_path / "answers.parquet", {"val_Art_Style_1": True, "val_Art_Style_2": False,
                                                           "val_Art_Style_3": False})
    invoke("paired", "--store", str(store), "--task", "art-style", "--answers", str(answers))
    got = {r["metric"]: r["value"] for r in pacsv.read_csv(store / "probes" / "art-style" / "paired" /
                                                           "paired.csv").to_pylist()}
    assert got["n"] == 3 and got["mlm_right_pct"] == pytest.approx(100 / 3)

    single = tmp_path / "single"  # each image alone: the paired tasks refuse it, naming the flag
    invoke("extract", "--model", "tiny-qwen25vl", "--dataset", "blink", "--data-root", str(root),
           "--option", "subtask=Art_Style", "--out", str(single), "--limit", "3")
    assert {r.sequence for r in FeatureStore.open(single).images()} == {""}
    proc = invoke("paired", "--store", str(single), "--task", "art-style", "--answers", str(answers), check=False)
    assert proc.returncode == 2 and "--multi-image" in proc.stderr
    assert len([ln for ln in proc.stderr.splitlines() if ln.strip()]) == 1
    alone = run_probe(single, "art-style", {"images": "single"})  # explicitly: the images extracted alone
    assert {r["value"] for r in alone.table.to_pylist() if r["metric"] == "images_in_one_prompt"} == {0.0}
