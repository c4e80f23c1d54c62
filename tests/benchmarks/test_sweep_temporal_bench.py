"""The probe-sweep benchmark's temporal-corr mode: a DAVIS-shaped store, the sweep on the
device path and through the replaced code, the read share, JSON."""

from __future__ import annotations

import json

import pytest

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
