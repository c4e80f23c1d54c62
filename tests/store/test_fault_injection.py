"""Damage each kind of file of a real store in turn: reading raises or verify names it, and
``kvpipe extract --repair`` restores the undamaged store bit for bit where repair applies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from kvpipe.errors import StoreError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore, layout
from kvpipe.store.verify import verify_store

from fixtures.cli import invoke
from fixtures.store_equality import assert_identical_stores

KW = dict(model="tiny-qwen25vl", dataset="synthetic", limit=8, batch_size=2, part_size=2)


@pytest.fixture(scope="module")
def clean(tiny_store) -> Path:
    out = tiny_store(**KW)  # shared: tests damage copies of it
    assert verify_store(out).ok and FeatureStore.open(out).text_queries()
    return out


def chunk(store: Path, part: int, kind: str = "values", layer: int = 1, head: int = 0) -> Path:
    return store / layout.PARTS / f"p{part:06d}" / kind / "c" / str(layer) / str(head) / "0" / "0"


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def damage_chunk_byte(s: Path) -> None:
    flip(chunk(s, 1))


def damage_chunk_missing(s: Path) -> None:
    chunk(s, 1).unlink()


def damage_manifest(s: Path) -> None:
    path = s / layout.MANIFEST / "p000001.parquet"
    path.write_bytes(path.read_bytes()[:-40] + b"\0" * 40)


def damage_manifest_field(s: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = s / layout.MANIFEST / "p000001.parquet"
    table = pq.read_table(path)
    offsets = table.column("token_offset").to_pylist()
    offsets[0] = -100
    i = table.schema.get_field_index("token_offset")
    pq.write_table(table.set_column(i, "token_offset", pa.array(offsets, pa.int64())), path)


def damage_text_chunk(s: Path) -> None:
    flip(s / layout.TEXT / "keys" / "c" / "1" / "0" / "0" / "0")


def damage_text_missing(s: Path) -> None:
    (s / layout.TEXT / "values" / "c" / "0" / "1" / "0" / "0").unlink()


def damage_dataset_json(s: Path) -> None:
    doc = json.loads((s / layout.STRUCTURE).read_text())
    doc["classes"][1] = "not-a-class"
    (s / layout.STRUCTURE).write_text(json.dumps(doc))


def damage_dataset_json_missing(s: Path) -> None:
    (s / layout.STRUCTURE).unlink()


def reads_part_1(s: Path) -> None:
    store = FeatureStore.open(s)
    store.read("values", 1, 0)


def reads_text(s: Path) -> None:
    store = FeatureStore.open(s)
    for kind in ("keys", "values"):
        for layer in store.meta.layers:
            for head in store.meta.heads:
                store.text(kind, layer, head)


# (damage, what a reader does, text it raises (None: a reader does not notice), what verify names)
CASES = {
    "chunk-byte": (damage_chunk_byte, reads_part_1, "fails its CRC32C", ("p000001", "values/c/1/0/0/0 fails")),
    "chunk-missing": (damage_chunk_missing, reads_part_1, "values/c/1/0/0/0 is missing",
                      ("p000001", "values/c/1/0/0/0 is missing")),
    "manifest-bytes": (damage_manifest, FeatureStore.open, "p000001.parquet is unreadable",
                       ("p000001", "unreadable")),
    "manifest-field": (damage_manifest_field, FeatureStore.open, "row 0 token_offset is -100",
                       ("p000001", "token_offset is -100")),
    "text-chunk": (damage_text_chunk, reads_text, "text/keys/c/1/0/0/0 fails its CRC32C",
                   ("text queries", "text/keys/c/1/0/0/0 fails its checksum")),
    "text-missing": (damage_text_missing, reads_text, "text/values/c/0/1/0/0 is missing",
                     ("text queries", "text/values/c/0/1/0/0 is missing")),
    "dataset-json": (damage_dataset_json, None, None, ("dataset.json", "structure_sha256")),
    "dataset-json-missing": (damage_dataset_json_missing, None, None, ("dataset.json", "is missing")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_damage_is_found_and_repaired_bit_for_bit(clean, tmp_path, case):
    damage, read, raises, names = CASES[case]
    store = tmp_path / "s"
    shutil.copytree(clean, store)
    damage(store)
    if read is not None:
        with pytest.raises(StoreError, match=raises) as err:
            read(store)
        assert "\n" not in str(err.value)
    proc = invoke("verify", str(store), check=False)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert all(n in out for n in names), out
    res = extract(ExtractConfig(out=str(store), repair=True, **KW))
    assert verify_store(store).ok
    assert_identical_stores(store, clean)
    if names[0].startswith("p0"):
        assert res.parts_repaired == [1] and res.parts_done == 1
    else:
        assert res.parts_repaired == [] and res.parts_done == 0  # no part redone
    assert (store / layout.STRUCTURE).read_bytes() == (clean / layout.STRUCTURE).read_bytes()


def test_metadata_out_of_bounds_is_named_by_verify_and_extract(clean, tmp_path):
    store = tmp_path / "s"
    shutil.copytree(clean, store)
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["kvpipe"]["head_dim"] = -1
    (store / "zarr.json").write_text(json.dumps(doc, indent=2))
    proc = invoke("verify", str(store), check=False)
    assert proc.returncode == 2 and "metadata field head_dim is -1" in " ".join(proc.stderr.split() + proc.stdout.split())
    with pytest.raises(StoreError, match="metadata field head_dim is -1"):
        extract(ExtractConfig(out=str(store), repair=True, **KW))
