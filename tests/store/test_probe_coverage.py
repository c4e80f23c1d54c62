"""kvpipe probe on a store with parts pending: refused in one line unless --allow-incomplete,
and the coverage is recorded with the results."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest

from kvpipe.errors import StoreError
from kvpipe.probes.runner import run_probe
from kvpipe.store import layout

from fixtures.cli import invoke


@pytest.fixture
def incomplete(synthetic_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(synthetic_store, store, ignore=shutil.ignore_patterns("probes"))
    (store / layout.MANIFEST / "p000001.parquet").unlink()  # 8 of 24 images pending
    return store


def test_probe_refuses_an_incomplete_store(incomplete):
    with pytest.raises(StoreError) as err:
        run_probe(incomplete, "input-agnostic")
    msg = str(err.value)
    assert "incomplete: 2 of 3 parts committed (16 of 24 images)" in msg and "--allow-incomplete" in msg
    proc = invoke("probe", "--task", "input-agnostic", "--store", str(incomplete), check=False)
    errors = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("error:")]  # not the progress bar
    assert proc.returncode == 2 and len(errors) == 1 and "incomplete" in errors[0], proc.stdout + proc.stderr


def test_allow_incomplete_records_coverage(incomplete):
    run = run_probe(incomplete, "input-agnostic", allow_incomplete=True)
    want = {"images": 16, "images_total": 24, "parts": 2, "parts_total": 3}
    assert json.loads((run.out_dir / "run.json").read_text())["coverage"] == want
    meta = pq.read_schema(run.out_dir / "results.parquet").metadata
    assert json.loads(meta[b"kvpipe.coverage"]) == want
    cached = run_probe(incomplete, "input-agnostic", allow_incomplete=True)  # from the cache: recorded too
    assert cached.cached and json.loads((cached.out_dir / "run.json").read_text())["coverage"] == want
    proc = invoke("probe", "--task", "input-agnostic", "--store", str(incomplete), "--allow-incomplete")
    assert proc.returncode == 0


def test_complete_store_records_full_coverage(synthetic_store, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(synthetic_store, store, ignore=shutil.ignore_patterns("probes"))
    run = run_probe(store, "input-agnostic")
    assert json.loads((run.out_dir / "run.json").read_text())["coverage"] == \
        {"images": 24, "images_total": 24, "parts": 3, "parts_total": 3}
