"""A part's batches on the host, the device-to-host copier, its buffer pool and the direct chunk read path."""

from __future__ import annotations

import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kvpipe.pipeline.extraction.parts import PartBuilder
from kvpipe.pipeline.extraction.transfer import HostCopier, HostBufferPool, upload_ahead
from kvpipe.errors import StoreError
from kvpipe.store import FeatureStore


def _items(n: int):
    lay = SimpleNamespace(base=SimpleNamespace(rows=1, cols=1), segments_json=lambda: "[]")
    rec = SimpleNamespace(image_id="x", source="s", group="", frame=-1, prefix=None)
    return [(i, rec, (8, 8), lay, SimpleNamespace(mask=None, meta={})) for i in range(n)]


def test_part_pieces_equal_concatenation():
    builder = PartBuilder(0)
    copier = HostCopier(torch.device("cpu"))
    rng = np.random.default_rng(0)
    batches = []
    for counts in ([3, 3], [5, 9]):  # batches of different token counts
        n = sum(counts)
        arrays = {"keys": torch.from_numpy(rng.standard_normal((2, 1, n, 4)).astype(np.float32)),
                  "post_proj": torch.from_numpy(rng.standard_normal((n, 6)).astype(np.float32))}
        batches.append(arrays)
        builder.reserve(_items(len(counts)), counts)
        builder.add(copier.submit(arrays))
    out = builder.arrays()
    keys = np.concatenate([b["keys"].numpy() for b in batches], axis=2)
    post = np.concatenate([b["post_proj"].numpy() for b in batches])
    assert out["keys"].shape == keys.shape and out["post_proj"].shape == post.shape
    np.testing.assert_array_equal(np.asarray(out["keys"]), keys)
    for li in range(2):  # one chunk = one (layer, head), joined from both batches
        np.testing.assert_array_equal(out["keys"][li:li + 1, 0:1, 0:20, 0:4], keys[li:li + 1, 0:1])
    np.testing.assert_array_equal(out["post_proj"][0:20, 0:6], post)
    with pytest.raises(ValueError, match="span the token axis"):
        out["keys"][0:1, 0:1, 3:20, 0:4]
    assert [r.token_offset for r in builder.rows] == [0, 3, 6, 11]


def test_copier_sends_bfloat16_as_its_bits():
    t = torch.tensor([[1.0, -2.5]], dtype=torch.bfloat16)
    copied = HostCopier(torch.device("cpu")).submit({"v": t})
    copied.wait()
    assert copied.host["v"].dtype == np.uint16
    np.testing.assert_array_equal(copied.host["v"], t.view(torch.int16).numpy().view(np.uint16))


def test_host_buffer_pool_reuses_the_smallest_fitting_buffer():
    pool = HostBufferPool(pin=False)
    a, b = pool.take(100, torch.int16), pool.take(10, torch.int16)
    pool.give([a, b])
    assert pool.take(8, torch.int16) is b  # the smallest that fits
    assert pool.take(8, torch.int16) is a
    assert pool.take(8, torch.int16) is not a  # none left: a new one
    pool.give([a])
    assert pool.take(8, torch.int8) is not a  # another dtype never shares


def test_upload_ahead_keeps_order_and_runs_ahead():
    import threading

    asked: list[int] = []

    def items():
        for i in range(5):
            asked.append(i)
            yield i

    def upload(i: int) -> tuple[int, str]:
        return i, threading.current_thread().name

    out = upload_ahead(items(), upload, ahead=2)
    first = next(out)
    assert first[0] == 0 and first[1].startswith("kvpipe-upload")  # uploaded on its own thread
    deadline = time.monotonic() + 10
    while len(asked) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert asked == [0, 1, 2]  # two more fetched before they were asked for, and no more
    assert [i for i, _ in out] == [1, 2, 3, 4]


def test_upload_ahead_raises_where_the_item_would():
    def items():
        yield 1
        raise ValueError("unreadable image")

    out = upload_ahead(items(), lambda i: i * 10)
    assert next(out) == 10
    with pytest.raises(ValueError, match="unreadable image"):
        next(out)


def test_direct_chunk_read_equals_zarr(synthetic_store):
    store = FeatureStore.open(synthetic_store)
    arr = store._array(0, "values")
    direct = store._chunk_file(0, "values", 1, 0)  # no Zarr metadata read
    assert direct is not None
    np.testing.assert_array_equal(direct, np.asarray(arr[1, 0]))
    store._tokens[0] += 1  # a token count that does not match the chunk is damage, not a reason to guess
    with pytest.raises(StoreError, match="the manifest says"):
        store._chunk_file(0, "values", 1, 0)


def test_loader_processes_give_the_same_store(tmp_path):
    from kvpipe.pipeline.extraction import ExtractConfig, extract

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


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("pinned", [False, True])
def test_cuda_copies_land_in_reused_host_buffers(pinned):
    copier = HostCopier(torch.device("cuda"), pinned=pinned)
    for _ in range(3):  # three parts: the second and third reuse the first one's buffers
        builder = PartBuilder(0)
        tensors = [torch.randn(2, 1, n, 4, device="cuda").to(torch.bfloat16) for n in (5, 7)]
        for t in tensors:
            builder.reserve(_items(1), [t.shape[2]])
            builder.add(copier.submit({"keys": t}))
        want = np.concatenate([t.view(torch.int16).cpu().numpy().view(np.uint16) for t in tensors], axis=2)
        np.testing.assert_array_equal(np.asarray(builder.arrays()["keys"]), want)
        builder.release()
    assert len(copier.pool.free) == 2 and all(b.is_pinned() == pinned for b in copier.pool.free)
    copier.close()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_buffers_are_unregistered_when_freed():
    """A registered mapping freed without unregistering leaves a stale range in the driver:
    a later host buffer at the same address then fails its copies ("invalid argument")."""
    import gc
    import mmap

    from kvpipe.pipeline.extraction.transfer import on_pin_thread, pinned_host_buffer

    n = 1 << 20
    buf, registered = pinned_host_buffer(n, torch.bfloat16)
    assert buf.is_pinned() and buf.numel() == n
    address = buf.data_ptr()
    pool = HostBufferPool(pin=True, keep=0)
    pool.give([buf])  # keep=0: dropped at once
    assert pool.free == []
    del buf
    gc.collect()
    if registered:  # unregistered when freed: a second unregistration is an error
        assert on_pin_thread("cudaHostUnregister", address) != 0
    region = mmap.mmap(-1, 2 * n)  # likely the same addresses again
    fresh = torch.frombuffer(region, dtype=torch.bfloat16)
    fresh.fill_(1.5)
    assert torch.equal(fresh.to("cuda").cpu(), fresh)



@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_inputs_uploaded_ahead_equal_a_plain_copy():
    from kvpipe.pipeline.extraction.transfer import InputUploader

    uploader = InputUploader(torch.device("cuda"), keep=("image_sizes",))
    ids = torch.arange(40).view(4, 10)[:, :7]  # a slice, as the processor's cut leaves it
    for _ in range(3):  # the page-locked buffers are reused
        inputs = {"input_ids": ids, "pixel_values": torch.randn(4, 3, 8, 8),
                  "image_sizes": torch.tensor([[8, 8]] * 4), "flag": True}
        got = uploader.upload(inputs).use()
        assert got["pixel_values"].is_cuda and torch.equal(got["pixel_values"].cpu(), inputs["pixel_values"])
        assert torch.equal(got["input_ids"].cpu(), ids) and got["input_ids"].dtype == torch.int64
        assert got["image_sizes"] is inputs["image_sizes"] and got["flag"] is True  # kept on the host
    assert len(uploader.pool.free) == 2 and all(b.is_pinned() for b in uploader.pool.free)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_pinned_buffer_taken_under_inference_mode_is_writable_outside_it():
    from kvpipe.pipeline.extraction.transfer import pinned_host_buffer

    with torch.inference_mode():
        buf, _ = pinned_host_buffer(1 << 20, torch.uint8)
    buf.fill_(7)  # an inference tensor would refuse this outside inference mode
    assert int(buf[-1]) == 7
