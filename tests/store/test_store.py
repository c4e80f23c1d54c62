"""Store: round trip, encodings, atomic commits, foreign/newer stores, verify."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import zarr

from kvpipe.errors import StoreError
from kvpipe.store import FeatureStore, FeatureSetMeta
from kvpipe.store import layout
from kvpipe.store.encoding import bf16_bits_to_float32, float32_to_bf16_bits
from kvpipe.store.manifest import FAILED, ImageRow
from kvpipe.store.reader import contiguous_runs
from kvpipe.store.verify import verify_store
from kvpipe.store.writer import StoreWriter

L, H, D, HID = 3, 2, 4, 8


def make_meta(**kw) -> FeatureSetMeta:
    base = dict(model={"name": "m"}, dataset={"name": "d", "tasks": []}, layers=(0, 1, 2), heads=(0, 1),
                kinds=("keys", "values", "post_proj"), keys_rope="post-rope", n_layers=L, n_kv_heads=H,
                head_dim=D, hidden_size=HID, compute_dtype="float32", store_dtype="float32",
                template="chat", prefix="", prefix_token_ids=(1, 2, 3), image_token_id=9,
                part_size=2, n_images=3, image_ids_sha256="x")
    base.update(kw)
    return FeatureSetMeta(**base)


def part_arrays(tokens: list[int], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = sum(tokens)
    return {"keys": rng.standard_normal((L, H, n, D)).astype(np.float32),
            "values": rng.standard_normal((L, H, n, D)).astype(np.float32),
            "post_proj": rng.standard_normal((n, HID)).astype(np.float32),
            "masks": np.arange(12, dtype=np.uint8)}


def rows_for(part: int, first: int, tokens: list[int], grid=(2, 3)) -> list[ImageRow]:
    rows, off = [], 0
    seg = json.dumps([{"name": "base", "offset": 0, "rows": grid[0], "cols": grid[1], "newline": False}])
    for i, n in enumerate(tokens):
        rows.append(ImageRow(index=first + i, image_id=f"img{first + i}", part=part, token_offset=off,
                             n_tokens=n, grid_h=grid[0], grid_w=grid[1], segments=seg,
                             mask_offset=0 if i == 0 else -1, mask_h=3, mask_w=4,
                             meta=json.dumps({"k": i})))
        off += n
    return rows


def write_two_parts(path: Path, meta: FeatureSetMeta | None = None):
    w = StoreWriter.create_or_resume(path, meta or make_meta())
    a0, a1 = part_arrays([6, 6], 0), part_arrays([6], 1)
    w.write_part(0, rows_for(0, 0, [6, 6]), a0)
    w.write_part(1, rows_for(1, 2, [6]), a1)
    return w, a0, a1


def test_round_trip_one_head_across_parts(tmp_path):
    _, a0, a1 = write_two_parts(tmp_path / "s")
    s = FeatureStore.open(tmp_path / "s")
    assert s.complete and len(s.images()) == 3
    f = s.read("values", layer=1, head=0)
    np.testing.assert_array_equal(f.data, np.concatenate([a0["values"][1, 0], a1["values"][1, 0]]))
    np.testing.assert_array_equal(f.image(2), a1["values"][1, 0])
    assert f.grid(1).shape == (2, 3, D)
    np.testing.assert_array_equal(f.grid(1).reshape(6, D), a0["values"][1, 0, 6:12])
    pp = s.read("post_proj", images=s.images()[1:2])
    np.testing.assert_array_equal(pp.data, a0["post_proj"][6:12])
    ann = s.annotation(s.images()[0])
    np.testing.assert_array_equal(ann.mask, np.arange(12).reshape(3, 4))
    assert ann.meta == {"k": 0}


def test_reads_of_any_image_order_decode_the_right_tokens(tmp_path):
    """Rows that continue each other in the part and in the result decode in one call
    (``contiguous_runs``); reversed or gapped selections still get each image's own tokens."""
    _, a0, a1 = write_two_parts(tmp_path / "s")
    s = FeatureStore.open(tmp_path / "s")
    imgs = s.images()
    f = s.read("keys", layer=0, head=1, images=[imgs[1], imgs[0], imgs[2]])
    np.testing.assert_array_equal(f.image(0), a0["keys"][0, 1, 6:12])
    np.testing.assert_array_equal(f.image(1), a0["keys"][0, 1, 0:6])
    np.testing.assert_array_equal(f.image(2), a1["keys"][0, 1])
    assert contiguous_runs([(0, 0, 6), (6, 6, 6), (12, 20, 3), (15, 23, 1)]) == [(0, 0, 12), (12, 20, 4)]
    assert contiguous_runs([(6, 0, 6), (0, 6, 6)]) == [(6, 0, 6), (0, 6, 6)]
    assert contiguous_runs([]) == []


def test_one_head_is_one_chunk(tmp_path):
    write_two_parts(tmp_path / "s")
    arr = zarr.open_array(zarr.storage.LocalStore(layout.part_dir(tmp_path / "s", 0) / "keys"), mode="r")
    assert arr.chunks == (1, 1, 12, D)


def test_bfloat16_bits_round_trip_and_rounding():
    x = np.array([1.0, -2.5, 3.14159265, 1e-3, 65504.0, 1.00390625], dtype=np.float32)
    bits = float32_to_bf16_bits(x)
    back = bf16_bits_to_float32(bits)
    import torch

    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(back, ref)
    np.testing.assert_array_equal(float32_to_bf16_bits(back), bits)


def test_bfloat16_store(tmp_path):
    w = StoreWriter.create_or_resume(tmp_path / "s", make_meta(store_dtype="bfloat16", n_images=1))
    arr = part_arrays([6], 3)
    w.write_part(0, rows_for(0, 0, [6]), arr)
    got = FeatureStore.open(tmp_path / "s").read("keys", 2, 1).data
    np.testing.assert_array_equal(got, bf16_bits_to_float32(float32_to_bf16_bits(arr["keys"][2, 1])))


def test_reader_sees_only_committed_parts(tmp_path):
    w = StoreWriter.create_or_resume(tmp_path / "s", make_meta())
    w.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    # a part directory without its manifest file (a crash between the renames) is invisible
    (layout.part_dir(tmp_path / "s", 1)).mkdir()
    s = FeatureStore.open(tmp_path / "s")
    assert s.committed_parts == [0] and not s.complete and len(s.images()) == 2
    w2 = StoreWriter.create_or_resume(tmp_path / "s", make_meta())
    assert w2.pending_parts() == [1]


def test_failed_rows_and_empty_part(tmp_path):
    w = StoreWriter.create_or_resume(tmp_path / "s", make_meta(n_images=1, part_size=1))
    w.write_part(0, [ImageRow(index=0, image_id="bad", part=0, status=FAILED, error="broken")], {})
    s = FeatureStore.open(tmp_path / "s")
    assert s.images() == [] and s.images(ok_only=False)[0].error == "broken"
    assert verify_store(tmp_path / "s").ok


def test_other_feature_set_is_refused(tmp_path):
    write_two_parts(tmp_path / "s")
    with pytest.raises(StoreError, match="holds another feature set.*layers"):
        StoreWriter.create_or_resume(tmp_path / "s", make_meta(layers=(0, 1)))


def test_foreign_and_newer_stores_are_refused(tmp_path):
    zarr.open_group(zarr.storage.LocalStore(tmp_path / "foreign"), mode="w", attributes={"x": 1})
    with pytest.raises(StoreError, match="not a kvpipe feature store"):
        FeatureStore.open(tmp_path / "foreign")
    with pytest.raises(StoreError, match="does not exist"):
        FeatureStore.open(tmp_path / "missing")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "f.txt").write_text("hi")
    with pytest.raises(StoreError, match="not a kvpipe store"):
        StoreWriter.create_or_resume(tmp_path / "plain", make_meta())
    write_two_parts(tmp_path / "new")
    g = zarr.open_group(zarr.storage.LocalStore(tmp_path / "new"), mode="r+")
    meta = dict(g.attrs["kvpipe"])
    meta["schema_version"] = 99
    g.attrs["kvpipe"] = meta
    with pytest.raises(StoreError, match="schema 99, newer than this kvpipe"):
        FeatureStore.open(tmp_path / "new")


def test_verify_finds_corrupt_chunk(tmp_path):
    write_two_parts(tmp_path / "s")
    assert verify_store(tmp_path / "s").ok
    shard = next(p for p in (layout.part_dir(tmp_path / "s", 1) / "values").rglob("*")
                 if p.is_file() and p.name != "zarr.json")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    report = verify_store(tmp_path / "s")
    assert not report.ok and list(report.problems) == [1]
    assert "checksum" in report.problems[1][0]


def test_missing_kind_and_layer_errors(tmp_path):
    write_two_parts(tmp_path / "s", make_meta(kinds=("values",)))
    s = FeatureStore.open(tmp_path / "s")
    with pytest.raises(StoreError, match="no 'keys'"):
        s.read("keys", 0, 0)
    with pytest.raises(StoreError, match="layer 7 is not in this store"):
        s.read("values", 7, 0)


@pytest.mark.parametrize("store_dtype", ["float32", "bfloat16", "int8"])
def test_part_files_are_the_bytes_zarr_writes(tmp_path, store_dtype):
    """kvpipe writes chunk files itself (store.chunks); every file equals what Zarr's own
    ``z[...] = data`` writes for the same array and codec, and Zarr reads the data back."""
    from kvpipe.store.checksum import file_crc32c
    from kvpipe.store.encoding import DISK_DTYPE, compressor_for, encode

    meta = make_meta(store_dtype=store_dtype)
    w, a0, _ = write_two_parts(tmp_path / "s", meta)
    part = layout.part_dir(tmp_path / "s", 0)
    group = zarr.open_group(zarr.storage.LocalStore(tmp_path / "ref"), mode="w", zarr_format=3)
    for name, arr in a0.items():
        if name == "masks":
            continue
        data = encode(arr, store_dtype)
        chunks = (1, 1, *data.shape[2:]) if data.ndim == 4 else data.shape
        z = group.create_array(name, shape=data.shape, chunks=chunks, dtype=DISK_DTYPE[store_dtype],
                               compressors=compressor_for(meta.compressor, store_dtype), fill_value=0)
        z[...] = data
        ours = sorted(p.relative_to(part) for p in (part / name / "c").rglob("*") if p.is_file())
        theirs = sorted(p.relative_to(tmp_path / "ref") for p in (tmp_path / "ref" / name / "c").rglob("*")
                        if p.is_file())
        assert ours == theirs and len(ours) == (L * H if data.ndim == 4 else 1)
        for rel in ours:
            assert (part / rel).read_bytes() == (tmp_path / "ref" / rel).read_bytes(), rel
        np.testing.assert_array_equal(zarr.open_array(zarr.storage.LocalStore(part / name))[...], data)
    # the recorded checksums (taken from the bytes in memory) are the files' checksums
    on_disk = {p.relative_to(part).as_posix(): file_crc32c(p) for p in part.rglob("*") if p.is_file()}
    assert FeatureStore.open(tmp_path / "s").checksums[0] == on_disk


def test_batches_as_pieces_write_the_same_files(tmp_path):
    """A part handed over as one piece per batch (TokenSegments, how extraction hands it) is
    written byte for byte like the same part as whole arrays."""
    from kvpipe.store.chunks import TokenSegments
    from kvpipe.store.encoding import float32_to_bf16_bits

    meta = make_meta(store_dtype="bfloat16", n_images=2, part_size=2)
    whole = {k: (float32_to_bf16_bits(v) if k != "masks" else v) for k, v in part_arrays([6, 6], 0).items()}
    pieces = {"keys": TokenSegments([whole["keys"][:, :, :5], whole["keys"][:, :, 5:]], axis=2),
              "values": TokenSegments([whole["values"][:, :, :12]], axis=2),
              "post_proj": TokenSegments([whole["post_proj"][:7], whole["post_proj"][7:]], axis=0),
              "masks": whole["masks"]}
    for name, arrays in (("whole", whole), ("pieces", pieces)):
        StoreWriter.create_or_resume(tmp_path / name, meta).write_part(0, rows_for(0, 0, [6, 6]), arrays)
    a, b = (layout.part_dir(tmp_path / n, 0) for n in ("whole", "pieces"))
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_every_chunk_file_has_its_writeback_started(tmp_path, monkeypatch):
    """The disk gets each chunk file as soon as it is written (sync_file_range), not a whole
    part at its syncfs; where the call exists it is a real one on the open file."""
    import os

    from kvpipe.store import chunks, fs
    from kvpipe.store.encoding import compressor

    started = []

    def record(fd: int) -> None:
        started.append(os.fstat(fd).st_size)
        fs.start_writeback(fd)  # the real call on the real descriptor: must not raise

    monkeypatch.setattr(chunks, "start_writeback", record)
    data = np.arange(3 * 2 * 10 * 4, dtype=np.uint16).reshape(3, 2, 10, 4)
    sums = chunks.write_chunks(tmp_path / "keys", data, (1, 1, 10, 4), compressor("bfloat16"))
    assert len(started) == len(sums) == 6 and all(size > 0 for size in started)


def test_encoder_threads_yield_to_the_rest_of_the_process():
    import os
    import sys
    import threading

    from kvpipe.store import chunks

    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread priorities are a Linux feature")
    ours = os.getpriority(os.PRIO_PROCESS, 0)
    theirs = chunks.pool().submit(lambda: os.getpriority(os.PRIO_PROCESS, threading.get_native_id())).result()
    assert theirs == min(19, ours + chunks.NICE) or theirs > ours


@pytest.mark.parametrize("has_syncfs", [True, False])
def test_sync_tree_flushes_a_part(tmp_path, monkeypatch, has_syncfs):
    """Parts are made durable by one syncfs(2), or where there is none by an fsync of every
    file and directory; either way the call succeeds on a real tree and fails loudly on a
    missing one."""
    import os

    from kvpipe.store import fs

    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "f").write_bytes(b"x")
    synced: list[str] = []
    if not has_syncfs:
        monkeypatch.setattr(fs, "_syncfs", lambda: None)
        real_fsync = os.fsync
        monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")),
                                                     real_fsync(fd)))
    fs.sync_tree(tmp_path)
    if not has_syncfs:
        assert {Path(p).name for p in synced} >= {"f", "b", "a", tmp_path.name}
    with pytest.raises(FileNotFoundError):
        fs.sync_tree(tmp_path / "missing")
