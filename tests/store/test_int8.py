"""The lossy int8 store encoding: same bytes on the device and the host, errors within half a
code step of each token's scale, and probe results close to the lossless store's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpipe.pipeline.models.capture import quantize_int8 as quantize_on_device
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.probes.runner import run_probe
from kvpipe.store import FeatureStore
from kvpipe.store.verify import verify_store
from kvpipe.store.encoding import decode, encode, quantize_int8


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_host_and_device_quantizers_give_the_same_bytes(device):
    """The same bytes, on a GPU too (where dividing by a Python number would multiply by its
    reciprocal, which can differ in the last bit)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32) * 10.0 ** rng.integers(-3, 3, (3, 5, 1))
    x[0, 0] = 0.0  # a zero token: scale 0, codes 0
    x[0, 1, :2] = [127.0, 0.5]  # scale 1: 0.5 is a tie, rounded to even (0)
    x = np.concatenate([x, rng.standard_normal((64, 5, 16)).astype(np.float32)])  # more last-bit chances
    host = quantize_int8(x)
    device = quantize_on_device(torch.from_numpy(x).to(device)).cpu().numpy()
    assert host.dtype == np.int8 and host.shape == (67, 5, 20)
    np.testing.assert_array_equal(host, device)
    assert list(host[0, 1, :2]) == [127, 0]
    np.testing.assert_array_equal(host[0, 0], np.zeros(20, np.int8))
    assert encode(host, "int8") is host  # codes from the device pass unchanged


def test_decoded_values_within_half_a_step():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    y = decode(quantize_int8(x), "int8")
    step = np.abs(x).max(1, keepdims=True) / 127
    assert np.all(np.abs(x - y) <= step / 2 * (1 + 1e-6))
    np.testing.assert_allclose(np.abs(y).max(1), np.abs(x).max(1), rtol=1e-6)  # the peak is kept


def test_int8_store_against_the_lossless_store(tmp_path):
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=8, batch_size=4, part_size=4)
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    extract(ExtractConfig(out=str(tmp_path / "i8"), store_dtype="int8", **kw))
    assert verify_store(tmp_path / "i8").ok
    ref, lossy = FeatureStore.open(tmp_path / "f32"), FeatureStore.open(tmp_path / "i8")
    assert lossy.meta.store_dtype == "int8"
    for kind in ("keys", "values"):
        a, b = ref.read(kind, 1, 1).data, lossy.read(kind, 1, 1).data
        assert a.shape == b.shape
        np.testing.assert_array_equal(lossy._raw(0, kind, 1, 1), quantize_int8(a[: lossy._raw(0, kind, 1, 1).shape[0]]))
        step = np.abs(a).max(1, keepdims=True) / 127
        assert np.all(np.abs(a - b) <= step / 2 * (1 + 1e-5))
    a, b = ref.read("post_proj").data, lossy.read("post_proj").data
    assert np.abs(a - b).max() <= np.abs(a).max() / 254 * (1 + 1e-5)
    qa, qb = ref.text("values", 0, 0), lossy.text("values", 0, 0)
    assert np.abs(qa - qb).max() <= np.abs(qa).max() / 254 * (1 + 1e-5)
    # probe results move by far less than the differences between heads
    rows = [{(r["kind"], r["layer"], r["head"]): r["value"] for r in run_probe(s, "fg-seg").table.to_pylist()
             if r["metric"] == "mIoU"} for s in (tmp_path / "f32", tmp_path / "i8")]
    diffs = [abs(rows[0][k] - rows[1][k]) for k in rows[0]]
    spread = max(rows[0].values()) - min(rows[0].values())
    assert max(diffs) < 0.02 and max(diffs) < spread / 2
    assert sum(f.stat().st_size for f in (tmp_path / "i8" / "parts").rglob("*") if f.is_file()) < \
        0.5 * sum(f.stat().st_size for f in (tmp_path / "f32" / "parts").rglob("*") if f.is_file())
