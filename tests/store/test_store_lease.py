"""One writer at a time: the writer lease, with real processes, locally and on S3 (moto)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError
from kvpipe.store import FeatureStore, layout
from kvpipe.store.fs import open_location
from kvpipe.store.lease import LEASE, LeaseInfo, read_lease
from kvpipe.store.verify import verify_store
from kvpipe.store.writer import StoreWriter

from fixtures.cli import invoke
from test_store import make_meta, part_arrays, rows_for

HERE = Path(__file__).resolve().parent

# A writer process: opens the store (taking the lease), says so, commits its parts one by one
# until a "go" file appears (so the test can start a second writer meanwhile), then closes.
WRITER = r"""
import json, os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from test_store import make_meta, part_arrays, rows_for
from kvpipe.errors import StoreError
from kvpipe.store.writer import StoreWriter

out, gate = sys.argv[1], Path(sys.argv[2])
start = gate.with_suffix(".start")
while not start.exists():  # all writers begin together
    time.sleep(0.01)
meta = make_meta(n_images=6, part_size=2)
try:
    w = StoreWriter.create_or_resume(out, meta)
except StoreError as err:
    print("REFUSED", err, flush=True)
    sys.exit(3)
print("HOLDING", flush=True)
for part in range(3):
    w.write_part(part, rows_for(part, 2 * part, [6, 6]), part_arrays([6, 6], part))
    while part == 0 and not gate.exists():
        time.sleep(0.02)
w.clean_staging()
w.close()
print("DONE", flush=True)
"""


def start_writers(n: int, out: str, tmp_path: Path) -> tuple[list[subprocess.Popen], Path]:
    gate = tmp_path / "go"
    tests_dir = str(HERE)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, out, str(gate), tests_dir], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**os.environ})
             for _ in range(n)]
    gate.with_suffix(".start").touch()
    return procs, gate


def first_line(proc: subprocess.Popen, timeout: float = 120) -> str:
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout)
        raise AssertionError(f"writer ended without a word: {proc.stderr.read()}")
    return line.strip()


def race_two_writers(out: str, tmp_path: Path) -> tuple[str, str]:
    """Two processes open one store at the same moment; returns (winner's, loser's) outputs."""
    procs, gate = start_writers(2, out, tmp_path)
    lines = [first_line(p) for p in procs]
    assert sorted(l.split()[0] for l in lines) == ["HOLDING", "REFUSED"], lines
    winner = procs[[l.startswith("HOLDING") for l in lines].index(True)]
    loser = procs[1 - procs.index(winner)]
    assert loser.wait(60) == 3
    gate.touch()
    rest = winner.communicate(timeout=120)[0]
    assert winner.returncode == 0 and "DONE" in rest, winner.stderr.read() if winner.stderr else rest
    return rest, lines[procs.index(loser)]


def assert_refusal(line: str) -> None:
    assert "being written by another kvpipe run" in line
    assert f"host {socket.gethostname()}" in line and "pid " in line and "run " in line and "heartbeat" in line
    assert "\n" not in line.strip()


def assert_complete(out) -> None:
    report = verify_store(out)
    assert report.ok, report.problems
    s = FeatureStore.open(out)
    assert s.complete and len(s.images()) == 6
    np.testing.assert_array_equal(s.read("keys", 1, 1).data[:6], part_arrays([6, 6], 0)["keys"][1, 1, :6])
    assert read_lease(open_location(out)) is None, "the lease outlived its writer"


def test_two_processes_one_local_store_second_refused(tmp_path):
    out = str(tmp_path / "s")
    _, refusal = race_two_writers(out, tmp_path)
    assert_refusal(refusal)
    assert_complete(out)
    assert not any((tmp_path / "s" / layout.STAGING).iterdir())


def test_two_processes_one_s3_store_second_refused(s3_server, tmp_path):
    url = "s3://kvpipe-test/stores/lease-race"
    _, refusal = race_two_writers(url, tmp_path)
    assert_refusal(refusal)
    assert_complete(url)
    loc = open_location(url)
    assert len(loc.listdir(layout.PARTS)) == 3, "a prefix was lost or left behind"


def test_cli_extract_refused_while_another_run_holds_the_store(tmp_path):
    out = str(tmp_path / "s")
    procs, gate = start_writers(1, out, tmp_path)
    try:
        assert first_line(procs[0]) == "HOLDING"
        proc = invoke("extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--limit", "2",
                      "--part-size", "2", "--batch-size", "2", "--out", out, check=False)
    finally:  # the writer waits for the gate: never leave it behind
        gate.touch()
        procs[0].communicate(timeout=120)
    lines = [l for l in (proc.stdout + proc.stderr).splitlines() if l.startswith("error:")]  # not the progress bar
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stdout + proc.stderr
    assert_refusal(" ".join(lines[0].split()))
    assert_complete(out)


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def stale_lease(host: str | None = None, pid: int | None = None, age: float = 3600) -> bytes:
    now = time.time()
    return LeaseInfo("deadbeef0000", host or socket.gethostname(), pid or dead_pid(), now - age - 10,
                     now - age).encode()


def test_stale_lease_of_a_killed_run_is_taken_over_locally(tmp_path):
    out = tmp_path / "s"
    StoreWriter.create_or_resume(out, make_meta()).close()
    (out / LEASE).write_bytes(stale_lease())
    (out / layout.STAGING / "p000000-leftover").mkdir()
    w = StoreWriter.create_or_resume(out, make_meta())
    assert read_lease(open_location(out)).pid == os.getpid()
    assert not (out / layout.STAGING / "p000000-leftover").exists()
    w.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    w.close()
    assert not (out / LEASE).exists()


def test_live_lease_on_this_host_is_not_taken_before_its_timeout(tmp_path):
    out = tmp_path / "s"
    StoreWriter.create_or_resume(out, make_meta()).close()
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LEASE).write_bytes(stale_lease(pid=other.pid, age=5))
        with pytest.raises(StoreError, match=f"pid {other.pid}, run deadbeef0000"):
            StoreWriter.create_or_resume(out, make_meta())
        # the same live process, but its heartbeat older than the timeout: taken over
        StoreWriter.create_or_resume(out, make_meta(), lease_timeout=2).close()
    finally:
        other.kill()
        other.wait()


def test_stale_lease_on_s3_is_taken_over(s3_server):
    url = "s3://kvpipe-test/stores/lease-stale"
    StoreWriter.create_or_resume(url, make_meta()).close()
    loc = open_location(url)
    loc.write_atomic(LEASE, stale_lease(host="elsewhere", pid=1))
    with pytest.raises(StoreError, match="host elsewhere, pid 1"):
        StoreWriter.create_or_resume(url, make_meta(), lease_timeout=7200)
    w = StoreWriter.create_or_resume(url, make_meta(), lease_timeout=30)
    assert read_lease(loc).pid == os.getpid()
    w.close()
    assert read_lease(loc) is None


def test_a_run_that_lost_its_lease_commits_nothing(tmp_path):
    out = tmp_path / "s"
    w = StoreWriter.create_or_resume(out, make_meta())
    (out / LEASE).write_bytes(stale_lease(host="elsewhere", pid=1, age=0))  # another run took it over
    w._lease.refresh()
    with pytest.raises(StoreError, match="lost its writer lease to host elsewhere"):
        w.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    assert not list((out / layout.MANIFEST).iterdir())
    w.close()
    assert (out / LEASE).exists(), "a writer deleted the lease of the run that took it over"


def test_heartbeat_refreshes_the_lease(tmp_path):
    out = tmp_path / "s"
    w = StoreWriter.create_or_resume(out, make_meta(), lease_timeout=0.4)
    first = read_lease(open_location(out)).heartbeat
    time.sleep(0.5)
    assert read_lease(open_location(out)).heartbeat > first
    w.close()


def test_s3_cleanup_keeps_every_prefix_a_record_names(s3_server):
    """A second writer's clean-up used to delete prefixes the first had committed."""
    url = "s3://kvpipe-test/stores/lease-cleanup"
    w = StoreWriter.create_or_resume(url, make_meta())
    w.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    staged = w.stage_part(1, part_arrays([6], 1))  # an upload with no record yet: a leftover
    w.close()
    w2 = StoreWriter.create_or_resume(url, make_meta())
    w2.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))  # committed again: new prefix
    w2._committed_now.clear()  # as if another writer had committed it
    w2.clean_staging()
    w2.close()
    loc = open_location(url)
    assert staged.path.split("/")[-1] not in loc.listdir(layout.PARTS)
    assert verify_store(url).ok
    assert len(loc.listdir(layout.PARTS)) == 1


def test_leftover_creation_folder_of_a_killed_run_is_removed(tmp_path):
    host = socket.gethostname()
    dead = tmp_path / f".s.creating-{host}-{dead_pid()}-0123abcd"
    live = tmp_path / f".s.creating-{host}-{os.getpid()}-4567abcd"
    old = tmp_path / ".s.creating-1a2b3c4d"  # the naming of older kvpipe versions
    for d in (dead, live, old):
        (d / "parts").mkdir(parents=True)
    os.utime(old, (time.time() - 2 * 86400,) * 2)
    StoreWriter.create_or_resume(tmp_path / "s", make_meta()).close()
    assert not dead.exists() and not old.exists()
    assert live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "s"]


def test_writers_in_one_process_share_the_lease_until_the_store_is_gone(tmp_path):
    import shutil

    out = tmp_path / "s"
    first = StoreWriter.create_or_resume(out, make_meta())
    second = StoreWriter.create_or_resume(out, make_meta())  # the same process: shares the lease
    assert second._lease is first._lease
    second.close()
    assert (out / LEASE).exists(), "released while another writer of this process still holds it"
    shutil.rmtree(out)  # the store removed under a writer left open
    third = StoreWriter.create_or_resume(out, make_meta())
    assert third._lease is not first._lease
    third.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    third.close()
    first.close()
