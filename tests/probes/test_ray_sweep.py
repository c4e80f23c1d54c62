"""``--executor ray`` on a local Ray instance (2 CPUs, two CPU actors): every row of the results
equals the local run's, for a probe of each shape (split reads, reads inside ``score``, text
queries); an actor SIGKILLed mid-sweep is restarted, the sweep completes with the same rows,
and no finished target is computed twice (the per-target cache's journal)."""

from __future__ import annotations

import math
import os
import signal

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from kvpipe.probes import run_probe  # noqa: E402
from kvpipe.probes.executor import ExecutorOptions, TargetCache  # noqa: E402
from kvpipe.probes.runner import results_dir  # noqa: E402

from fixtures.probe_stores import coseg_images, semantic_images, write_toy_store  # noqa: E402
from fixtures.video_stores import random_video_store  # noqa: E402


@pytest.fixture(scope="module")
def ray_session(ray_cluster):
    """The session's shared Ray instance (tests/conftest.py)."""
    yield ray_cluster


def same_rows(a, b) -> bool:
    ra, rb = a.table.to_pylist(), b.table.to_pylist()
    if len(ra) != len(rb):
        return False
    for x, y in zip(ra, rb):
        if x.keys() != y.keys():
            return False
        for k in x:
            both_nan = isinstance(x[k], float) and isinstance(y[k], float) and math.isnan(x[k]) and math.isnan(y[k])
            if x[k] != y[k] and not both_nan:
                return False
    return True


def journal(store, task):
    (d,) = sorted((results_dir(store) / ".cache").glob(f"{task}-*.targets"))
    return TargetCache(d).journal()


@pytest.mark.parametrize("task", ["temporal-corr", "cosegmentation", "semantic-seg"])
def test_ray_rows_equal_the_local_rows(ray_session, tmp_path, task):
    if task == "temporal-corr":
        store = random_video_store(tmp_path / "s", layers=2, heads=2, frames=4)
    elif task == "cosegmentation":
        images, structure = coseg_images()
        store = write_toy_store(tmp_path / "s", images, "oracle", structure, layers=2)
    else:
        images, structure, queries, classes = semantic_images()
        store = write_toy_store(tmp_path / "s", images, "oracle", structure, queries, classes, layers=2)
    local = run_probe(store, task, out_dir=tmp_path / "local", use_cache=False, device="cpu")
    pids = []
    remote = run_probe(store, task, out_dir=tmp_path / "ray", use_cache=False, device="auto", executor="ray",
                       options=ExecutorOptions(on_start=pids.extend))
    assert len(pids) == 2 and os.getpid() not in pids  # two CPU actors, not this process
    assert same_rows(local, remote)
    assert {j["pid"] for j in journal(store, task)} <= set(pids)  # the actors computed every target
    assert (tmp_path / "ray" / "results.parquet").exists()


def test_an_actor_killed_mid_sweep_is_restarted_and_nothing_finished_is_recomputed(ray_session, tmp_path):
    images, structure = coseg_images()
    store = write_toy_store(tmp_path / "s", images, "oracle", structure, layers=4)  # 2 x 4 x 2 + 1 = 17 targets
    local = run_probe(store, "cosegmentation", out_dir=tmp_path / "local", use_cache=False, device="cpu")
    pids: list[int] = []
    killed: list[int] = []

    def kill_first_actor_after_one_target(done, total):
        if done == 1 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])

    remote = run_probe(store, "cosegmentation", out_dir=tmp_path / "ray", use_cache=False, executor="ray",
                       progress=kill_first_actor_after_one_target, options=ExecutorOptions(on_start=pids.extend))
    assert killed and same_rows(local, remote)
    lines = journal(store, "cosegmentation")
    computed = [(j["kind"], j["layer"], j["head"]) for j in lines]
    assert len(computed) == 17 and len(set(computed)) == 17  # each target computed exactly once
    assert {j["pid"] for j in lines} - set(pids)  # the restarted actor (a new process) did its share
