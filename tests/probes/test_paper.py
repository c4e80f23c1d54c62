"""`kvpipe paper`: the paper's tables and figures from probe results, the paper's numbers beside."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.paper import parse_renames, write_paper
from kvpipe.probes.paper_data import DATA_DIR

from fixtures.cli import invoke
from fixtures.probe_stores import seg_stores
from fixtures.video_stores import random_video_store

TABLES = ("table1", "table2", "table4", "table5", "table6")
FIGURES = ("figure2", "figure3", "figure11")


def transcription(name: str) -> dict[tuple[str, str], str]:
    """The data file read independently of kvpipe: {(row, column): value text}."""
    with (DATA_DIR / f"{name}.csv").open(encoding="utf-8", newline="") as f:
        return {(r["row"], r["column"]): r["value"] for r in csv.DictReader(f)}


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def write_results(store: Path, task: str, rows: list[tuple[str, int, int, str, float]]) -> None:
    """A results table as kvpipe probe writes it: (kind, layer, head, metric, value) rows."""
    out = store / "probes" / task
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist([{"model": "m", "dataset": "d", "task": task, "layer": l, "head": h,
                                          "kind": k, "metric": m, "value": v} for k, l, h, m, v in rows]),
                   out / "results.parquet")


def edit_meta(store: Path, **changes) -> Path:
    """Set metadata fields of a test store (dataset name/options, prefix choice, model name)."""
    meta_file = store / "zarr.json"
    data = json.loads(meta_file.read_text())
    kv = data["attributes"]["kvpipe"]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            kv.setdefault(section, {})[field] = value
        else:
            kv[section] = value
    meta_file.write_text(json.dumps(data))
    return store


@pytest.fixture(scope="module")
def probed_seg_stores(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("seg")
    stores = seg_stores(root, "oracle")
    for path, task in zip(stores, ("fg-seg", "cosegmentation", "semantic-seg", "refexp-seg")):
        run_probe(path, task)
    return stores


def test_paper_writes_every_table_and_figure_with_the_papers_numbers(probed_seg_stores, tmp_path):
    out = tmp_path / "paper"
    result = write_paper(probed_seg_stores, out, renames={"toy-features": "llava-ov"})
    for name in TABLES + FIGURES:
        for ext in ("md", "csv", "png"):
            assert (out / f"{name}.{ext}").is_file(), f"{name}.{ext}"
    assert (out / "run.json").is_file()
    t1 = read_csv(out / "table1.csv")
    assert list(t1[0]) == ["table", "row", "column", "value", "paper", "where"]
    rows = list(dict.fromkeys(r["row"] for r in t1))
    assert rows == ["Visual Encoder (post-proj)", "LM Image Value (max)", "SigLIP without MLM FT"]
    assert len(t1) == 3 * 8
    for name in TABLES:
        paper = transcription(name)
        got = {(r["row"], r["column"]): r["paper"] for r in read_csv(out / f"{name}.csv")}
        for key, value in paper.items():  # every transcribed number stands beside its cell
            assert key in got, (name, key)
            assert (float(got[key]) if got[key] else None) == (float(value) if value else None), (name, key)
    cells = {(r["row"], r["column"]): r for r in t1}
    # oracle features: the segmentation cells are filled from the probe results, the rest missing
    for col in ("Pascal-5i mIoU", "MSRC J_m", "ImageNet-S mIoU", "RefCOCO mIoU"):
        assert cells[("LM Image Value (max)", col)]["value"] != ""
    for col in ("SPair-71K PCK", "DAVIS J&F_m"):
        assert cells[("LM Image Value (max)", col)]["value"] == ""  # missing, not zero
    assert cells[("SigLIP without MLM FT", "Pascal-5i mIoU")]["value"] == ""
    best = max(r["value"] for r in pq.read_table(Path(probed_seg_stores[0]) / "probes/fg-seg/results.parquet")
               .to_pylist() if r["kind"] == "values" and r["metric"] == "mIoU" and r["layer"] >= 0)
    assert float(cells[("LM Image Value (max)", "Pascal-5i mIoU")]["value"]) == pytest.approx(100 * best)
    md = (out / "table1.md").read_text()
    assert "| row | Pascal-5i mIoU | paper |" in md and "24.2" in md
    assert result.tables["table6"].cell("LLaVA-OneVision 7B", "Average").value is not None
    assert (out / "figure11.csv").is_file() and "figure-seg-" not in " ".join(p.name for p in out.iterdir())


def test_cells_by_hand_davis_j_and_f_at_the_jf_best_head_and_table6_average(tmp_path):
    davis = random_video_store(tmp_path / "davis", layers=2, heads=2, frames=3)
    write_results(davis, "temporal-corr", [
        ("values", 0, 0, "JF_mean", 0.50), ("values", 0, 0, "J_mean", 0.90), ("values", 0, 0, "F_mean", 0.10),
        ("values", 1, 1, "JF_mean", 0.60), ("values", 1, 1, "J_mean", 0.55), ("values", 1, 1, "F_mean", 0.65),
        ("post_proj", -1, -1, "JF_mean", 0.40), ("post_proj", -1, -1, "J_mean", 0.30),
        ("post_proj", -1, -1, "F_mean", 0.50)])
    result = write_paper([str(davis)], tmp_path / "out", renames={"hand-features": "llava-ov"})
    t1 = result.tables["table1"]
    # J and F of the J&F-best head (L1 H1), not their own maxima (0.90 at L0 H0)
    assert t1.cell("LM Image Value (max)", "DAVIS J&F_m").value == pytest.approx(60.0)
    assert t1.cell("LM Image Value (max)", "DAVIS J_m").value == pytest.approx(55.0)
    assert t1.cell("LM Image Value (max)", "DAVIS F_m").value == pytest.approx(65.0)
    assert t1.cell("Visual Encoder (post-proj)", "DAVIS J_m").value == pytest.approx(30.0)
    assert "L1 H1" in t1.cell("LM Image Value (max)", "DAVIS J_m").where
    assert result.tables["table2"].cell("LM Image Value (max)", "DAVIS F_m").value == pytest.approx(65.0)
    assert result.tables["table2"].cell("DINO", "DAVIS J&F_m").value is None
    assert result.tables["table2"].cell("DINO", "DAVIS J&F_m").paper == 71.4
    # Table 6's average needs all four tasks: none of them here
    assert result.tables["table6"].cell("LLaVA-OneVision 7B", "Average").value is None


def test_table6_average_and_figure2_panels_by_hand(tmp_path):
    stores = []
    for task, base in (("fg-seg", 0.1), ("cosegmentation", 0.3), ("semantic-seg", 0.5), ("refexp-seg", 0.7)):
        s = random_video_store(tmp_path / task, layers=2, heads=2, frames=2)
        edit_meta(s, dataset__tasks=[task], model__name="m7b")
        write_results(s, task, [("values", l, h, PRIMARY[task], base + 0.1 * l + 0.01 * h)
                                for l in range(2) for h in range(2)])
        stores.append(str(s))
    result = write_paper(stores, tmp_path / "out")
    t6 = result.tables["table6"]
    row = "LM Image Value (max) [m7b]"
    # best of each task: base + 0.11 -> 21, 41, 61, 81 percent; average 51
    assert t6.cell(row, "Pascal-5i mIoU").value == pytest.approx(21.0)
    assert t6.cell(row, "Average").value == pytest.approx((21 + 41 + 61 + 81) / 4)
    assert t6.cell(row, "Average").paper is None  # not the paper's model
    fig = {(r["panel"], int(r["layer"]), int(r["head"])): float(r["value"])
           for r in read_csv(tmp_path / "out" / "figure2.csv") if r["model"] == "m7b"}
    # plain mean over the four tasks per (layer, head): (10+30+50+70)/4 + 10 l + h
    assert fig[("segmentation", 1, 1)] == pytest.approx(40 + 10 + 1)
    assert fig[("segmentation", 0, 0)] == pytest.approx(40)
    assert (tmp_path / "out" / "figure-seg-m7b.png").is_file()
    mm = write_paper(stores, tmp_path / "mm", normalise="minmax")
    fig = {(r["panel"], int(r["layer"]), int(r["head"])): float(r["value"])
           for r in read_csv(tmp_path / "mm" / "figure2.csv") if r["model"] == "m7b"}
    assert fig[("segmentation", 0, 0)] == pytest.approx(0.0) and fig[("segmentation", 1, 1)] == pytest.approx(1.0)
    assert len(mm.tables) == 5


PRIMARY = {"fg-seg": "mIoU", "cosegmentation": "J_m", "semantic-seg": "mIoU", "refexp-seg": "mIoU"}


def test_table4_rows_by_prefix_condition(tmp_path):
    stores = []
    for control, value in ((None, 0.40), ("none", 0.45), ("random", 0.39), ("incorrect", 0.35)):
        s = random_video_store(tmp_path / f"spair-{control}", layers=1, heads=2, frames=2)
        edit_meta(s, dataset__tasks=["semantic-corr"], dataset__name="spair", model__name="llava-ov",
                  **({"prefix_choice": {"source": "class", "control": control, "seed": 0}} if control else {}))
        write_results(s, "semantic-corr", [("values", 0, 0, "pck", value), ("values", 0, 1, "pck", value / 2)])
        stores.append(str(s))
    result = write_paper([stores[0]], tmp_path / "out", prefix_stores=stores[1:])
    t4 = result.tables["table4"]
    assert t4.rows == ["No prefixing", "Prefixing", "Prefixing-random", "Prefixing-incorrect"]
    assert [t4.cell(r, "SPair-71K PCK").value for r in t4.rows] == pytest.approx([40.0, 45.0, 39.0, 35.0])
    assert [t4.cell(r, "SPair-71K PCK").paper for r in t4.rows] == [46.1, 46.5, 45.8, 44.9]
    assert t4.cell("Prefixing-incorrect", "RefCOCO mIoU").paper is None  # the paper prints "-"
    assert t4.cell("Prefixing", "BDD-10K night+highway mIoU").value is None


def test_wrong_store_for_a_table_is_one_line(tmp_path):
    davis = random_video_store(tmp_path / "davis", layers=1, heads=2, frames=2)
    edit_meta(davis, dataset__name="davis")
    with pytest.raises(UsageError, match=r"--prefix-stores .*davis store \(temporal-corr\) fits no column of "
                                         r"Table 4.*pass it with --stores instead") as err:
        write_paper([], tmp_path / "out", prefix_stores=[str(davis)])
    assert "\n" not in str(err.value)
    prefixed = edit_meta(random_video_store(tmp_path / "p", layers=1, heads=2, frames=2),
                         dataset__name="spair", dataset__tasks=["semantic-corr"],
                         prefix_choice={"source": "class", "control": "none", "seed": 0})
    with pytest.raises(UsageError, match=r"--stores .* with a prefix.*--prefix-stores"):
        write_paper([str(prefixed)], tmp_path / "out")
    with pytest.raises(UsageError, match=r"--results .*neither a kvpipe paired folder"):
        write_paper([], tmp_path / "out", results=[str(tmp_path)])
    with pytest.raises(UsageError, match=r"--paper-model"):
        parse_renames(["no-equals-sign"])
    with pytest.raises(UsageError, match=r"--normalise"):
        write_paper([str(davis)], tmp_path / "out", normalise="zscore")


def test_table5_and_figure3_from_results_folders(tmp_path):
    paired = tmp_path / "paired"
    paired.mkdir()
    metrics = {"mlm_right_pct": 50.0, "value_right_mlm_wrong_pct": 30.0, "value_wrong_mlm_right_pct": 5.0,
               "either_right_pct": 80.0, "n": 20.0}
    with (paired / "paired.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "dataset", "task", "kind", "layer", "head", "subset", "metric", "value"])
        for m, v in metrics.items():
            w.writerow(["llava-ov", "blink", "art-style", "values", 3, 1, "all", m, v])
    fig3 = tmp_path / "fig3"
    fig3.mkdir()
    (fig3 / "figure3.csv").write_text("model,x_segmentation,y_mlm_accuracy\nllava-ov,0.5,0.6\nother,0.4,0.5\n")
    result = write_paper([], tmp_path / "out", results=[str(paired), str(fig3)])
    t5 = result.tables["table5"]
    assert t5.cell("MLM ✓", "Art Style (%)").value == 50.0
    assert t5.cell("Value ✓ MLM ✗", "Art Style (%)").value == 30.0
    assert t5.cell("(MLM ∪ Value) ✓", "Art Style (%)").paper == 87.1
    assert t5.cell("MLM ✓", "Visual Similarity (%)").value is None
    rows = {r["model"]: r for r in read_csv(tmp_path / "out" / "figure3.csv")}
    assert float(rows["llava-ov"]["x_segmentation"]) == pytest.approx(50.0)
    assert float(rows["llava-ov"]["paper_x"]) == 51.8  # Table 6's Average of LLaVA-OneVision 7B
    assert rows["other"]["paper_x"] == ""


def test_cli_paper(probed_seg_stores, tmp_path):
    out = tmp_path / "cli"
    proc = invoke("paper", "--stores", ",".join(probed_seg_stores), "--out", out,
                  "--paper-model", "toy-features=llava-ov")
    assert "table1:" in proc.stdout and (out / "table6.md").is_file()
    bad = invoke("paper", "--stores", probed_seg_stores[0], "--out", out, "--results", str(tmp_path), check=False)
    assert bad.returncode != 0 and "neither a kvpipe paired folder" in bad.stderr + bad.stdout
