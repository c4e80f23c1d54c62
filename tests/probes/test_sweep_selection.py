"""Sweeping a subset of (layer, head, kind): the targets, the cache key, the plots, the errors,
and the reads one target ahead."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.base import Selection
from kvpipe.probes.runner import layer_head_matrix
from kvpipe.store import FeatureStore

from fixtures.video_stores import random_video_store


def store_4x3(path):
    return random_video_store(path, layers=4, heads=3, frames=4)


def test_selection_parses_ranges_and_refuses_what_the_store_lacks(tmp_path):
    meta = FeatureStore.open(store_4x3(tmp_path / "s")).meta
    sel = Selection.parse(meta, "0-1,3", "0,2", "values")
    assert (sel.layers, sel.heads, sel.kinds) == ((0, 1, 3), (0, 2), ("values",))
    assert Selection.parse(meta) == Selection()
    with pytest.raises(UsageError, match=r"--layers 0-13,20: 4-13, 20 not in the store, whose layers are 0-3") as e:
        Selection.parse(meta, "0-13,20")
    assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="KV heads are 0-2"):
        Selection.parse(meta, heads="5")
    with pytest.raises(UsageError, match="stored kinds: keys, values, post_proj"):
        Selection.parse(meta, kinds="hidden")
    with pytest.raises(UsageError, match="not an index"):
        Selection.parse(meta, "a-b")


@pytest.mark.plots
def test_subset_sweep_scores_only_the_selection_and_caches_apart(tmp_path):
    store = store_4x3(tmp_path / "s")
    meta = FeatureStore.open(store).meta
    sel = Selection.parse(meta, "1,3", "0,2", "values")
    part = run_probe(store, "temporal-corr", selection=sel, device="numpy")
    scored = {(r["kind"], r["layer"], r["head"]) for r in part.table.to_pylist() if r["kind"] != "dataset"}
    assert scored == {("values", l, h) for l in (1, 3) for h in (0, 2)}  # no keys, no post_proj
    record = json.loads((part.out_dir / "run.json").read_text())
    assert record["selection"] == {"layers": [1, 3], "heads": [0, 2], "kinds": ["values"]}
    assert {p.name for p in part.plots} == {"temporal-corr-values-JF_mean.png"}
    full = run_probe(store, "temporal-corr", device="numpy")
    assert not full.cached and len(full.table) > len(part.table)  # another cache entry
    again = run_probe(store, "temporal-corr", selection=sel, device="cpu")
    assert again.cached and again.table.equals(part.table)
    # the full sweep's matrix over the selection is the subset's; cells not swept stay NaN
    m = layer_head_matrix(part.table, "JF_mean", "values", meta.layers, meta.heads)
    assert np.isnan(m[[0, 2]]).all() and np.isnan(m[:, 1]).all() and np.isfinite(m[[1, 3]][:, [0, 2]]).all()
    np.testing.assert_array_equal(m[[1, 3]][:, [0, 2]],
                                  layer_head_matrix(full.table, "JF_mean", "values", meta.layers, meta.heads)
                                  [[1, 3]][:, [0, 2]])
    keys = {p.name for p in (store / "probes" / ".cache").glob("*.parquet")}
    assert len(keys) == 2
    assert pq.read_table(part.out_dir / "results.parquet").num_rows == len(part.table)


def test_prefetch_gives_the_same_table_and_reports_read_time(tmp_path):
    store = store_4x3(tmp_path / "s")
    ahead = run_probe(store, "temporal-corr", out_dir=tmp_path / "a", use_cache=False, device="numpy")
    inline = run_probe(store, "temporal-corr", out_dir=tmp_path / "b", use_cache=False, device="numpy",
                       prefetch=False)
    assert ahead.table.equals(inline.table)
    assert ahead.timings["read_s"] > 0 and ahead.timings["compute_s"] > 0
