"""Who scores a sweep: the per-target cache (a killed sweep resumes without recomputing what it
finished), the local executor's options, and the one-line errors of ``--executor ray``.
(The Ray runs themselves are in test_ray_sweep.py, marked slow.)"""

from __future__ import annotations

import builtins
import socket
import sys

import pytest

from kvpipe.errors import UsageError
from kvpipe.probes import run_probe
from kvpipe.probes.base import Target
from kvpipe.probes.executor import ExecutorOptions, TargetCache
from kvpipe.probes.runner import results_dir, target_cache_dir

from fixtures.video_stores import random_video_store


class Interrupted(Exception):
    pass


def journal_of(store, task="temporal-corr") -> list[tuple[str, int, int]]:
    dirs = sorted((results_dir(store) / ".cache").glob(f"{task}-*.targets"))
    assert len(dirs) == 1
    return [(j["kind"], j["layer"], j["head"]) for j in TargetCache(dirs[0]).journal()]


def rows(run) -> list[tuple]:
    return [tuple(r.values()) for r in run.table.to_pylist()]


def test_a_sweep_killed_midway_recomputes_only_the_targets_it_had_not_finished(tmp_path):
    store = random_video_store(tmp_path / "s", layers=2, heads=2, frames=4)
    full = run_probe(store, "temporal-corr", out_dir=tmp_path / "ref", device="numpy", use_cache=False)
    n_targets = 2 * 2 * 2 + 1
    assert len(journal_of(store)) == n_targets
    TargetCache(target_cache_dir(next((store / "probes" / ".cache").glob("temporal-corr-*.parquet")))).clear()
    for p in (store / "probes" / ".cache").glob("*.parquet"):
        p.unlink()

    def stop_after_three(done, total):
        if done == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        run_probe(store, "temporal-corr", device="numpy", progress=stop_after_three)
    first = journal_of(store)
    assert len(first) == 3
    seen = []
    resumed = run_probe(store, "temporal-corr", device="numpy", progress=lambda d, t: seen.append(d))
    journal = journal_of(store)
    assert journal[:3] == first and len(journal) == n_targets  # the three finished ones not again
    assert len(set(journal)) == n_targets
    assert seen[0] == 3 and seen[-1] == n_targets  # progress starts at the targets already finished
    assert rows(resumed) == rows(full)
    # --no-cache empties the per-target cache: every target computed once more
    run_probe(store, "temporal-corr", device="numpy", use_cache=False)
    assert len(journal_of(store)) == n_targets


def test_the_target_cache_round_trips_scores_and_skips_a_damaged_file(tmp_path):
    cache = TargetCache(tmp_path / "c")
    t = Target("values", 3, 1)
    assert cache.get(t) is None and cache.journal() == []
    cache.put(t, {"J": 0.25, "F": 1.0}, 0.5)
    assert cache.get(t) == {"J": 0.25, "F": 1.0}
    assert [(j["kind"], j["layer"], j["head"]) for j in cache.journal()] == [("values", 3, 1)]
    (tmp_path / "c" / TargetCache.file_name(t)).write_text("{half a fi")
    assert cache.get(t) is None  # unreadable: computed again, never trusted


def test_the_local_executor_refuses_ray_options_in_one_line(tmp_path):
    store = random_video_store(tmp_path / "s", layers=1, heads=1, frames=3)
    with pytest.raises(UsageError, match="--workers and --ray-address go with --executor ray") as err:
        run_probe(store, "temporal-corr", device="numpy", options=ExecutorOptions(workers=2))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="executor"):
        run_probe(store, "temporal-corr", device="numpy", executor="dask")


def test_ray_not_installed_is_one_line(tmp_path, monkeypatch):
    store = random_video_store(tmp_path / "s", layers=1, heads=1, frames=3)
    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray" or name.startswith("ray."):
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_ray)
    with pytest.raises(UsageError, match=r"--executor ray needs Ray: pip install 'kvpipe\[ray\]'") as err:
        run_probe(store, "temporal-corr", device="numpy", executor="ray")
    assert "\n" not in str(err.value)


def test_an_unreachable_ray_address_is_one_line_in_seconds(tmp_path):
    pytest.importorskip("ray")
    store = random_video_store(tmp_path / "s", layers=1, heads=1, frames=3)
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(UsageError, match=f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there") as err:
        run_probe(store, "temporal-corr", device="numpy", executor="ray",
                  options=ExecutorOptions(address=f"127.0.0.1:{port}"))
    assert "\n" not in str(err.value)
    with pytest.raises(UsageError, match="--workers 0: give at least 1"):
        run_probe(store, "temporal-corr", executor="ray", options=ExecutorOptions(workers=0))
