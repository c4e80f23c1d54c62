"""Extraction end to end: store contents equal the model's cache, resume, failures."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpipe.errors import DataError, StoreError, UsageError
from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.extraction.config import parse_index_spec
from kvpipe.pipeline.models import load_model
from kvpipe.store import FeatureStore
from kvpipe.store import layout

from fixtures.cli import invoke
from fixtures.layouts_davis_folder import make_image_folder, make_tiny_davis


def store_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every array of every committed part + the manifest rows, for equality checks."""
    s = FeatureStore.open(path)
    out = {}
    for kind in s.meta.kinds:
        if kind == "post_proj":
            out[kind] = s.read(kind).data
        else:
            for l in s.meta.layers:
                for h in s.meta.heads:
                    out[f"{kind}{l}.{h}"] = s.read(kind, l, h).data
    out["rows"] = np.array([repr((r.image_id, r.part, r.status, r.token_offset, r.n_tokens, r.segments,
                                  r.mask_offset, r.meta)) for r in s.rows])
    return out


def assert_same_store(a: Path, b: Path) -> None:
    x, y = store_arrays(a), store_arrays(b)
    assert x.keys() == y.keys()
    for k in x:
        np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_store_equals_model_cache(synthetic_store):
    s = FeatureStore.open(synthetic_store)
    assert len(s.images()) == 24 and s.complete
    adapter = load_model("tiny-qwen25vl")
    ds = create_dataset("synthetic")
    rec = ds.records()[5]
    batch = adapter.preprocess([rec.image()])
    with torch.no_grad():
        cache = adapter.model(**batch.inputs, use_cache=True).past_key_values
    pos = batch.layouts[0].positions
    row = next(r for r in s.images() if r.image_id == rec.image_id)
    i = s.images().index(row)
    for layer in s.meta.layers:
        for head in s.meta.heads:
            got = s.read("values", layer, head).image(i)
            np.testing.assert_allclose(got, cache.layers[layer].values[0, head, pos].numpy(), atol=1e-6, rtol=0)
            got = s.read("keys", layer, head).image(i)
            np.testing.assert_allclose(got, cache.layers[layer].keys[0, head, pos].numpy(), atol=1e-6, rtol=0)
    assert list(s.meta.prefix_token_ids) == batch.prefix_ids[0]
    assert (row.grid_h, row.grid_w) == (batch.layouts[0].base.rows, batch.layouts[0].base.cols)
    assert row.group == rec.group and row.frame == rec.frame
    np.testing.assert_array_equal(s.annotation(row).mask, rec.annotation().mask)


def test_rerun_of_complete_store_does_nothing(synthetic_store):
    before = {p: p.stat().st_mtime_ns for p in (synthetic_store / layout.MANIFEST).iterdir()}
    res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(synthetic_store),
                                batch_size=4, part_size=8))
    assert res.parts_done == 0 and res.parts_skipped == 3
    assert before == {p: p.stat().st_mtime_ns for p in (synthetic_store / layout.MANIFEST).iterdir()}


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_equals_uninterrupted(tmp_path):
    args = ["extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--limit", "40",
            "--batch-size", "2", "--part-size", "2"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "kvpipe.cli", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    manifest = killed / layout.MANIFEST
    deadline = time.time() + 120
    while time.time() < deadline and not (manifest.exists() and any(manifest.glob("*.parquet"))):
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p.name for p in manifest.glob("*.parquet")}
    assert 1 <= len(done_before) < 20, "the run must be killed part-way"
    mtimes = {p.name: p.stat().st_mtime_ns for p in manifest.glob("*.parquet")}
    invoke(*args, "--out", str(killed))  # the rerun and the uninterrupted run need no process of their own
    assert all((manifest / n).stat().st_mtime_ns == t for n, t in mtimes.items()), "finished parts were redone"
    assert not any((killed / layout.STAGING).iterdir())
    clean = tmp_path / "clean"
    invoke(*args, "--out", str(clean))
    assert_same_store(killed, clean)


def test_davis_layout_extracts(tmp_path):
    root = make_tiny_davis(tmp_path / "DAVIS")
    out = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="davis", data_root=str(root), out=str(out),
                          batch_size=2, part_size=4))
    s = FeatureStore.open(out)
    assert set(s.groups()) == {"bear", "car-turn"}
    assert all(s.annotation(r).mask is not None for r in s.images())


def test_corrupt_image_is_recorded_and_strict_fails(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=3, corrupt=1)
    out = tmp_path / "s"
    res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root), out=str(out),
                                batch_size=2, part_size=2))
    assert res.images_ok == 3 and res.images_failed == 1
    s = FeatureStore.open(out)
    failed = [r for r in s.images(ok_only=False) if not r.ok]
    assert len(failed) == 1 and "cannot read image" in failed[0].error
    with pytest.raises(DataError, match="--strict"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="folder", data_root=str(root),
                              out=str(tmp_path / "strict"), batch_size=2, part_size=2, strict=True))


def test_subset_of_layers_heads_kinds_and_bf16(tmp_path):
    out = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=4, layers="-1",
                          heads="1", kinds="values", store_dtype="bfloat16", keys="pre-rope"))
    s = FeatureStore.open(out)
    assert s.meta.layers == (1,) and s.meta.heads == (1,) and s.meta.kinds == ("values",)
    v = s.read("values", 1, 1).data
    assert v.dtype == np.float32 and np.array_equal(v, torch.from_numpy(v).bfloat16().float().numpy())
    with pytest.raises(StoreError, match="no 'keys'"):
        s.read("keys", 1, 1)


def test_store_with_other_options_is_refused(synthetic_store):
    with pytest.raises(StoreError, match="holds another feature set"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(synthetic_store),
                              prefix="a video frame", batch_size=4, part_size=8))


@pytest.mark.parametrize("spec,n,expected", [("all", 3, (0, 1, 2)), ("0-1", 4, (0, 1)), ("-1", 4, (3,)),
                                             ("2,0", 4, (0, 2))])
def test_index_spec(spec, n, expected):
    assert parse_index_spec(spec, n, "--layers") == expected


def test_bad_specs_and_options():
    with pytest.raises(UsageError, match="--layers '7'.*model has 2"):
        parse_index_spec("7", 2, "--layers")
    with pytest.raises(UsageError, match="multiple of --batch-size"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out="x", batch_size=3, part_size=4))
