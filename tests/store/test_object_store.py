"""Stores on an S3-compatible server (moto's server mode on loopback) through fsspec URLs."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore, layout
from kvpipe.store.fs import ObjectLocation
from kvpipe.store.verify import verify_store

from fixtures.store_equality import assert_identical_stores

KW = dict(model="tiny-qwen25vl", dataset="synthetic", limit=12, batch_size=2, part_size=2)


@pytest.fixture(scope="module")
def local_ref(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("s3ref") / "local"
    extract(ExtractConfig(out=str(out), **KW))
    return out


def check_consistent(url: str) -> int:
    """Open the store as a reader would; every part it lists must be whole. Returns #parts."""
    s = FeatureStore.open(url)
    for part in s.committed_parts:
        rows = [r for r in s.rows if r.part == part]
        assert len(rows) == 2, f"part {part} listed with {len(rows)} rows"
    if s.rows:
        for kind in ("keys", "values"):
            f = s.read(kind, 1, 1)
            assert f.data.shape[0] == sum(r.n_tokens for r in s.images())
        assert s.read("post_proj").data.shape[0] == sum(r.n_tokens for r in s.images())
    return len(s.committed_parts)


def test_s3_store_equals_local_and_verifies(s3_server, local_ref):
    url = "s3://kvpipe-test/stores/eq"
    res = extract(ExtractConfig(out=url, **KW))
    assert res.parts_done == 6
    assert_identical_stores(local_ref, url)
    report = verify_store(url)
    assert report.ok and report.parts_checked == 6
    loc = ObjectLocation(url)
    # parts sit under unique names that their records point to; nothing is left staged
    dirs = loc.listdir(layout.PARTS)
    assert len(dirs) == 6 and all(d.startswith("p0000") and "-" in d for d in dirs)
    assert not loc.listdir(layout.STAGING)
    s = FeatureStore.open(url)
    np.testing.assert_array_equal(s.text("values", 1, 0), FeatureStore.open(local_ref).text("values", 1, 0))
    assert s.structure() == FeatureStore.open(local_ref).structure()
    # rerun: nothing to do
    assert extract(ExtractConfig(out=url, **KW)).parts_skipped == 6
    # a flipped byte in one chunk object: verify names the part, --repair redoes only it
    part_dir = FeatureStore.open(url).data_dir(4)
    chunk = sorted(k for k in loc.files(part_dir) if k.startswith("keys/c/"))[0]
    data = bytearray(loc.read_bytes(f"{part_dir}/{chunk}"))
    data[len(data) // 2] ^= 0xFF
    loc.write_atomic(f"{part_dir}/{chunk}", bytes(data))
    assert set(verify_store(url).problems) == {4}
    res = extract(ExtractConfig(out=url, repair=True, **KW))
    assert res.parts_repaired == [4] and res.parts_done == 1 and res.parts_skipped == 5
    assert verify_store(url).ok and FeatureStore.open(url).data_dir(4) != part_dir
    assert not loc.files(part_dir), "the damaged copy is deleted once the part is redone"
    assert_identical_stores(local_ref, url)


def test_reader_during_extraction_sees_only_committed_parts(s3_server, local_ref, monkeypatch):
    url = "s3://kvpipe-test/stores/live"
    from kvpipe.store import writer as writer_mod

    gate, paused = threading.Event(), threading.Event()
    commit = writer_mod.StoreWriter.commit_part
    seen_parts: list[int] = []

    def slow_commit(self, part, staged, rows):
        if part == 3:  # part 3's files are uploaded; hold its commit record back
            paused.set()
            assert gate.wait(120)
        return commit(self, part, staged, rows)

    monkeypatch.setattr(writer_mod.StoreWriter, "commit_part", slow_commit)

    def progress(n):  # the capture loop, while writer threads upload and commit
        seen_parts.append(check_consistent(url))

    errors: list[BaseException] = []

    def run():
        try:
            extract(ExtractConfig(out=url, **KW), progress=progress)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    assert paused.wait(120), errors
    loc = ObjectLocation(url)
    staged = [d for d in loc.listdir(layout.PARTS) if d.startswith("p000003")]
    assert staged and loc.files(f"{layout.PARTS}/{staged[0]}"), "part 3's data is uploaded"
    s = FeatureStore.open(url)
    assert 3 not in s.committed_parts and all(r.part != 3 for r in s.rows)
    check_consistent(url)
    gate.set()
    t.join(120)
    assert not errors, errors
    assert check_consistent(url) == 6
    assert seen_parts == sorted(seen_parts)
    assert_identical_stores(local_ref, url)


def test_object_store_errors_are_one_line(s3_server, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["AWS_SHARED_CREDENTIALS_FILE"] = env["AWS_CONFIG_FILE"] = str(tmp_path / "none")
    env["AWS_EC2_METADATA_DISABLED"] = "true"
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", "info", "s3://kvpipe-test/stores/eq"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "no credentials" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) <= 2  # one message (a long line may wrap once)
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open("s3://kvpipe-test/stores/missing")
    with pytest.raises(StoreError, match="no-such-bucket"):
        extract(ExtractConfig(out="s3://no-such-bucket/x", **KW))
