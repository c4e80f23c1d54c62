"""Shared fixtures: small stores extracted once per session from tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """tiny-qwen25vl over the default synthetic dataset (4 videos x 6 frames)."""
    from kvpipe.pipeline.extraction import ExtractConfig, extract

    out = tmp_path_factory.mktemp("stores") / "synthetic"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), batch_size=4, part_size=8))
    return out


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
