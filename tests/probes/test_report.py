"""`kvpipe probe --task all` and `kvpipe report`: every supported task, one page with Table 1 and plots."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError
from kvpipe.probes import run_probe
from kvpipe.probes.report import best_row, build_report, flagged_heads, metric_statistics

from fixtures.cli import invoke
from fixtures.probe_stores import grid_segments, write_feature_store

GH, GW, PATCH = 4, 5, 8


def multi_task_store(path: Path, tasks: tuple[str, ...], with_pairs: bool = True) -> Path:
    """2 videos x 3 frames with object masks and keypoint pairs; random features (2 layers x 2 heads)."""
    rng = np.random.default_rng(11)
    images, masks = [], []
    for v in range(2):
        for t in range(3):
            m = np.zeros((GH * PATCH, GW * PATCH), np.uint8)
            m[8 + 4 * t: 24 + 4 * t, 8:24] = 1
            masks.append(m)
            images.append({"id": f"v{v}/{t}", "h": GH * PATCH, "w": GW * PATCH, "segments": grid_segments(GH, GW),
                           "feat": rng.standard_normal((GH * GW, 6)).astype(np.float32), "group": f"v{v}", "frame": t})
    pairs = [{"source": f"v{v}/0", "target": f"v{1 - v}/{t}", "source_kps": [[10, 10], [20, 15]],
              "target_kps": [[12, 11], [21, 19]], "target_bbox": [8, 8, 24, 24], "category": "box"}
             for v in range(2) for t in range(3)]
    return write_feature_store(path, images, {"pairs": pairs} if with_pairs else {}, layers=2, heads=2,
                               tasks=tasks, masks=masks)


@pytest.mark.plots
def test_probe_all_then_report(tmp_path):
    store = multi_task_store(tmp_path / "s", ("temporal-corr", "semantic-corr", "input-agnostic", "no-such-task"))
    proc = invoke("probe", "--task", "all", "--store", str(store))
    assert re.search(r"skipped\s+no-such-task", proc.stdout), proc.stdout
    for task in ("temporal-corr", "semantic-corr", "input-agnostic"):
        assert (store / "probes" / task / "results.parquet").exists(), proc.stdout
        assert (store / "probes" / task / "run.json").exists()
    assert "flagged" in proc.stdout  # input-agnostic is summarised as statistics, not a best head

    proc = invoke("report", "--store", str(store))
    page = store / "probes" / "report.md"
    assert str(page) in proc.stdout.replace("\n", "")
    text = page.read_text()
    assert "| representation | semantic-corr (pck) | temporal-corr (JF_mean) |" in text
    for label in ("Visual encoder (post-proj)", "LM image value (max)", "LM image key (max)"):
        assert f"| {label} |" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert "semantic-corr/semantic-corr-values-pck.png" in links
    assert "input-agnostic/input-agnostic-keys-pca.png" in links
    assert all((page.parent / link).is_file() for link in links)
    assert "threshold_" in text and "n_pairs: 6" in text and "alpha=0.1" in text
    assert "input_agnostic = 1 at (layer: KV heads) " in text  # Otsu always flags the lower class

    # results written elsewhere with --out, then reported from there
    run_probe(store, "semantic-corr", out_dir=tmp_path / "res" / "semantic-corr")
    other = build_report(store, results=tmp_path / "res")
    assert other == tmp_path / "res" / "report.md" and "semantic-corr/semantic-corr-values-pck.png" in other.read_text()

    # HTML elsewhere: image paths relative to the page
    html_page = build_report(store, tmp_path / "out" / "r.html")
    body = html_page.read_text()
    srcs = re.findall(r'<img src="([^"]+)"', body)
    assert srcs and all((html_page.parent / s).is_file() for s in srcs)
    assert body.startswith("<!DOCTYPE html>") and "<table>" in body


def test_probe_all_reports_failures_and_goes_on(tmp_path):
    store = multi_task_store(tmp_path / "s", ("semantic-corr", "input-agnostic"), with_pairs=False)
    res = invoke("probe", "--task", "all", "--store", str(store), "--param", "threshold=1.0", check=False)
    assert res.returncode == 1, res.stdout + res.stderr
    assert re.search(r"failed\s+semantic-corr: .*no keypoint pairs", res.stdout), res.stdout
    assert (store / "probes" / "input-agnostic" / "results.parquet").exists()
    res = invoke("probe", "--task", "all", "--store", str(store), "--param", "nope=1", check=False)
    assert res.returncode == 2 and "no task of --task all has parameter nope" in res.stderr, res.stderr


def test_report_without_results_is_a_store_error(tmp_path):
    store = multi_task_store(tmp_path / "s", ("semantic-corr",))
    with pytest.raises(StoreError, match="no probe results"):
        build_report(store)


@pytest.mark.plots
def test_cached_run_redraws_the_probes_own_plots(tmp_path):
    store = multi_task_store(tmp_path / "s", ("input-agnostic",))
    first = run_probe(store, "input-agnostic")
    again = run_probe(store, "input-agnostic", out_dir=tmp_path / "elsewhere")
    assert again.cached
    assert {p.name for p in again.plots} == {p.name for p in first.plots} >= {"input-agnostic-keys-pca.png"}
    assert again.table.equals(first.table)


@pytest.mark.plots
def test_no_plots_writes_tables_only_and_a_cached_run_draws_them(tmp_path):
    """--no-plots: the same table and rows, no figure; the next (cached) run draws them all."""
    store = multi_task_store(tmp_path / "s", ("input-agnostic",))
    bare = run_probe(store, "input-agnostic", plots=False)
    assert bare.plots == [] and not list(bare.out_dir.glob("*.png"))
    assert (bare.out_dir / "results.parquet").exists()
    drawn = run_probe(store, "input-agnostic")
    assert drawn.cached and drawn.table.equals(bare.table)
    assert {p.name for p in drawn.plots} >= {"input-agnostic-keys-pca.png", "input-agnostic-heatmap.png"}
    assert all(p.exists() for p in drawn.plots)


def test_results_dir_local_and_url():
    from kvpipe.probes.runner import results_dir

    assert results_dir(Path("/data/s1")) == Path("/data/s1/probes")
    assert results_dir("s3://bucket/stores/qwen davis") == Path("kvpipe-probes/bucket_stores_qwen_davis")


def test_table_helpers():
    rows = [{"kind": "values", "layer": 0, "head": 0, "metric": "m", "value": 0.2},
            {"kind": "values", "layer": 1, "head": 1, "metric": "m", "value": 0.7},
            {"kind": "values", "layer": 2, "head": 0, "metric": "m", "value": float("nan")},
            {"kind": "post_proj", "layer": -1, "head": -1, "metric": "m", "value": 0.5},
            {"kind": "keys", "layer": 0, "head": 0, "metric": "flag", "value": 1.0},
            {"kind": "keys", "layer": 0, "head": 1, "metric": "flag", "value": 0.0}]
    assert best_row(rows, "m", "values")["layer"] == 1
    assert best_row(rows, "m", "post_proj")["value"] == 0.5
    assert best_row(rows, "m", "keys") is None
    assert flagged_heads(rows + [{"kind": "keys", "layer": 3, "head": 2, "metric": "flag", "value": 1.0}],
                         "flag", "keys") == "0: 0; 3: 2"
    stats = {(s["metric"], s["kind"]): s for s in metric_statistics(rows)}
    assert stats[("flag", "keys")]["flagged"] == 1 and stats[("m", "values")]["flagged"] is None
    assert stats[("m", "values")]["n"] == 2 and stats[("m", "values")]["max"] == 0.7
