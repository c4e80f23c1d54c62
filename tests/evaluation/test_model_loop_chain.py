"""The model-in-the-loop chain keeps everything: `kvpipe answer` then `kvpipe intervene` with several
head sets into one folder (the baseline reused, every condition's scores kept, a rerun replacing
only its rows), model seed vs control seed, a store of another model refused, the provenance in
run.json and answers.parquet, and BLINK's sub-task spelled as `kvpipe extract` spells it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from fixtures.cli import Ran, ran
from fixtures.layouts_vqa import make_blink

from kvpipe.errors import UsageError
from kvpipe.pipeline.vqa import create_benchmark
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem

BENCH = "chain-vqa"


def _image(seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((56, 70, 3)) * 255).astype("uint8"))


class ChainVQA(Benchmark):
    """Four yes/no questions over procedural images, one subset."""

    description = "procedural yes/no questions for the knock-out chain tests"

    def items(self) -> list[VQAItem]:
        out = []
        for i in range(4):
            q = ["is there a red object ?", "is the cat left of the dog ?"][i % 2]
            out.append(VQAItem(qid=f"q{i}", benchmark=BENCH, subset="a", question=q, prompt=f"{q} answer yes or no .",
                               images=(lambda i=i: _image(i),), image_ids=(f"img{i}",), choices=(),
                               answer="yes" if i % 2 else "no"))
        return out[: self.limit] if self.limit else out

    def parse(self, it: VQAItem, text: str) -> str:
        return "yes" if "yes" in text.lower().split() else "no"

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        ok = [self.parse(it, predictions[it.qid]) == it.answer for it in items]
        return [{"subset": "all", "metric": "accuracy", "value": sum(ok) / len(ok)},
                {"subset": "all", "metric": "n", "value": len(ok)}]


if BENCH not in BENCHMARKS:
    BENCHMARKS.add(BENCH, ChainVQA)


def kvpipe(monkeypatch, capsys, *args: str, check: bool = True) -> Ran:
    return ran(*args, check=check)


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """tiny-qwen25vl over 6 synthetic images, with the input-agnostic probe's table."""
    from kvpipe.pipeline.extraction import ExtractConfig, extract
    from kvpipe.probes import run_probe

    out = tmp_path_factory.mktemp("chain") / "store"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=6))
    run_probe(out, "input-agnostic")
    table = rows(out / "probes" / "input-agnostic" / "results.parquet")
    variance = sorted(r["value"] for r in table if r["metric"] == "l2_variance" and r["kind"] == "keys")
    return out, float(np.median(variance))


def test_answer_then_three_head_sets_keep_everything(tmp_path, store, monkeypatch, capsys):
    path, threshold = store
    out = tmp_path / "run"
    answer = ["answer", "--model", "tiny-qwen25vl", "--benchmark", BENCH, "--out", str(out), "--max-new-tokens", "3"]
    kvpipe(monkeypatch, capsys, *answer)
    baseline_scores = (out / "scores.csv").read_text()
    baseline_log = (out / "answers.jsonl").read_text()
    answers = rows(out / "answers.parquet")
    assert [a["question"] for a in answers][:2] == ["is there a red object ?", "is the cat left of the dog ?"]
    assert answers[0]["prompt"] == "is there a red object ? answer yes or no ."
    run = json.loads((out / "run.json").read_text())
    assert run["provenance"]["command"].startswith("kvpipe answer --model tiny-qwen25vl")
    assert run["provenance"]["kvpipe_version"] and run["provenance"]["params"]["max_new_tokens"] == 3
    assert run["seed"] == 0 and run["limit"] is None and run["split"] is None and run["data_root"] is None
    assert run["checkpoint"] is None and run["revision"] is None and run["condition"]["name"] == "none"

    common = ["--model", "tiny-qwen25vl", "--store", str(path), "--layers", "0-1", "--threshold", repr(threshold),
              "--benchmark", BENCH, "--out", str(out), "--max-new-tokens", "3"]
    _, stdout, _ = kvpipe(monkeypatch, capsys, "intervene", "--heads", "input-agnostic,random,input-dependent",
                          "--control-seed", "2", *common)
    names = [f"input-agnostic-0-1-t{threshold:g}", f"random-0-1-seed2-t{threshold:g}",
             f"input-dependent-0-1-seed2-t{threshold:g}"]
    assert all(n in stdout for n in names)
    # the baseline of kvpipe answer is reused, neither recomputed nor replaced
    assert (out / "answers.jsonl").read_text() == baseline_log
    assert (out / "scores.csv").read_text() == baseline_scores
    table = rows(out / "knockout.parquet")
    assert [r["condition"] for r in table if r["metric"] == "accuracy"] == ["none", *names]
    assert (out / "knockout.csv").is_file()
    for n in names:
        cond = json.loads((out / n / "run.json").read_text())
        assert cond["provenance"]["command"].startswith("kvpipe intervene --heads input-agnostic,random")
        assert cond["provenance"]["params"]["control_seed"] == 2 and cond["provenance"]["params"]["seed"] == 0
        assert cond["info"]["condition"]["store"] == str(path)
        assert len(rows(out / n / "answers.parquet")) == 4

    # another control seed adds its condition; rerunning one condition replaces only its rows
    kvpipe(monkeypatch, capsys, "intervene", "--heads", "random", "--control-seed", "5", *common)
    kvpipe(monkeypatch, capsys, "intervene", "--heads", "input-agnostic", *common)
    again = rows(out / "knockout.parquet")
    seed5 = f"random-0-1-seed5-t{threshold:g}"
    assert [r["condition"] for r in again if r["metric"] == "accuracy"] == ["none", *names, seed5]
    assert len(again) == len(table) + 2
    assert [r for r in again if r["condition"] in names] == [r for r in table if r["condition"] in names]


def test_out_of_another_run_or_store_of_another_model_is_refused_before_answering(tmp_path, store, monkeypatch,
                                                                                   capsys):
    path, threshold = store
    out = tmp_path / "run"
    kvpipe(monkeypatch, capsys, "answer", "--model", "tiny-qwen25vl", "--benchmark", BENCH, "--limit", "2",
           "--out", str(out), "--max-new-tokens", "3")
    code, _, err = kvpipe(monkeypatch, capsys, "answer", "--model", "tiny-qwen25vl", "--benchmark", BENCH,
                          "--limit", "3", "--out", str(out), "--max-new-tokens", "3", check=False)
    assert code == 2 and "another run" in err and "limit" in err and len(err.strip().splitlines()) == 1
    common = ["--store", str(path), "--heads", "input-agnostic", "--layers", "0-1", "--threshold", repr(threshold),
              "--benchmark", BENCH, "--max-new-tokens", "3"]
    # --seed is the model seed: the store's model had seed 0, so seed 1 is another model
    other = tmp_path / "other"
    code, _, err = kvpipe(monkeypatch, capsys, "intervene", "--model", "tiny-qwen25vl", "--seed", "1", *common,
                          "--out", str(other), check=False)
    assert code == 2 and "another model" in err and "seed 1" in err and len(err.strip().splitlines()) == 1
    code, _, err = kvpipe(monkeypatch, capsys, "intervene", "--model", "tiny-llava-ov", *common,
                          "--out", str(other), check=False)
    assert code == 2 and "another model" in err and "tiny-llava-ov" in err
    assert not other.exists()  # refused before anything was answered
    # the baseline in OUT was made with --limit 2: intervene with another limit is refused up front
    code, _, err = kvpipe(monkeypatch, capsys, "intervene", "--model", "tiny-qwen25vl", *common, "--out", str(out),
                          check=False)
    assert code == 2 and "another run" in err and "limit" in err
    assert not any(p.is_dir() for p in out.iterdir())  # no condition folder was started


def test_model_seed_and_control_seed_are_distinct_options(monkeypatch, capsys):
    for command in ("answer", "intervene"):
        _, stdout, _ = kvpipe(monkeypatch, capsys, command, "--help")
        text = " ".join(stdout.split())
        assert "--seed" in text and "model seed" in text and "--model-seed" not in text
    _, stdout, _ = kvpipe(monkeypatch, capsys, "intervene", "--help")
    assert "--control-seed" in stdout


def test_blink_subtask_option_is_spelled_as_in_extract(tmp_path):
    root = str(make_blink(tmp_path / "BLINK"))
    by_option = create_benchmark("blink", root, subtask="Art_Style").items()
    by_split = create_benchmark("blink", root, split="Art_Style").items()  # --split keeps working
    as_extract = create_benchmark("blink", root, split="val", subtask="Art_Style").items()
    assert [it.qid for it in by_option] == [it.qid for it in by_split] == [it.qid for it in as_extract]
    assert {it.subset for it in by_option} == {"Art_Style"} and len(by_option) == 3
    assert len(create_benchmark("blink", root, subtask="paired").items()) == 5
    with pytest.raises(UsageError, match="different sub-tasks"):
        create_benchmark("blink", root, split="Art_Style", subtask="Visual_Similarity")
    with pytest.raises(UsageError, match="disagree"):
        create_benchmark("blink", root, split="val", data_split="test")
