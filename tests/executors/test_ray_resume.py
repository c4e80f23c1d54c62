"""SIGKILL the driver of a Ray extraction mid-run; the rerun redoes only unfinished parts. Both
drivers are ``kvpipe extract`` processes that join the session's Ray instance (``--ray-address``),
as a driver joins a cluster."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from kvpipe.store import layout  # noqa: E402

from fixtures.store_equality import assert_identical_stores  # noqa: E402

ARGS = ["extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--limit", "16", "--batch-size", "2",
        "--part-size", "2", "--executor", "ray", "--workers", "1"]


def start(out: Path, log: Path, address: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # its own process group: whatever the driver starts can be cleaned up afterwards
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "kvpipe.cli", *ARGS, "--ray-address", address,
                                 "--out", str(out)],
                                stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def group_alive(pgid: int) -> bool:
    for d in os.listdir("/proc"):
        try:
            with open(f"/proc/{d}/stat") as fh:
                fields = fh.read().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def reap(proc: subprocess.Popen) -> None:
    """Kill what the driver's process group left behind (Ray agents) and wait until it is gone."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.time() + 30
    while group_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)


def test_sigkill_driver_then_rerun_resumes(ray_cluster, tiny_store, tmp_path):
    out = tmp_path / "ray"
    proc = start(out, tmp_path / "killed.log", ray_cluster)
    manifest = out / layout.MANIFEST
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not (manifest.is_dir() and any(manifest.glob("*.parquet"))):
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        reap(proc)
    done = {p.name: p.stat().st_mtime_ns for p in manifest.glob("*.parquet")}
    assert 1 <= len(done) < 8, "the driver must die part-way"
    rerun = start(out, tmp_path / "rerun.log", ray_cluster)
    try:
        rerun.wait(timeout=240)
    finally:
        reap(rerun)
    text = (tmp_path / "rerun.log").read_text()
    assert rerun.returncode == 0, text
    m = re.search(r"in (\d+) new parts, (\d+) already committed", " ".join(text.split()))
    assert m, text
    new, skipped = int(m.group(1)), int(m.group(2))
    assert skipped == len(done) and new == 8 - len(done), "finished parts were recomputed"
    assert {n: (manifest / n).stat().st_mtime_ns for n in done} == done
    assert not any((out / layout.STAGING).iterdir())
    ref = tiny_store(model="tiny-qwen25vl", dataset="synthetic", limit=16, batch_size=2, part_size=2)
    assert_identical_stores(out, ref)
