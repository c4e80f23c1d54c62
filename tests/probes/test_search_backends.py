"""semantic-corr's nearest-neighbour backends: which one ``auto`` picks, and that every backend
on this machine returns the same matches (all are exact inner-product searches)."""

from __future__ import annotations

import sys
import tomllib
import types
from pathlib import Path

import numpy as np
import pytest

from kvpipe.probes import neighbours

ROOT = Path(__file__).resolve().parents[2]


def _fake_faiss(monkeypatch, gpus: int) -> None:
    fake = types.SimpleNamespace(get_num_gpus=lambda: gpus)
    monkeypatch.setitem(sys.modules, "faiss", fake)


@pytest.mark.parametrize("faiss_gpus, torch_device, expected", [
    (1, "cuda", "faiss-gpu"),  # faiss's GPU build sees a GPU: it wins
    (0, "cuda", "torch"),      # faiss-cpu only, a GPU for torch: the exact torch search on the device
    (0, "cpu", "faiss"),       # no GPU at all: faiss on the CPU
])
def test_auto_backend_follows_what_is_installed(monkeypatch, faiss_gpus, torch_device, expected):
    _fake_faiss(monkeypatch, faiss_gpus)
    monkeypatch.setattr(neighbours, "device", lambda: torch_device)
    assert neighbours.resolve_backend("auto") == expected


def test_auto_without_faiss_falls_back_to_numpy(monkeypatch):
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss raises ImportError
    monkeypatch.setattr(neighbours, "device", lambda: "cpu")
    assert neighbours.resolve_backend("auto") == "numpy"


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="faiss-gpu"):
        neighbours.resolve_backend("annoy")


@pytest.mark.parametrize("backend", ["faiss", "torch"])
def test_backends_give_the_numpy_matches(backend):
    rng = np.random.default_rng(0)
    bases = [neighbours.l2_normalise(rng.standard_normal((n, 16))) for n in (7, 30, 1)]
    queries = neighbours.l2_normalise(rng.standard_normal((25, 16)))
    groups = rng.integers(0, 3, 25)
    ref_i, ref_s = neighbours.nearest_in_groups(queries, groups, bases, backend="numpy")
    # by hand: the argmax of each query's products with its group's base
    for q, g, i in zip(queries, groups, ref_i):
        assert i == int(np.argmax(bases[g] @ q))
    got_i, got_s = neighbours.nearest_in_groups(queries, groups, bases, backend=backend)
    np.testing.assert_array_equal(got_i, ref_i)
    np.testing.assert_allclose(got_s, ref_s, atol=1e-5)


def test_gpu_extra_is_faiss_gpu_pinned_in_constraints():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    (req,) = extras["gpu"]
    name, version = req.split("==")
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().split()
                if "==" in line and not line.startswith("#"))
    assert name == "faiss-gpu-cu12" and pins[name] == version
