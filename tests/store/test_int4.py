"""The 4-bit store encoding: a hand-computed vector, the rotation, the same bytes on the device
and the host, a store extracted with --store-dtype int4 against the lossless one, and stores
whose encoding this kvpipe does not know."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.linalg import hadamard

from kvpipe.errors import StoreError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.models.capture import quantize_int4 as quantize_on_device
from kvpipe.store import FeatureStore
from kvpipe.store.encoding import encode, stored_dim
from kvpipe.store.schema import FeatureSetMeta
from kvpipe.store.quant import DECODE_BLOCK, dequantize_int4, fwht, quantize_int4, rotate, rotation_signs, unrotate
from kvpipe.store.verify import verify_store


def test_hand_computed_vector_without_rotation():
    x = np.array([[3.0, 4.5, 6.0, 10.5]], np.float32)  # min 3, max 10.5: scale 0.5
    q = quantize_int4(x, rotation="none")
    assert q.dtype == np.uint8 and q.shape == (1, 2 + 8)
    # codes (x - 3) / 0.5 = 0, 3, 6, 15 -> bytes 0 | 3 << 4, 6 | 15 << 4
    assert list(q[0, :2]) == [0x30, 0xF6]
    assert q[0, 2:6].view(np.float32)[0] == 0.5 and q[0, 6:10].view(np.float32)[0] == 3.0
    np.testing.assert_array_equal(dequantize_int4(q, 4, rotation="none"), x)
    # a tie (x - min) / scale = 1.5 rounds to even (2); a constant vector is stored exactly
    y = quantize_int4(np.array([[0.0, 0.75, 7.5, 1.0]], np.float32), rotation="none")
    assert y[0, 0] & 0x0F == 0 and y[0, 0] >> 4 == 2
    c = np.full((1, 6), -2.25, np.float32)
    np.testing.assert_array_equal(dequantize_int4(quantize_int4(c, rotation="none"), 6, rotation="none"), c)


def test_rotation_is_orthonormal_and_undone():
    x = np.eye(8, dtype=np.float32)
    h = fwht(x)  # the rows of the normalised 8 x 8 Hadamard matrix
    np.testing.assert_allclose(np.abs(h), np.full((8, 8), 8 ** -0.5), rtol=1e-6)
    np.testing.assert_allclose(h @ h.T, np.eye(8), atol=1e-6)
    z = np.random.default_rng(0).standard_normal((4, 3584)).astype(np.float32)  # 7 blocks of 512
    np.testing.assert_allclose(np.linalg.norm(rotate(z), axis=1), np.linalg.norm(z, axis=1), rtol=1e-5)
    np.testing.assert_allclose(unrotate(rotate(z)), z, atol=1e-5)
    assert not np.allclose(rotate(z, seed=1), rotate(z, seed=0))


@pytest.mark.parametrize("dim, lead", [(128, (3, 37)), (3584, (3, 37)), (96, (3, 37)), (15, (3, 37)), (1, (3, 37)),
                                       (128, (2 * DECODE_BLOCK + 5,))])
def test_decoding_equals_the_affine_step_then_the_inverse_rotation(dim, lead):
    """The decoder folds the affine step into the signed Hadamard product; it equals the
    definition (codes * scale + min, then the inverse rotation, in float64) to float32
    rounding, far below a code step, with one block (head_dim 128), several
    (3584 = 7 x 512; 96 = 3 x 32), odd widths (block of 1), and vectors with a large offset
    (the zero point's term); a long input in blocks of ``DECODE_BLOCK`` tokens."""
    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((*lead, dim)) * 4 + rng.normal(0, 50, (*lead, 1))).astype(np.float32)
    q = quantize_int4(x)
    packed, tail = q[..., :-8], np.ascontiguousarray(q[..., -8:]).view(np.float32)
    codes = np.stack([packed & 0x0F, packed >> 4], -1).reshape(*lead, -1)[..., :dim].astype(np.float32)
    n = dim & -dim
    h = hadamard(n) / np.sqrt(n)  # float64, Sylvester order (as fwht)
    y64 = codes.astype(np.float64) * tail[..., :1] + tail[..., 1:]
    exact = (y64.reshape(-1, n) @ h).reshape(y64.shape) * rotation_signs(dim)
    got = dequantize_int4(q, dim)
    assert got.dtype == np.float32 and got.shape == x.shape
    # float32 rounding of the folded form: under a thousandth of the token's code step
    assert np.all(np.abs(got - exact).max(-1) <= 1e-3 * tail[..., 0])
    assert np.abs(got - exact).max() > 0 or dim < 16  # (the bound is not vacuous: rounding is seen)
    out = np.empty_like(got)
    assert dequantize_int4(q, dim, out) is out
    np.testing.assert_array_equal(out, got)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
@pytest.mark.parametrize("rotation", ["hadamard", "none"])
def test_host_and_device_quantizers_give_the_same_bytes(rotation, device):
    rng = np.random.default_rng(0)
    for shape in [(3, 5, 16), (2, 2, 7, 128), (5, 3584), (4, 15), (2, 4, 300, 128)]:
        x = (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 3, shape[:-1] + (1,))).astype(np.float32)
        host = quantize_int4(x, rotation)
        assert host.shape == shape[:-1] + (stored_dim(shape[-1], "int4"),)
        np.testing.assert_array_equal(host, quantize_on_device(torch.from_numpy(x).to(device), rotation).cpu().numpy())
    assert encode(host, "int4") is host  # codes from the device pass unchanged


def test_error_within_half_a_step_of_the_rotated_range():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((64, 32)).astype(np.float32)
    x[:, 5] *= 40  # an outlier channel, as keys have
    for rotation in ("hadamard", "none"):
        y = rotate(x) if rotation == "hadamard" else x
        step = (y.max(1) - y.min(1)) / 15
        err = np.linalg.norm(x - dequantize_int4(quantize_int4(x, rotation), 32, rotation=rotation), axis=1)
        assert np.all(err <= np.sqrt(32) * step / 2 * (1 + 1e-5))
    plain = dequantize_int4(quantize_int4(x, "none"), 32, rotation="none")
    rotated = dequantize_int4(quantize_int4(x), 32)
    assert np.linalg.norm(x - rotated) < 0.5 * np.linalg.norm(x - plain)  # the rotation pays off on outliers


def test_int4_store_against_the_lossless_store(tmp_path):
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=4, batch_size=2, part_size=2)
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    extract(ExtractConfig(out=str(tmp_path / "i4"), store_dtype="int4", **kw))
    assert verify_store(tmp_path / "i4").ok
    ref, lossy = FeatureStore.open(tmp_path / "f32"), FeatureStore.open(tmp_path / "i4")
    enc = lossy.meta.compressor
    assert lossy.meta.store_dtype == "int4"
    assert (enc.quant, enc.scale, enc.rotation, enc.rotation_seed) == ("int4", "minmax", "hadamard", 0)
    assert "int4" in lossy.describe()["encoding"]
    assert lossy.describe()["text queries dtype"] == "float32 on disk (lossless)"
    assert "text queries dtype" not in ref.describe()
    for kind in ("keys", "values"):
        a, b = ref.read(kind, 1, 1).data, lossy.read(kind, 1, 1).data
        raw = lossy._raw(0, kind, 1, 1)
        np.testing.assert_array_equal(raw, quantize_int4(a[: raw.shape[0]]))  # the device's bytes
        r = rotate(a)
        step = (r.max(1) - r.min(1)) / 15
        assert np.all(np.linalg.norm(a - b, axis=1) <= np.sqrt(a.shape[1]) * step / 2 * (1 + 1e-5))
    a, b = ref.read("post_proj").data, lossy.read("post_proj").data
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cos.min() > 0.97
    # the text queries stay lossless (the compute dtype): a text-grounded probe's error is the
    # images' alone; a lossless store records nothing (its metadata as before)
    assert (lossy.meta.text_dtype, lossy.meta.text_store_dtype, ref.meta.text_dtype) == ("float32", "float32", "")
    assert "text_dtype" in lossy.meta.to_dict() and "text_dtype" not in ref.meta.to_dict()
    for args in (("values", 0, 0), ("keys", 1, 1), ("post_proj",)):
        np.testing.assert_array_equal(lossy.text(*args), ref.text(*args))
    # a lossy store made before text_dtype existed: its text queries in its own encoding
    older = FeatureSetMeta.from_dict({k: v for k, v in lossy.meta.to_dict().items() if k != "text_dtype"})
    assert older.text_store_dtype == "int4"
    size = {k: sum(f.stat().st_size for f in (tmp_path / k / "parts").rglob("c/*/*/0/0") if f.is_file())
            for k in ("f32", "i4")}
    assert 0 < size["i4"] < 0.35 * size["f32"]  # 16 bytes per 16-number token against 64 (compressed)



def test_the_stored_basis_is_the_rotated_decoding_with_the_same_inner_products(tmp_path):
    """basis="stored" returns int4's vectors still rotated (what rotation-invariant probes read):
    the rotation of the model-basis read, with its inner products; text queries rotate alike;
    the device decoder agrees; a lossless store's two bases are one."""
    from kvpipe.store.device_decode import decoder

    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=4, batch_size=2, part_size=2)
    extract(ExtractConfig(out=str(tmp_path / "i4"), store_dtype="int4", **kw))
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    lossy, ref = FeatureStore.open(tmp_path / "i4"), FeatureStore.open(tmp_path / "f32")
    for args in (("keys", 1, 1), ("values", 0, 0), ("post_proj",)):
        model, stored = lossy.read(*args), lossy.read(*args, basis="stored")
        assert (model.basis, stored.basis) == ("model", "stored")
        m, s = model.data, stored.data
        assert not np.allclose(m, s, atol=1e-3)  # really left rotated
        np.testing.assert_allclose(s, rotate(m), atol=2e-5 * np.abs(m).max())
        np.testing.assert_allclose(s @ s.T, m @ m.T, rtol=1e-4, atol=1e-4 * np.abs(m @ m.T).max())
        raw = lossy.read(*args, device="cpu", basis="stored").data.numpy()
        np.testing.assert_allclose(raw, s, rtol=1e-6, atol=1e-6 * np.abs(s).max())
        text_m, text_s = lossy.text(*args), lossy.text(*args, basis="stored")
        np.testing.assert_allclose(text_s, rotate(text_m), rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(s @ text_s.T, m @ text_m.T, rtol=1e-4, atol=1e-4 * np.abs(m @ text_m.T).max())
        np.testing.assert_array_equal(ref.read(*args, basis="stored").data, ref.read(*args).data)
        np.testing.assert_array_equal(ref.text(*args, basis="stored"), ref.text(*args))
    for call in (lambda: lossy.read("keys", 0, 0, basis="rotated"), lambda: lossy.text("keys", 0, 0, basis="x"),
                 lambda: decoder("int4", None, "rotated")):
        with pytest.raises(StoreError, match="basis must be one of model, stored"):
            call()

def test_int4_store_on_an_object_store_keeps_its_text_queries_lossless(tmp_path, s3_server):
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=2, batch_size=2, part_size=2)
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    url = "s3://kvpipe-test/stores/int4-text"
    extract(ExtractConfig(out=url, store_dtype="int4", **kw))
    ref, lossy = FeatureStore.open(tmp_path / "f32"), FeatureStore.open(url)
    assert (lossy.meta.store_dtype, lossy.meta.text_dtype) == ("int4", "float32")
    np.testing.assert_array_equal(lossy.text("keys", 0, 1), ref.text("keys", 0, 1))
    assert not np.array_equal(lossy.read("keys", 0, 1).data, ref.read("keys", 0, 1).data)  # the images: int4


def _edit(store, **fields):
    doc = json.loads((store / "zarr.json").read_text())
    for key, value in fields.items():
        if isinstance(value, dict):
            doc["attributes"]["kvpipe"][key].update(value)
        else:
            doc["attributes"]["kvpipe"][key] = value
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("fields,says", [
    ({"store_dtype": "int2"}, "encoding 'int2'"),
    ({"compressor": {"quant": "nf4"}}, "compressor.quant 'nf4'"),
    ({"compressor": {"rotation": "learned"}}, "compressor.rotation 'learned'"),
    ({"views": {"views": "tiles"}}, "views.views 'tiles'"),
    ({"text_dtype": "int2"}, "encoding 'int2' (text_dtype)"),
])
def test_a_newer_encoding_asks_for_an_upgrade(tmp_path, fields, says):
    store = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(store), limit=2, batch_size=2,
                          store_dtype="int4"))
    _edit(store, **fields)
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    msg = str(err.value)
    assert says in msg and "upgrade kvpipe" in msg and "\n" not in msg, msg


def test_device_quantizer_makes_no_host_tensors_per_layer(monkeypatch):
    """After the first call the quantisers build no tensor from host memory: on a GPU each such
    copy waits for everything queued before it (the forward pass), stalling the host per layer."""
    from kvpipe.pipeline.models.capture import quantize_int8 as int8_on_device

    x = torch.randn(4, 2, 9, 128)
    first4, first8 = quantize_on_device(x), int8_on_device(x)

    def refuse(*args, **kwargs):
        raise AssertionError("a tensor made from host memory")

    monkeypatch.setattr(torch, "tensor", refuse)
    assert torch.equal(quantize_on_device(x), first4) and torch.equal(int8_on_device(x), first8)


@pytest.mark.parametrize("rows", [1, 2, 3, 5])
def test_slices_of_several_layers_give_the_same_bytes(rows):
    """On a GPU several layers are quantised per slice (fewer kernel launches); the bytes must
    not depend on the slice, including a last slice shorter than the others."""
    x = torch.randn(5, 2, 9, 128) * 3
    one_layer = quantize_on_device(x)
    assert torch.equal(quantize_on_device(x, rows=rows), one_layer)


def test_slice_rows_fill_the_device_budget():
    """A 7B layer (4 heads x 4,096 tokens x 128: 8 MiB of float32) per slice on the CPU, the
    whole stack on a GPU; a [tokens, 3584] post-projector array in token blocks, never a
    token per slice (8,192 slices of a few kernels each made int4 launch-bound on a GPU)."""
    from kvpipe.pipeline.models import capture

    layers = torch.empty(28, 4, 4096, 128, device="meta")
    assert capture.int4_slice_rows(layers, torch.device("cpu")) == 1
    assert capture.int4_slice_rows(layers, torch.device("cuda")) == 28
    post = torch.empty(8192, 3584, device="meta")
    assert capture.int4_slice_rows(post, torch.device("cpu")) == (8 << 20) // (4 * 3584)
    assert capture.int4_slice_rows(post, torch.device("cuda")) == 8192
    assert capture.int4_slice_rows(torch.empty(3, 1 << 29, device="meta"), torch.device("cuda")) == 1
