"""Every chunk a reader decodes is checked against the CRC32C its commit recorded."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kvpipe.errors import StoreError
from kvpipe.store import FeatureStore
from kvpipe.store.fs import open_location
from kvpipe.store.writer import StoreWriter

from test_store import make_meta, part_arrays, rows_for, write_two_parts


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def store(tmp_path) -> tuple[Path, dict, dict]:
    w, a0, a1 = write_two_parts(tmp_path / "s")
    w.close()
    return tmp_path / "s", a0, a1


def test_flipped_byte_in_a_key_chunk_is_an_error_naming_part_and_file(store):
    root, _, a1 = store
    flip(root / "parts" / "p000000" / "keys" / "c" / "1" / "0" / "0" / "0")
    s = FeatureStore.open(root)
    with pytest.raises(StoreError) as err:
        s.read("keys", 1, 0)
    msg = str(err.value)
    assert "p000000" in msg and "keys/c/1/0/0/0" in msg and "CRC32C" in msg
    assert "kvpipe verify" in msg and "--repair" in msg and "\n" not in msg
    # other heads and parts still read
    np.testing.assert_array_equal(s.read("keys", 1, 1).data[12:], a1["keys"][1, 1])
    np.testing.assert_array_equal(s.read("keys", 0, 0, images=[r for r in s.images() if r.part == 1]).data,
                                  a1["keys"][0, 0])


def test_missing_chunk_is_an_error_not_fill_zeros(store):
    root, _, _ = store
    (root / "parts" / "p000001" / "values" / "c" / "2" / "1" / "0" / "0").unlink()
    with pytest.raises(StoreError, match=r"p000001.*values/c/2/1/0/0 is missing"):
        FeatureStore.open(root).read("values", 2, 1)


def test_post_proj_and_masks_are_checked(store):
    root, _, _ = store
    flip(root / "parts" / "p000000" / "post_proj" / "c" / "0" / "0")
    flip(root / "parts" / "p000000" / "masks" / "c" / "0", 0.9)
    s = FeatureStore.open(root)
    with pytest.raises(StoreError, match="post_proj/c/0/0 fails its CRC32C"):
        s.read("post_proj")
    with pytest.raises(StoreError, match="masks/c/0 fails its CRC32C"):
        s.annotation(s.images()[0])


def test_text_query_chunks_are_checked(tmp_path):
    root = tmp_path / "s"
    w = StoreWriter.create_or_resume(root, make_meta(text_queries=("a cat", "a dog")))
    w.write_part(0, rows_for(0, 0, [6, 6]), part_arrays([6, 6], 0))
    text = {k: np.random.default_rng(1).standard_normal((3, 2, 2, 4)).astype(np.float32) for k in ("keys", "values")}
    w.write_text(["a cat", "a dog"], [[1], [2]], text)
    w.close()
    s = FeatureStore.open(root)
    np.testing.assert_array_equal(s.text("values", 2, 1), text["values"][2, 1])
    flip(root / "text" / "values" / "c" / "2" / "1" / "0" / "0")
    with pytest.raises(StoreError, match=r"text queries of .*text/values/c/2/1/0/0 fails its CRC32C"):
        s.text("values", 2, 1)
    (root / "text" / "keys" / "c" / "0" / "0" / "0" / "0").unlink()
    with pytest.raises(StoreError, match="text/keys/c/0/0/0/0 is missing"):
        s.text("keys", 0, 0)


def test_object_store_reads_are_checked(s3_server):
    url = "s3://kvpipe-test/stores/checked"
    w, a0, _ = write_two_parts(url)
    w.close()
    s = FeatureStore.open(url)
    np.testing.assert_array_equal(s.read("values", 0, 1).data[:12], a0["values"][0, 1])
    loc = open_location(url)
    rel = f"{s.data_dir(0)}/values/c/0/1/0/0"
    data = bytearray(loc.read_bytes(rel))
    data[len(data) // 2] ^= 0x01
    loc.write_atomic(rel, bytes(data))
    with pytest.raises(StoreError, match=r"p000000.*values/c/0/1/0/0 fails its CRC32C"):
        FeatureStore.open(url).read("values", 0, 1)
    loc.remove(rel)
    with pytest.raises(StoreError, match="is missing"):
        FeatureStore.open(url).read("values", 0, 1)
