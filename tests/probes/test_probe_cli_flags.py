"""`kvpipe probe --device/--layers/--heads/--kinds`: one-line errors and a subset sweep."""

from __future__ import annotations

import json

import numpy as np
import pytest

from fixtures.cli import invoke
from fixtures.probe_stores import grid_segments, write_feature_store

torch = pytest.importorskip("torch")


def video_store(path):
    rng = np.random.default_rng(0)
    images = [{"id": f"v0/{t}", "h": 24, "w": 32, "group": "v0", "frame": t, "segments": grid_segments(3, 4),
               "feat": rng.standard_normal((12, 4))} for t in range(3)]
    masks = [np.kron(rng.integers(0, 3, (3, 4)), np.ones((8, 8), np.int64)).astype(np.uint8) for _ in range(3)]
    return write_feature_store(path, images, {}, layers=3, heads=2, tasks=("temporal-corr",), masks=masks)


def test_probe_flags(tmp_path):
    store = str(video_store(tmp_path / "s"))
    if not torch.cuda.is_available():
        bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--device", "cuda", check=False)
        assert bad.returncode == 2 and "torch sees no GPU" in bad.stderr + bad.stdout
    bad = invoke("probe", "--task", "temporal-corr", "--store", store, "--layers", "0-13,20", check=False)
    assert bad.returncode == 2 and "whose layers are 0-2" in bad.stderr + bad.stdout
    ok = invoke("probe", "--task", "temporal-corr", "--store", store, "--layers", "1-2", "--heads", "1",
                "--kinds", "keys", "--device", "cpu", "--out", str(tmp_path / "out"))
    assert ok.returncode == 0
    record = json.loads((tmp_path / "out" / "run.json").read_text())
    assert record["device"] == "cpu" and record["selection"] == {"layers": [1, 2], "heads": [1], "kinds": ["keys"]}
