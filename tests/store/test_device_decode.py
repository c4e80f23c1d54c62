"""Decoding on a torch device (``FeatureStore.read(..., device=...)``) equals the host decoder
for every encoding, widths of one and of several Hadamard blocks, and any image order."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvpipe.errors import StoreError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore
from kvpipe.store.device_decode import decoder, to_device
from kvpipe.store.encoding import decode, encode


@pytest.mark.parametrize("store_dtype, params", [
    ("float32", None), ("float16", None), ("bfloat16", None), ("int8", None), ("int4", None),
    ("int4", {"rotation": "none"}), ("int4", {"rotation": "hadamard", "rotation_seed": 7})])
@pytest.mark.parametrize("dim", [128, 3584, 96, 15])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_device_decoder_equals_the_host_decoder(store_dtype, params, dim, device):
    from kvpipe.store.quant import quantize_int4

    rng = np.random.default_rng(dim)
    x = (rng.standard_normal((37, dim)) * 3 + rng.normal(0, 20, (37, 1))).astype(np.float32)
    if store_dtype == "int4" and params is not None:
        seed = params.get("rotation_seed", 0)
        raw = quantize_int4(x, params["rotation"], seed)
    else:
        raw = encode(x, store_dtype)
    host = decode(raw, store_dtype, params, dim)
    got = decoder(store_dtype, params)(to_device(raw, device), dim).cpu()
    assert got.dtype == torch.float32 and tuple(got.shape) == host.shape
    if store_dtype == "int4":  # the same arithmetic, float32 products summed in another order:
        step = np.ascontiguousarray(raw[:, -8:]).view(np.float32)[:, :1]  # within 2/1000 of a code step
        assert np.all(np.abs(got.numpy() - host) <= 2e-3 * step)
    if store_dtype in ("float32", "float16", "bfloat16", "int8") or params == {"rotation": "none"}:
        np.testing.assert_array_equal(got.numpy(), host)  # no product: the same bits
    if store_dtype == "int4" and params and params.get("rotation_seed") == 7:  # the seed is honoured
        assert not np.allclose(decoder("int4")(to_device(raw, device), dim).cpu().numpy(), host, atol=1e-3)


@pytest.mark.parametrize("store_dtype,device", [("bfloat16", "cpu"), ("int4", "cpu"), ("pca", "cpu"),
                                                 pytest.param("pca", "cuda", marks=pytest.mark.skipif(
                                                     not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_read_to_a_device_equals_the_host_read(tmp_path, store_dtype, device):
    """pca's parts each carry their own mean and basis: decoded part by part on the device."""
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "s"), limit=5,
                          batch_size=2, part_size=2, store_dtype=store_dtype))
    store = FeatureStore.open(tmp_path / "s")
    rows = store.images()[::-1][:4]  # across parts, out of order
    for kind, layer, head in (("keys", 1, 1), ("values", 0, 0), ("post_proj", None, None)):
        host = store.read(kind, layer, head, images=rows)
        dev = store.read(kind, layer, head, images=rows, device=device)
        assert isinstance(dev.data, torch.Tensor) and dev.data.dtype == torch.float32
        np.testing.assert_array_equal(dev.offsets, host.offsets)
        assert [r.image_id for r in dev.rows] == [r.image_id for r in host.rows]
        np.testing.assert_allclose(dev.data.cpu().numpy(), host.data, rtol=1e-5, atol=1e-5 * np.abs(host.data).max())


def test_an_unknown_encoding_is_refused_in_one_line():
    with pytest.raises(StoreError, match="encoding 'int2'.*upgrade kvpipe"):
        decoder("int2")


@pytest.mark.parametrize("store_dtype", ["int4", "bfloat16", "pca"])
def test_reads_decoded_in_blocks_over_threads_equal_reads_per_part(tmp_path, monkeypatch, store_dtype):
    """Reads decode in tasks of DECODE_TASK tokens over every read thread: tasks that split a
    part's images mid-image give the per-part decoding's values, in any image order."""
    import kvpipe.store.reader as reader

    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "s"), limit=5,
                          batch_size=2, part_size=2, store_dtype=store_dtype))
    store = FeatureStore.open(tmp_path / "s")
    rows = store.images()[::-1]
    monkeypatch.setattr(reader, "DECODE_TASK", 7)  # several tasks per image
    blocks = store.read("keys", 1, 1, images=rows)
    monkeypatch.setattr(reader, "DECODE_TASK", 10**9)  # one task per run of a part's tokens
    per_part = store.read("keys", 1, 1, images=rows)
    np.testing.assert_allclose(blocks.data, per_part.data, rtol=1e-6, atol=1e-6 * np.abs(per_part.data).max())
    assert blocks.data.shape[0] > 3 * 7


def test_a_read_holds_at_most_read_ahead_parts_per_thread_ahead_of_its_decoding(tmp_path, monkeypatch):
    """Parts are read at most READ_AHEAD x threads ahead of their decoding: a part is read only
    once the part that many before it is decoded (the raw bytes held stay a few parts' worth)."""
    import dataclasses
    import threading

    import kvpipe.store.reader as reader

    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "s"), limit=16,
                          batch_size=2, part_size=2, store_dtype="bfloat16"))
    store = FeatureStore.open(tmp_path / "s")
    tokens = {p: store._part_tokens(p) for p in range(store.n_parts)}
    lock, decoded, read_order, behind = threading.Lock(), [0], [], []
    real_raw, real_encoding_for = FeatureStore._raw, reader.encoding_for

    def raw(self, part, *args):
        with lock:  # tokens the parts read so far hold, less those decoded: at most 2 x 2 parts' worth
            read_order.append(part)
            behind.append(sum(tokens[p] for p in read_order) - decoded[0])
        return real_raw(self, part, *args)

    def encoding_for(*args, **kw):
        enc = real_encoding_for(*args, **kw)

        def decode_into(raw_tokens, out):
            enc.decode_into(raw_tokens, out)
            with lock:
                decoded[0] += len(raw_tokens)
        return dataclasses.replace(enc, decode_into=decode_into)

    monkeypatch.setattr(FeatureStore, "_raw", raw)
    monkeypatch.setattr(reader, "encoding_for", encoding_for)
    monkeypatch.setattr(reader, "READ_THREADS", 2)
    monkeypatch.setattr(reader, "DECODE_TASK", 16)
    got = store.read("keys", 1, 1)
    assert sorted(read_order) == list(range(8)) and decoded[0] == got.data.shape[0] == sum(tokens.values())
    assert reader.READ_AHEAD == 2 and max(behind) <= 2 * 2 * max(tokens.values())
    monkeypatch.setattr(reader, "READ_THREADS", 1)  # the same values read on one thread
    np.testing.assert_array_equal(store.read("keys", 1, 1).data, got.data)
