"""Shared fixtures: small stores extracted once per session from tiny models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def run_cli(*args: str, check: bool = True, env: dict | None = None, cwd: str | None = None) -> subprocess.CompletedProcess:
    """Run the kvpipe CLI in a subprocess, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "kvpipe.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"kvpipe {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def synthetic_store(tmp_path_factory) -> Path:
    """tiny-qwen25vl over the default synthetic dataset (4 videos x 6 frames)."""
    from kvpipe.pipeline.extract import ExtractConfig, extract

    out = tmp_path_factory.mktemp("stores") / "synthetic"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), batch_size=4, part_size=8))
    return out
