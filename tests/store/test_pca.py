"""The principal-component store encoding: a hand-computed record, the step and its error,
the codes' size against int4's at the same error on a source with a mean and unequal
variances, wide vectors in blocks, token slices, a store extracted with --store-dtype pca
against the lossless one, and stores whose pca parameters this kvpipe does not know."""

from __future__ import annotations

import json

import numpy as np
import pytest
from numcodecs import Blosc

from kvpipe.errors import StoreError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore
from kvpipe.store.chunks import TokenSegments, write_chunks
from kvpipe.store.encoding import compressor, decode, encode
from kvpipe.store.pca import PCA_STEP, PcaChunk, block_width, decode_pca, encode_pca, header_rows
from kvpipe.store.quant import dequantize_int4, quantize_int4
from kvpipe.store.verify import verify_store


def _zstd_bytes(a: np.ndarray) -> int:
    """What the store's codec (Blosc zstd 1) keeps of an array."""
    return len(Blosc("zstd", 1, Blosc.SHUFFLE).encode(np.ascontiguousarray(a)))


def test_hand_computed_record():
    """Four tokens around a mean, spread along channels 0 and 1 only: the mean is stored as it
    is, the components are channels 0 and 1 (largest variance first), and with the step set to
    1 the codes are the offsets themselves (+-4 and +-2), the other components' codes 0."""
    mean = np.array([3.0, -1.0, 0.5, 2.0], np.float32)
    offsets = np.array([[4, 0, 0, 0], [-4, 0, 0, 0], [0, 2, 0, 0], [0, -2, 0, 0]], np.float32)
    x = mean + offsets
    typical = np.median(np.linalg.norm(x, axis=1)) / 2  # median length over sqrt(4)
    record = encode_pca(x, step=1 / typical)  # a step of exactly 1
    assert record.dtype == np.int8 and record.shape == (4 + header_rows(4), 4) and header_rows(4) == 12
    flat = record.reshape(-1)
    np.testing.assert_array_equal(flat[:16].view(np.float32), mean)
    basis = flat[32:48].reshape(4, 4)
    np.testing.assert_array_equal(np.abs(basis[:2]), [[127, 0, 0, 0], [0, 127, 0, 0]])  # e0, e1 (any sign)
    scales = flat[16:32].view(np.float32)
    np.testing.assert_allclose(scales[:2], 1 / 127, rtol=1e-6)  # step 1 times the basis rows' 1/127
    codes = flat[48:].reshape(4, 4)  # component-major: component c of token t at c * 4 + t
    np.testing.assert_array_equal(np.abs(codes[0]), [4, 4, 0, 0])
    np.testing.assert_array_equal(np.abs(codes[1]), [0, 0, 2, 2])
    np.testing.assert_array_equal(codes[2:], 0)
    np.testing.assert_allclose(decode_pca(record), x, atol=1e-5)


def _skewed(n: int, dim: int, seed: int = 0, decades: float = 2.0) -> np.ndarray:
    """Vectors with a mean and principal variances spread over ``decades``, in a random basis."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    sd = np.exp(-np.arange(dim) / dim * decades * np.log(10) / 2)
    return ((rng.standard_normal((n, dim)) * sd) @ basis.T + 0.6 * rng.standard_normal(dim)).astype(np.float32)


@pytest.mark.parametrize("step", [0.3, 0.35, 0.6])
def test_relative_error_is_a_uniform_quantisers(step):
    """Every coded component's error is uniform over one step: the squared error is step^2 / 12
    of the mean square at most (within 5%), less where components are smaller than a step."""
    x = _skewed(4096, 64, decades=0.5)
    err = ((decode_pca(encode_pca(x, step)) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()
    assert 0.6 * step ** 2 / 12 < err < 1.05 * step ** 2 / 12


def test_smaller_than_int4_at_int4s_error_where_a_mean_and_basis_exist():
    """The reason for the encoding: on vectors with a mean and unequal principal variances, at
    int4's own squared error, the pca record (its basis and mean included) under the store's
    codec is at most 0.8 of int4's bytes. On isotropic vectors without a mean there is little
    to gain (at most 20% fewer bytes, the uniform step against int4's range)."""
    for x, most in ((_skewed(4096, 128), 0.8), (np.random.default_rng(1).standard_normal((4096, 128)), 1.0)):
        x = x.astype(np.float32)
        energy = (x.astype(np.float64) ** 2).sum()
        q = quantize_int4(x)
        int4_err = ((dequantize_int4(q, 128) - x) ** 2).sum() / energy
        step = np.sqrt(12 * int4_err)  # the same squared error
        record = encode_pca(x, step)
        err = ((decode_pca(record) - x) ** 2).sum() / energy
        assert err < 1.05 * int4_err
        ratio = _zstd_bytes(record) / _zstd_bytes(q)
        assert ratio < most and ratio > 0.8 * most - 0.2, ratio


def test_a_component_past_127_steps_gets_its_own_step():
    """One far token: its component's codes would pass +-127, so that one component's step
    grows to fit (nothing is clipped: the far token decodes within 1% of its length); every
    other component keeps the chunk's step."""
    x = _skewed(512, 16, decades=0.5)
    x[7] += 400.0 * np.eye(16, dtype=np.float32)[3]
    record = encode_pca(x, 0.3)
    chunk = PcaChunk(record)
    assert np.abs(chunk.codes.astype(int)).max() == 127
    got = decode_pca(record)
    assert np.linalg.norm(got[7] - x[7]) < 0.01 * np.linalg.norm(x[7])
    # each component's step: its scale over its int8 basis row's scale (the row has unit length)
    steps = chunk.scale[0] * np.linalg.norm(chunk.basis8[0].astype(np.float64), axis=1)
    typical = np.median(np.linalg.norm(x, axis=1)) / 4  # the far token does not move the median
    grown = np.argmax(steps)
    assert steps[grown] > 5 * 0.3 * typical  # the far token's component (400 / 127, about 10 x)
    np.testing.assert_allclose(np.delete(steps, grown), 0.3 * typical, rtol=3e-3)  # the int8 rows' rounding


def test_a_basis_is_kept_where_it_pays_for_itself():
    """The principal basis costs b x b int8 bytes per block: a chunk of a few hundred tokens
    keeps its channels (the identity basis; stored in almost nothing), a chunk of thousands
    fits its basis; both codings are smaller than int4's at its error on skewed vectors."""
    from kvpipe.store.pca import basis_pays

    # by hand: two components of variance 4 and 1 against channels of 2.5 and 2.5, no noise:
    # 0.5 * (2 log2 2.5 - log2 4) = 0.32 bits per token; a 2 x 2 basis costs 32 bits
    vals, chans = np.array([[1.0, 4.0]]), np.array([[2.5, 2.5]])
    assert not basis_pays(vals, chans, 0.0, 99)[0] and basis_pays(vals, chans, 0.0, 101)[0]
    assert not basis_pays(vals, chans, 10.0, 10**6)[0]  # below the noise nothing is saved
    x = _skewed(8192, 128)
    for n, identity in ((300, True), (8192, False)):
        chunk = PcaChunk(encode_pca(x[:n], 0.35))
        assert np.array_equal(np.abs(chunk.basis8[0].astype(int)) == 127, np.eye(128, dtype=bool)) == identity
        q = quantize_int4(x[:n])
        err = ((decode_pca(encode_pca(x[:n], 0.35)) - x[:n]) ** 2).sum() / (x[:n].astype(np.float64) ** 2).sum()
        int4_err = ((dequantize_int4(q, 128) - x[:n]) ** 2).sum() / (x[:n].astype(np.float64) ** 2).sum()
        assert err < 1.1 * int4_err
        assert _zstd_bytes(encode_pca(x[:n], 0.35)) < _zstd_bytes(q)


def test_wide_vectors_are_coded_in_blocks_of_128():
    """A post-projector's width (512 here, 3,584 in Qwen2.5-VL-7B) has a basis per block of 128
    channels: the header is 136 rows however wide the vector, each block keeps its own mean."""
    assert (block_width(16), block_width(256), block_width(512), block_width(3584)) == (16, 256, 128, 128)
    assert header_rows(3584) == header_rows(512) == 136
    x = np.concatenate([_skewed(600, 128, seed) + 10 * seed for seed in range(4)], axis=1)
    record = encode_pca(x, 0.3)
    assert record.shape == (600 + 136, 512)
    np.testing.assert_allclose(PcaChunk(record).mean, x.mean(0), rtol=1e-5, atol=1e-4)
    err = ((decode_pca(record) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()
    assert err < 0.3 ** 2 / 12


def test_slices_decode_to_the_whole_records_rows():
    x = _skewed(300, 32)
    chunk = PcaChunk(encode_pca(x))
    whole = decode_pca(encode_pca(x))
    for a, b in ((0, 300), (17, 18), (100, 250)):
        part = chunk[a:b]
        assert part.shape == (b - a, 32)
        out = np.empty(part.shape, np.float32)
        part.decode_into(out)
        np.testing.assert_allclose(out, whole[a:b], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(decode(part, "pca"), whole[a:b], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(chunk[10:40][5:10].decode_into(np.empty((5, 32), np.float32)), whole[15:20],
                               rtol=1e-6, atol=1e-6)


def test_a_chunk_from_batches_is_the_record_of_the_whole(tmp_path):
    """The writer joins a part's batches inside the chunk's task and codes the whole chunk: the
    same bytes as one record of all its tokens, from bf16 bit patterns as the device sends them."""
    from kvpipe.store.encoding import float32_to_bf16_bits

    x = float32_to_bf16_bits(np.stack([[_skewed(90, 16, s)] for s in range(2)]))  # [2, 1, 90, 16]
    pieces = TokenSegments([x[:, :, :40], x[:, :, 40:]], axis=2)
    codec = compressor("pca")
    write_chunks(tmp_path, pieces, (1, 1, 90, 16), codec, lambda c: encode_pca(c))
    for layer in range(2):
        raw = Blosc().decode((tmp_path / f"c/{layer}/0/0/0").read_bytes())
        np.testing.assert_array_equal(np.frombuffer(raw, np.int8), encode_pca(x[layer, 0]).reshape(-1))
    np.testing.assert_array_equal(encode(x, "pca")[1, 0], encode_pca(x[1, 0]))


def test_pca_store_against_the_lossless_store(tmp_path):
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=6, batch_size=2, part_size=4)
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    extract(ExtractConfig(out=str(tmp_path / "pca"), store_dtype="pca", **kw))
    extract(ExtractConfig(out=str(tmp_path / "i4"), store_dtype="int4", **kw))
    assert verify_store(tmp_path / "pca").ok
    ref, lossy = FeatureStore.open(tmp_path / "f32"), FeatureStore.open(tmp_path / "pca")
    enc = lossy.meta.compressor
    assert (lossy.meta.store_dtype, enc.quant, enc.scale, enc.step) == ("pca", "pca", "step", PCA_STEP)
    assert lossy.meta.text_dtype == "float32"  # text queries stay lossless
    for args in (("keys", 1, 1), ("values", 0, 0), ("post_proj",)):
        a, b = ref.read(*args).data, lossy.read(*args).data
        err = ((a - b) ** 2).sum() / (a.astype(np.float64) ** 2).sum()
        assert 0.2 * PCA_STEP ** 2 / 12 < err < 1.05 * PCA_STEP ** 2 / 12, (args, err)
        np.testing.assert_array_equal(lossy.read(*args, basis="stored").data, b)  # one basis: the model's
        np.testing.assert_array_equal(lossy.text(*args), ref.text(*args))
    raw = lossy._raw(1, "keys", 1, 1)  # part 1: its 2 images' tokens after the header
    assert raw.shape == (lossy._part_tokens(1) + header_rows(16), 16)
    size = {k: sum(f.stat().st_size for f in (tmp_path / k / "parts").rglob("c/*/*/0/0") if f.is_file())
            for k in ("f32", "pca", "i4")}
    assert 0 < size["pca"] < 0.5 * size["f32"]


def test_a_damaged_pca_chunk_is_reported(tmp_path):
    """A chunk that holds fewer tokens than its manifest says: verify names it, a read refuses it."""
    store = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(store), limit=2, batch_size=2,
                          store_dtype="pca"))
    opened = FeatureStore.open(store)
    short = encode_pca(np.ones((opened._part_tokens(0) - 1, 16), np.float32))
    import zarr

    zarr.open_array(store / "parts/p000000/keys", mode="r+")  # the array exists
    path = store / "parts/p000000/keys/c/0/0/0/0"
    path.write_bytes(compressor("pca").to_dict() and Blosc("zstd", 1, Blosc.SHUFFLE).encode(short))
    report = verify_store(store)
    assert not report.ok
    with pytest.raises(StoreError, match="CRC32C|tokens"):
        FeatureStore.open(store).read("keys", 0, 0)


@pytest.mark.parametrize("fields,says", [
    ({"compressor": {"quant": "pca2"}}, "compressor.quant 'pca2'"),
    ({"compressor": {"scale": "per-token-step"}}, "compressor.scale 'per-token-step'"),
    ({"compressor": {"step": "big"}}, "compressor.step"),
])
def test_unknown_pca_parameters_are_refused_in_one_line(tmp_path, fields, says):
    store = tmp_path / "s"
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(store), limit=2, batch_size=2,
                          store_dtype="pca"))
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["kvpipe"]["compressor"].update(fields["compressor"])
    (store / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    assert says in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_the_recorded_step_is_the_one_decoded_and_written(tmp_path):
    """A store written with another step (its metadata) codes and decodes with that step."""
    from kvpipe.store.encoding import encoding_for

    x = _skewed(2048, 32, decades=0.5)
    coarse = encoding_for("pca", {"quant": "pca", "scale": "step", "step": 0.8})
    err = ((decode(coarse.chunk_encode(x), "pca", {"step": 0.8}) - x) ** 2).sum() / (x.astype(np.float64) ** 2).sum()
    assert 0.6 * 0.8 ** 2 / 12 < err < 1.05 * 0.8 ** 2 / 12


def test_a_pca_store_on_an_object_store_reads_as_the_local_one(tmp_path, s3_server):
    """Parts uploaded to an object store carry the same records: the same vectors on read."""
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=4, batch_size=2, part_size=2, store_dtype="pca")
    extract(ExtractConfig(out=str(tmp_path / "local"), **kw))
    url = "s3://kvpipe-test/stores/pca"
    extract(ExtractConfig(out=url, **kw))
    local, remote = FeatureStore.open(tmp_path / "local"), FeatureStore.open(url)
    for args in (("keys", 1, 0), ("post_proj",)):
        np.testing.assert_array_equal(remote.read(*args).data, local.read(*args).data)
