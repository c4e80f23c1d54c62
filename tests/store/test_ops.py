"""Operations on a store: status, repair of damaged parts, failure log, executor options."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from kvpipe.errors import DataError, StoreError, UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import layout
from kvpipe.store.status import FailureLog, store_status
from kvpipe.store.fs import open_location

from fixtures.cli import invoke
from fixtures.layouts_davis_folder import make_image_folder
from fixtures.store_equality import assert_identical_stores

KW = dict(model="tiny-qwen25vl", dataset="synthetic", limit=8, batch_size=2, part_size=2)
ARGS = ["--model", "tiny-qwen25vl", "--dataset", "synthetic", "--limit", "8", "--batch-size", "2",
        "--part-size", "2"]


def kvpipe(*args) -> tuple[int, str]:
    """``kvpipe ARGS`` in this process: exit code and stdout + stderr as one line of words."""
    proc = invoke(*args, check=False)
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split())


@pytest.fixture(scope="module")
def clean_store(tiny_store) -> Path:
    return tiny_store(**KW)  # shared: tests change copies of it


def copy_store(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupt_chunk_verify_names_part_and_repair_redoes_only_it(clean_store, tmp_path):
    store = copy_store(clean_store, tmp_path / "s")
    chunk = [c for c in sorted((store / "parts" / "p000002" / "values" / "c").rglob("*")) if c.is_file()][0]
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    code, out = kvpipe("verify", store)
    assert code == 1 and "p000002" in out and "checksum" in out
    assert "p000001" not in out and "p000003" not in out
    others = {p.name: p.stat().st_mtime_ns for p in (store / layout.MANIFEST).iterdir() if p.name != "p000002.parquet"}
    code, out = kvpipe("extract", *ARGS, "--out", store, "--repair")
    assert code == 0, out
    assert "repaired 1 damaged part(s): p000002" in out and "1 new parts, 3 already committed" in out
    assert {p.name: p.stat().st_mtime_ns for p in (store / layout.MANIFEST).iterdir()
            if p.name != "p000002.parquet"} == others, "intact parts were redone"
    code, out = kvpipe("verify", store)
    assert code == 0 and "4 parts verified" in out
    assert_identical_stores(store, clean_store)
    assert not any((store / layout.STAGING).iterdir())


def test_repair_of_an_unreadable_record_and_a_missing_part(clean_store, tmp_path):
    store = copy_store(clean_store, tmp_path / "s")
    (store / layout.MANIFEST / "p000000.parquet").write_bytes(b"not parquet")
    shutil.rmtree(store / "parts" / "p000003")
    res = extract(ExtractConfig(out=str(store), repair=True, **KW))
    assert res.parts_repaired == [0, 3] and res.parts_done == 2 and res.parts_skipped == 2
    assert_identical_stores(store, clean_store)


def test_repair_needs_an_existing_store(tmp_path):
    code, out = kvpipe("extract", *ARGS, "--out", tmp_path / "nope", "--repair")
    assert code == 2 and "does not exist" in out and "Traceback" not in out
    assert not (tmp_path / "nope").exists()


def test_status_done_pending_failed(clean_store, tmp_path):
    store = copy_store(clean_store, tmp_path / "s")
    (store / layout.MANIFEST / "p000003.parquet").unlink()
    (store / layout.MANIFEST / "p000001.parquet").unlink()
    FailureLog(open_location(store)).record(1, RuntimeError("CUDA out of memory\ndetails"), attempts=3)
    st = store_status(store)
    assert [p.state for p in st.parts] == ["done", "failed", "done", "pending"]
    assert "CUDA out of memory" in st.parts[1].detail and "3 attempt" in st.parts[1].detail
    code, out = kvpipe("status", store)
    assert code == 0 and "4 parts: 2 done, 1 failed, 1 pending" in out and "p000001" in out
    assert "pending: p3" in out
    # a rerun finishes the store and forgets the failure
    res = extract(ExtractConfig(out=str(store), **KW))
    assert res.parts_done == 2 and res.parts_skipped == 2
    assert not (store / layout.FAILURES).exists()
    assert [p.state for p in store_status(store).parts] == ["done"] * 4


def test_failed_images_and_strict_failures_show_as_failed(tmp_path):
    root = make_image_folder(tmp_path / "imgs", n=5, corrupt=1)
    kw = dict(model="tiny-qwen25vl", dataset="folder", data_root=str(root), batch_size=2, part_size=2)
    extract(ExtractConfig(out=str(tmp_path / "lenient"), **kw))
    st = store_status(tmp_path / "lenient")
    failed = st.of("failed")
    assert len(failed) == 1 and "1 of 2 images failed" in failed[0].detail and "cannot read image" in failed[0].detail
    with pytest.raises(DataError, match="--strict"):
        extract(ExtractConfig(out=str(tmp_path / "strict"), strict=True, **kw))
    st = store_status(tmp_path / "strict")
    bad = failed[0].part
    assert st.parts[bad].state == "failed" and "--strict" in st.parts[bad].detail
    assert all(p.state == "done" for p in st.parts[:bad])
    log = json.loads((tmp_path / "strict" / layout.FAILURES).read_text())
    assert list(log["parts"]) == [str(bad)] and log["parts"][str(bad)]["type"] == "DataError"
    code, out = kvpipe("status", tmp_path / "strict")
    assert code == 0 and "1 failed" in out and "--strict" in out


def test_executor_options_fail_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="unknown executor 'slurm' for --executor; known: local, ray"):
        extract(ExtractConfig(out=str(tmp_path / "a"), executor="slurm", **KW))
    with pytest.raises(UsageError, match="need --executor ray"):
        extract(ExtractConfig(out=str(tmp_path / "a"), workers=2, **KW))
    t = time.time()
    code, out = kvpipe("extract", *ARGS, "--out", tmp_path / "b", "--executor", "ray",
                       "--ray-address", "127.0.0.1:9")
    assert code == 2 and "--ray-address 127.0.0.1:9: no Ray cluster answers there" in out
    assert "Traceback" not in out and time.time() - t < 30
    import http.server
    import threading

    srv = http.server.HTTPServer(("127.0.0.1", 0), http.server.BaseHTTPRequestHandler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:  # something listens there, but not Ray: refused at once instead of ray.init retrying
        t = time.time()
        code, out = kvpipe("extract", *ARGS, "--out", tmp_path / "b", "--executor", "ray",
                           "--ray-address", f"127.0.0.1:{srv.server_port}")
        assert code == 2 and "is not a Ray cluster" in out and time.time() - t < 30
    finally:
        srv.shutdown()
    code, out = kvpipe("extract", *ARGS, "--out", tmp_path / "b", "--executor", "ray",
                       "--ray-address", "nonsense")
    assert code == 2 and "must look like HOST:PORT" in out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(StoreError, match="does not exist"):
        store_status(tmp_path / "none")
