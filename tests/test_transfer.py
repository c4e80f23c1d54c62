"""Host buffers of a part, the host stager and the direct chunk read path."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from kvpipe.pipeline.capture import Selection
from kvpipe.pipeline.extract import BufferPool, PartBuilder
from kvpipe.pipeline.transfer import HostStager
from kvpipe.store import FeatureStore


def _items(n: int):
    lay = SimpleNamespace(base=SimpleNamespace(rows=1, cols=1), segments_json=lambda: "[]")
    rec = SimpleNamespace(image_id="x", source="s", group="", frame=-1, prefix=None)
    return [(i, rec, (8, 8), lay, SimpleNamespace(mask=None, meta={})) for i in range(n)]


def test_part_buffers_grow_and_equal_concatenation():
    sel = Selection((0, 1), (0,), ("keys", "post_proj"))
    builder = PartBuilder(0, sel, part_size=4, pool=BufferPool())
    stager = HostStager(torch.device("cpu"))
    rng = np.random.default_rng(0)
    batches = []
    for counts in ([3, 3], [5, 9]):  # the second batch is larger than planned from the first
        n = sum(counts)
        arrays = {"keys": torch.from_numpy(rng.standard_normal((2, 1, n, 4)).astype(np.float32)),
                  "post_proj": torch.from_numpy(rng.standard_normal((n, 6)).astype(np.float32))}
        batches.append(arrays)
        a, b = builder.reserve(_items(len(counts)), counts)
        builder.copies.append(stager.submit(arrays, builder.sink(a, b)))
    out = builder.arrays()
    np.testing.assert_array_equal(out["keys"], np.concatenate([b["keys"].numpy() for b in batches], axis=2))
    np.testing.assert_array_equal(out["post_proj"], np.concatenate([b["post_proj"].numpy() for b in batches]))
    assert [r.token_offset for r in builder.rows] == [0, 3, 6, 11]


def test_stager_sends_bfloat16_as_its_bits():
    t = torch.tensor([[1.0, -2.5]], dtype=torch.bfloat16)
    got = {}
    HostStager(torch.device("cpu")).submit({"v": t}, got.update).result()
    assert got["v"].dtype == np.uint16
    np.testing.assert_array_equal(got["v"], t.view(torch.int16).numpy().view(np.uint16))


def test_buffer_pool_reuses_fitting_buffers():
    pool = BufferPool()
    a = pool.take((2, 1), 10, (4,), np.dtype(np.uint16))
    pool.give([a])
    assert pool.take((2, 1), 8, (4,), np.dtype(np.uint16)) is a
    assert pool.take((2, 1), 8, (4,), np.dtype(np.uint16)) is not a


def test_direct_chunk_read_equals_zarr(synthetic_store):
    store = FeatureStore.open(synthetic_store)
    arr = store._array(0, "values")
    direct = store._chunk_file(0, "values", 1, 0)  # no Zarr metadata read
    assert direct is not None
    np.testing.assert_array_equal(direct, np.asarray(arr[1, 0]))
    store._tokens[0] += 1  # a token count that does not match the chunk: Zarr reads it instead
    assert store._chunk_file(0, "values", 1, 0) is None
    np.testing.assert_array_equal(store._raw(0, "values", 1, 0), direct)


def test_loader_processes_give_the_same_store(tmp_path):
    from kvpipe.pipeline.extract import ExtractConfig, extract

    stores = []
    for name, procs in (("threads", 0), ("processes", 2)):
        out = tmp_path / name
        res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(out), limit=8,
                                    batch_size=2, part_size=4, loader_processes=procs))
        assert res.images_ok == 8
        stores.append(FeatureStore.open(out))
    a, b = stores
    assert [r.image_id for r in a.images()] == [r.image_id for r in b.images()]
    for kind in ("keys", "values"):
        np.testing.assert_array_equal(a.read(kind, 1, 1).data, b.read(kind, 1, 1).data)
    np.testing.assert_array_equal(a.annotation(a.images()[5]).mask, b.annotation(b.images()[5]).mask)
