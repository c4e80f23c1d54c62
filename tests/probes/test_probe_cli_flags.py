"""`kvpipe probe --device/--layers/--heads/--kinds`: one-line errors and a subset sweep."""

from __future__ import annotations

import json

import pytest

from fixtures.cli import invoke
from fixtures.video_stores import random_video_store

torch = pytest.importorskip("torch")


def test_probe_flags(tmp_path):
    store = str(random_video_store(tmp_path / "s", layers=3, heads=2, frames=3))
    if not torch.cuda.is_available():
        bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--device", "cuda", check=False)
        assert bad.returncode == 2 and "torch sees no CUDA device" in bad.stderr + bad.stdout
    bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--layers", "0-13,20", check=False)
    assert bad.returncode == 2 and "whose layers are 0-2" in bad.stderr + bad.stdout
    ok = invoke("probe", "--task", "temporal-corr", "--store", store, "--layers", "1-2", "--heads", "1",
                "--kinds", "keys", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert ok.returncode == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["device"] == "cpu" and record["selection"] == {"layers": [1, 2], "heads": [1], "kinds": ["keys"]}


def test_probe_executor_flags_fail_in_one_line(tmp_path):
    import socket

    store = str(random_video_store(tmp_path / "s", layers=1, heads=1, frames=3))
    bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--workers", "2", check=False)
    assert bad.returncode == 2 and "--workers and --ray-address go with --executor ray" in bad.stderr + bad.stdout
    bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--executor", "spark", check=False)
    assert bad.returncode == 2 and "spark" in bad.stderr + bad.stdout
    pytest.importorskip("ray")
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--executor", "ray",
                 "--ray-address", f"127.0.0.1:{port}", check=False)
    text = (bad.stderr + bad.stdout).strip()
    assert bad.returncode == 2 and f"--ray-address 127.0.0.1:{port}: no Ray cluster answers there" in text
    assert len(text.splitlines()) == 1
