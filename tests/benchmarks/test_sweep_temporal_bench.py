"""The probe-sweep benchmark's temporal-corr mode: a DAVIS-shaped store, the sweep on the
device path and through the replaced code, the read share, JSON."""

from __future__ import annotations

import json

import pytest

from fixtures.sweep_args import TINY

pytest.importorskip("torch")


def test_temporal_corr_sweep_against_the_replaced_code(tmp_path):
    from kvpipe.benchmarks import sweep

    out = tmp_path / "sweep.json"
    res = sweep.main(["--probe", "temporal-corr", "--out", str(tmp_path / "store"), "--images", "8", "--videos", "2",
                      "--grid", "6", "--layers", "1", "--heads", "1", "--head-dim", "8", "--hidden", "16",
                      "--mask-size", "64x40", "--part-size", "4", "--repeat", "1", "--baseline", "--device", "cpu",
                      "--json", str(out)])
    assert res["targets"] == 3 and res["device"] == "cpu" and res["images"] == 8
    for name in ("device", "baseline"):
        run = res["sweeps"][name][0]
        assert run["total_s"] >= run["compute_s"] > 0 and run["read_s"] > 0
    assert res["speedup_over_baseline"] > 0
    assert json.loads(out.read_text())["medians"]["device"]["total_s"] > 0




def test_all_six_table1_tasks_are_swept_and_summed_with_their_floors(tmp_path):
    from kvpipe.benchmarks import sweep
    from kvpipe.store import FeatureStore

    res = sweep.main(["--probe", "all", "--out", str(tmp_path / "stores"), *TINY, "--json", str(tmp_path / "a.json")])
    assert set(res["probes"]) == set(sweep.TABLE1) and len(sweep.TABLE1) == 6
    totals = {p: r["medians"][r["local"]]["total_s"] for p, r in res["probes"].items()}
    assert res["sum_s"]["local"] == sum(totals.values()) and all(v > 0 for v in totals.values())
    for probe, r in res["probes"].items():
        text = probe in ("semantic-seg", "refexp-seg")  # no post-proj target: text queries have K/V only
        assert r["targets"] == (2 if text else 3), probe
        f = r["floors"]
        assert f["flops"] > 0 and f["arithmetic_s"] == f["flops"] / (f["peak_tflops"] * 1e12)
        assert f["bandwidth_s"] > 0 and f["decoded_bytes"] == 12 * 16 * (2 * 8 + (0 if text else 16)) * 4
    # what each store holds for its probe
    refexp = FeatureStore.open(tmp_path / "stores" / "refexp-seg")
    assert len(refexp.text_queries()) == 12 * round(30 / 12)
    assert len(FeatureStore.open(tmp_path / "stores" / "fg-seg").structure()["episodes"]) == 10
    assert json.loads((tmp_path / "a.json").read_text())["sum_s"]["local"] == res["sum_s"]["local"]


def test_semantic_seg_flops_are_the_tokens_times_the_classes_of_each_image(tmp_path):
    from kvpipe.benchmarks import sweep
    from kvpipe.store import FeatureStore

    res = sweep.main(["--probe", "semantic-seg", "--out", str(tmp_path / "s"), *TINY, "--no-raw-read"])
    store = FeatureStore.open(tmp_path / "s")
    per_kind = sum(16 * len(r.meta_dict()["labels"]) for r in store.images())  # multiply-adds per dimension
    assert res["floors"]["flops"] == 2 * per_kind * 2 * 8  # keys + values of 1 layer x 1 head, head_dim 8
    assert "bandwidth_s" not in res["floors"]
