"""Shared fixtures: small stores extracted once per session from tiny models, one S3-compatible
server and one local Ray instance for the tests that need them."""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# One OpenMP thread per process (torch, faiss; set before either is imported): the two xdist workers
# already fill two cores, and OpenMP threads spinning for a busy core burnt more CPU than the tests
# (tests/models: 134 s of CPU with the default threads, 45 s with one).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# What libraries cache on their own (datasets' Arrow copies and lock files, matplotlib's font list)
# goes to a temporary folder of this run instead of the home folder; xdist workers and the
# processes tests start inherit it, and it is removed when the run ends.
if "PYTEST_XDIST_WORKER" not in os.environ:
    _scratch = tempfile.mkdtemp(prefix="kvpipe-tests-")
    atexit.register(shutil.rmtree, _scratch, ignore_errors=True)
    os.environ["HF_DATASETS_CACHE"] = os.path.join(_scratch, "hf-datasets")
    os.environ["MPLCONFIGDIR"] = os.path.join(_scratch, "matplotlib")


TERMINAL_VARIABLES = ("COLUMNS", "LINES")


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """xdist (the controller): send the workers this process's COLUMNS and LINES."""
    node.workerinput["terminal_variables"] = {k: os.environ.get(k) for k in TERMINAL_VARIABLES}


def pytest_configure(config):
    """An xdist worker takes the controller's COLUMNS and LINES back: GNU readline, which pytest
    imports at start, sets them to 80 x 24 in a process without a terminal, and the CLI wraps
    its piped output at COLUMNS."""
    sent = getattr(config, "workerinput", {}).get("terminal_variables")
    for k, v in (sent or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


RAY_FILES = "test_ray_"  # test files whose tests use the ray_cluster fixture


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """``--dist loadfile`` (pyproject's addopts) with every Ray test file in one unit, handed out first.

    A file's tests run on one worker, in order, sharing its module-scoped fixtures. The Ray files
    (test_ray_*.py) share the session's Ray instance, so one worker runs them all; they take
    longest, so they start at once while the other worker goes through the remaining files."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class RayFirst(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "ray" if path.rpartition("/")[2].startswith(RAY_FILES) else path

        def _assign_work_unit(self, node) -> None:
            if "ray" in self.workqueue:
                self.workqueue.move_to_end("ray", last=False)
            super()._assign_work_unit(node)

    return RayFirst(config, log)


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """tiny-qwen25vl over the default synthetic dataset (4 videos x 6 frames)."""
    from kvpipe.pipeline.extraction import ExtractConfig, extract

    out = tmp_path_factory.mktemp("stores") / "synthetic"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), batch_size=4, part_size=8))
    return out


@pytest.fixture(scope="session")
def tiny_store(tmp_path_factory):
    """``tiny_store(**options)``: the store ``extract(ExtractConfig(out=..., **options))`` makes,
    extracted once per session for each set of options. Tests share it: one that changes a store
    copies it first (``shutil.copytree``)."""
    from kvpipe.pipeline.extraction import ExtractConfig, extract

    made: dict[tuple, Path] = {}

    def get(**options) -> Path:
        key = tuple(sorted(options.items()))
        if key not in made:
            out = tmp_path_factory.mktemp("tiny-store") / "store"
            extract(ExtractConfig(out=str(out), **options))
            made[key] = out
        return made[key]

    return get


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on loopback, with a bucket.

    Yields the endpoint URL; the environment points s3fs at it (FSSPEC_S3_ENDPOINT_URL) with
    dummy credentials, so processes started afterwards (Ray workers) reach it too."""
    import socket
    import time
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(url, timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start")
            time.sleep(0.1)
    env = {"FSSPEC_S3_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import fsspec
    import fsspec.config

    fsspec.config.set_conf_env(fsspec.config.conf)  # fsspec reads FSSPEC_* variables at import
    fsspec.filesystem("s3").mkdir("kvpipe-test")
    try:
        yield url
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        fsspec.config.conf.pop("s3", None)
        proc.kill()
        proc.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_cluster(s3_server) -> str:
    """One local Ray instance (2 CPUs) shared by every Ray test; yields its GCS address, which
    drivers in other processes join with ``--ray-address``.

    Starting Ray costs seconds of CPU (GCS, raylet, worker processes that import torch), so it
    is started once. The executor uses an already-initialised Ray as it finds it and leaves it
    running. It starts after the S3 server, so its workers inherit the endpoint settings. Under
    pytest-xdist one worker runs every Ray test file (``pytest_xdist_make_scheduler`` above), so
    there is one instance."""
    ray = pytest.importorskip("ray")
    ctx = ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ctx.address_info["gcs_address"]
    finally:
        ray.shutdown()


@pytest.fixture(autouse=True)
def _figures_only_where_checked(request, monkeypatch):
    """Sweeps in tests draw no figures (a third of the suite's time was matplotlib) unless the
    test is marked ``plots``: those check the figures. The CLI's default stays --plots."""
    if request.node.get_closest_marker("plots") is None:
        from kvpipe.probes import runner

        monkeypatch.setattr(runner, "DRAW_PLOTS", False)
