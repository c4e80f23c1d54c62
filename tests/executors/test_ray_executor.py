"""The Ray executor on the session's local Ray instance (2 CPUs, the ``ray_cluster`` fixture): a
worker actor killed mid-run is replaced, and the store it makes on an S3-compatible server equals
the local executor's, bit for bit. (tests/executors/test_ray_resume.py covers a Ray run on a
filesystem.)"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

from kvpipe.pipeline.extraction import ExtractConfig, extract  # noqa: E402

from fixtures.store_equality import assert_identical_stores  # noqa: E402

KW = dict(model="tiny-qwen25vl", dataset="synthetic", limit=16, batch_size=2, part_size=2)


@pytest.fixture
def local_ref(tiny_store) -> Path:
    return tiny_store(**KW)


def kvpipe_actors() -> list:
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("kvpipe-")]
    return [ray.get_actor(n) for n in sorted(names)]


def actor_pids() -> list[int]:
    """PIDs of PartActor processes of this test's Ray instance (children of its raylet, a
    child of this process), found in /proc so a busy actor need not answer."""
    def ppid(pid: int) -> int:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[1])

    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/cmdline", "rb") as fh:
                cmd = fh.read()
            if cmd.startswith(b"ray::PartActor") and ppid(ppid(int(d))) == os.getpid():
                out.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return sorted(out)


def test_ray_run_with_a_killed_actor_to_s3_equals_local_run(ray_cluster, local_ref):
    """Fault test: SIGKILL one of two worker actors right after the first commit; Ray restarts
    it and reruns its parts; the store on the S3 server equals the local executor's."""
    url = "s3://kvpipe-test/stores/ray"
    killed: list[tuple[int, int]] = []
    commits = []

    def progress(n):  # called by the driver after each commit
        commits.append(n)
        if not killed:
            deadline = time.time() + 120  # the second actor may still be importing torch
            while len(pids := actor_pids()) < 2 and time.time() < deadline:
                time.sleep(0.05)
            assert len(pids) == 2, pids
            os.kill(pids[-1], signal.SIGKILL)
            killed.append((len(commits), pids[-1]))

    t = time.time()
    res = extract(ExtractConfig(out=url, executor="ray", workers=2, **KW), progress=progress)
    assert killed and killed[0][0] == 1, "the kill landed after the first of 8 commits"
    assert res.parts_done == 8 and res.images_ok == 16 and len(commits) == 8
    assert killed[0][1] not in actor_pids()
    assert_identical_stores(local_ref, url)
    assert not kvpipe_actors(), "the run's actors are gone"
    assert time.time() - t < 240


def test_ray_loading_in_tasks_equals_local_run(ray_cluster, tiny_store, tmp_path):
    """With loading as Ray tasks (the default on GPU nodes: each part's batches are read and
    preprocessed in other processes while the actor waits for its device), the store is the
    local executor's, bit for bit. One actor holds both parts at once; each part in flight
    starts a task process that imports torch (about 7 s of CPU here), so two parts keep the test
    short."""
    kw = {**KW, "limit": 4}
    out = tmp_path / "tasks"
    res = extract(ExtractConfig(out=str(out), executor="ray", workers=1, loader_processes=1, **kw))
    assert res.parts_done == 2 and res.images_ok == 4
    assert_identical_stores(tiny_store(**kw), out)


def test_loaded_batches_reach_the_actor_without_a_copy(ray_cluster):
    """A load task's batch travels as numpy arrays: the actor reads them in Ray's shared
    memory (read-only, not unpickled into fresh memory) and gets back the same tensors."""
    import torch

    from kvpipe.pipeline.datasets import create_dataset
    from kvpipe.pipeline.extraction.ray_executor import _inputs_as, _to_numpy, _to_torch
    from kvpipe.pipeline.extraction.loading import load_batch
    from kvpipe.pipeline.models import load_model

    adapter = load_model("tiny-qwen25vl")
    records = create_dataset("synthetic", limit=2).records()
    cfg = ExtractConfig(out="unused", **KW)
    loaded = load_batch(adapter, list(enumerate(records)), cfg)
    back = ray.get(ray.put(_inputs_as(loaded, _to_numpy)))
    pixels = back.batch.inputs["pixel_values"]
    assert not pixels.flags.writeable, "a read-only view of the object store, not a copy"
    restored = _inputs_as(back, _to_torch).batch.inputs
    assert set(restored) == set(loaded.batch.inputs)
    for k, v in loaded.batch.inputs.items():
        assert isinstance(restored[k], torch.Tensor) and torch.equal(restored[k], v)
