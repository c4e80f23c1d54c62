"""Results that belong together are checked, and every results folder says how it was made:
`kvpipe paired` refuses answers of another model or copy of the data than the store's, `kvpipe
figure3` refuses score files of another model or of a knock-out, `figure3` and `report-prefix`
take --param to pick cached probe results, `report-prefix` writes its table, and each writes a
run.json with the kvpipe version, the command line and every parameter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pytest

from fixtures.cli import Ran, ran
from fixtures.layouts_vqa import make_blink
from fixtures.probe_stores import refexp_images, seg_stores, write_toy_store

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.figure3 import figure3, parse_point, task_params


def kvpipe(monkeypatch, capsys, *args: str, check: bool = True) -> Ran:
    return ran(*args, check=check)


def test_paired_checks_model_and_data_and_records_provenance(tmp_path, monkeypatch, capsys):
    root = make_blink(tmp_path / "BLINK")
    store = tmp_path / "store"
    kvpipe(monkeypatch, capsys, "extract", "--model", "tiny-qwen25vl", "--dataset", "blink", "--data-root", str(root),
           "--option", "subtask=Art_Style", "--out", str(store), "--multi-image")
    answer = ["answer", "--benchmark", "blink", "--data-root", str(root), "--option", "subtask=Art_Style",
              "--max-new-tokens", "2"]
    kvpipe(monkeypatch, capsys, *answer, "--model", "tiny-qwen25vl", "--out", str(tmp_path / "ans"))
    out = tmp_path / "t5"
    _, stdout, _ = kvpipe(monkeypatch, capsys, "paired", "--store", str(store), "--task", "art-style", "--answers",
                          str(tmp_path / "ans" / "answers.parquet"), "--out", str(out))
    assert "MLM ✓" in stdout
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("kvpipe paired --store") and run["kvpipe_version"]
    assert run["params"]["task"] == "art-style" and run["model"]["name"] == "tiny-qwen25vl"
    assert run["dataset"]["name"] == "blink" and run["answers_run"]["benchmark"] == "blink"
    assert run["answers_run"]["options"] == {"subtask": "Art_Style"} and run["target"]["how"] == "best of the sweep"

    # answers of another model (the model seed makes tiny weights) are refused before any probe runs
    kvpipe(monkeypatch, capsys, *answer, "--model", "tiny-qwen25vl", "--seed", "1", "--out", str(tmp_path / "ans1"))
    code, _, err = kvpipe(monkeypatch, capsys, "paired", "--store", str(store), "--task", "art-style", "--answers",
                          str(tmp_path / "ans1" / "answers.parquet"), "--out", str(tmp_path / "x"), check=False)
    assert code == 2 and "another model" in err and len(err.strip().splitlines()) == 1
    # answers to another copy of BLINK than the store's
    copy = tmp_path / "BLINK2"
    shutil.copytree(root, copy)
    kvpipe(monkeypatch, capsys, "answer", "--benchmark", "blink", "--data-root", str(copy), "--option",
           "subtask=Art_Style", "--max-new-tokens", "2", "--model", "tiny-qwen25vl", "--out", str(tmp_path / "ans2"))
    code, _, err = kvpipe(monkeypatch, capsys, "paired", "--store", str(store), "--task", "art-style", "--answers",
                          str(tmp_path / "ans2" / "answers.parquet"), "--out", str(tmp_path / "x"), check=False)
    assert code == 2 and "one copy of the data" in err
    assert not (tmp_path / "x").exists()


def scores_with_run(folder: Path, run: dict | None) -> Path:
    folder.mkdir(parents=True)
    pacsv.write_csv(pa.Table.from_pylist([{"model": "m", "benchmark": "cvbench", "subset": s, "metric": m, "value": v}
                                          for s, m, v in (("all", "accuracy", 0.5), ("all", "n", 4))]),
                    folder / "scores.csv")
    if run is not None:
        (folder / "run.json").write_text(json.dumps(run))
    return folder / "scores.csv"


def test_figure3_refuses_scores_of_another_model_or_a_knockout_and_takes_params(tmp_path, monkeypatch, capsys):
    stores = seg_stores(tmp_path / "stores", "oracle")
    same = scores_with_run(tmp_path / "same", {"model": "toy-features", "checkpoint": None, "benchmark": "cvbench",
                                               "condition": {"name": "none", "heads": []}})
    other = scores_with_run(tmp_path / "other", {"model": "tiny-llava-ov", "checkpoint": None, "init": "random",
                                                 "seed": 0, "benchmark": "cvbench"})
    knocked = scores_with_run(tmp_path / "ko", {"model": "toy-features", "benchmark": "cvbench",
                                                "condition": {"name": "input-agnostic-late", "heads": [[0, 1]]}})
    with pytest.raises(UsageError, match="another model"):
        figure3([parse_point(f"toy:{','.join(stores)}:{same},{other}")], tmp_path / "f")
    with pytest.raises(UsageError, match="knock-out 'input-agnostic-late'"):
        figure3([parse_point(f"toy:{','.join(stores)}:{knocked}")], tmp_path / "f")
    assert not (tmp_path / "f").exists()  # refused before any probe ran

    assert task_params({"shots": 1, "refexp-seg.threshold": 0.3}, ["fg-seg", "refexp-seg"]) == {
        "fg-seg": {"shots": 1}, "refexp-seg": {"threshold": 0.3}}
    with pytest.raises(UsageError, match="none of"):
        task_params({"nope": 1}, ["fg-seg"])
    out = tmp_path / "fig"
    _, stdout, _ = kvpipe(monkeypatch, capsys, "figure3", "--point", f"toy:{','.join(stores)}:{same}",
                          "--param", "threshold=0.4", "--param", "fg-seg.shots=1", "--out", str(out))
    run = json.loads((out / "run.json").read_text())
    assert run["command"].startswith("kvpipe figure3 --point toy:") and run["kvpipe_version"]
    assert run["probe_params"] == {"fg-seg": {"shots": 1, "threshold": 0.4}, "semantic-seg": {"threshold": 0.4},
                                   "refexp-seg": {"threshold": 0.4}}
    assert run["points"][0]["score_runs"][str(same)]["benchmark"] == "cvbench"
    assert run["points"][0]["stores"][stores[0]]["dataset"]["name"] == "toy"
    # the probes ran with those parameters: their cached results are the ones kvpipe probe --param reads
    assert run_probe(stores[0], "fg-seg", {"shots": 1, "threshold": 0.4}).cached


def test_report_prefix_reads_the_cached_results_of_params_and_writes_its_table(tmp_path, monkeypatch, capsys):
    images, structure, queries, classes = refexp_images()
    store = write_toy_store(tmp_path / "s", images, "oracle", structure, queries, classes, layers=1)
    data = json.loads((store / "zarr.json").read_text())
    data["attributes"]["kvpipe"]["dataset"]["tasks"] = ["refexp-seg"]
    (store / "zarr.json").write_text(json.dumps(data))
    run_probe(store, "refexp-seg", {"threshold": 0.99})
    run_probe(store, "refexp-seg")  # the latest run: default parameters
    code, _, err = kvpipe(monkeypatch, capsys, "report-prefix", "--store", str(store), "--task", "refexp-seg",
                          "--param", "threshold=0.3", "--out", str(tmp_path / "r"), check=False)
    assert code == 2 and "no cached refexp-seg results with --param threshold=0.3" in err
    out = tmp_path / "report"
    kvpipe(monkeypatch, capsys, "report-prefix", "--store", str(store), "--task", "refexp-seg", "--param",
           "threshold=0.99", "--out", str(out))
    picked = pacsv.read_csv(out / "report_prefix.csv").to_pylist()
    kvpipe(monkeypatch, capsys, "report-prefix", "--store", str(store), "--task", "refexp-seg", "--out",
           str(tmp_path / "latest"))
    latest = pacsv.read_csv(tmp_path / "latest" / "report_prefix.csv").to_pylist()
    assert picked[0]["condition"] == latest[0]["condition"] == "No prefixing"
    assert picked[0]["value"] < latest[0]["value"]  # a 0.99 threshold segments worse than 0.5
    md = (out / "report_prefix.md").read_text().splitlines()
    assert md[0].startswith("| condition | task | metric") and "No prefixing" in md[2]
    run = json.loads((out / "run.json").read_text())
    assert run["probe_params"] == {"threshold": 0.99} and run["command"].startswith("kvpipe report-prefix")
