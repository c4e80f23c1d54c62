"""Typed metadata (byte-identical JSON of existing stores) and the bounds checked on open."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import zarr

from kvpipe.errors import StoreError
from kvpipe.store import FeatureStore, layout
from kvpipe.store.reader import read_meta
from kvpipe.store.schema import (DatasetInfo, Encoding, FeatureSetMeta, Kind, ModelSource, PrefixChoice,
                                 ids_fingerprint)
from kvpipe.store.status import store_status
from kvpipe.store.verify import verify_store

from test_store import make_meta, write_two_parts

DATA = Path(__file__).parent / "data"
# zarr.json of tiny-qwen25vl over 4 synthetic images, written by kvpipe before the metadata was
# typed; its fingerprint as that code computed it
OLD_ZARR_JSON = DATA / "zarr_v1_tiny_qwen25vl.json"
OLD_FINGERPRINT = "60dd3e5cfda92b12"


def write_group(path: Path, meta_dict: dict) -> bytes:
    zarr.open_group(zarr.storage.LocalStore(path), mode="w", zarr_format=3, attributes={"kvpipe": meta_dict})
    return (path / "zarr.json").read_bytes()


def test_old_metadata_round_trips_byte_for_byte_and_opens(tmp_path):
    old = OLD_ZARR_JSON.read_bytes()
    meta = FeatureSetMeta.from_dict(json.loads(old)["attributes"]["kvpipe"])
    assert isinstance(meta.model, ModelSource) and meta.model.family == "qwen25vl" and meta.model.seed == 0
    assert isinstance(meta.dataset, DatasetInfo) and meta.dataset.name == "synthetic"
    assert meta.dataset.extra["n_videos"] == 4 and "temporal-corr" in meta.dataset.tasks
    assert isinstance(meta.compressor, Encoding) and meta.compressor.cname == "zstd" and meta.compressor.clevel == 1
    assert isinstance(meta.prefix_choice, PrefixChoice) and not meta.prefix_choice
    assert meta.stored_views == "all" and not meta.views  # made before --views: every view stored
    assert meta.fingerprint() == OLD_FINGERPRINT
    assert write_group(tmp_path / "again", meta.to_dict()) == old
    store = tmp_path / "store"
    store.mkdir()
    (store / "zarr.json").write_bytes(old)
    assert read_meta(store) == meta
    assert FeatureStore.open(store).describe()["family"] == "qwen25vl"


def test_hand_written_old_sections_round_trip(tmp_path):
    """Prefix choices, encoder provenance (an extra key), an empty codec of the oldest stores."""
    d = make_meta().to_dict()
    d["model"] = {"name": "dinov2-base", "checkpoint": "facebook/dinov2-base", "revision": None,
                  "init": "pretrained", "family": "dinov2", "commit": None, "features": "hidden_states[1:]"}
    d["prefix_choice"] = {"source": "caption", "control": "none", "seed": 0}
    d["compressor"] = {}
    raw = json.dumps(d)
    meta = FeatureSetMeta.from_dict(json.loads(raw))
    assert json.dumps(meta.to_dict()) == raw
    assert meta.model.extra == {"features": "hidden_states[1:]"} and meta.prefix_choice.source == "caption"
    assert meta.model.get("name") == "dinov2-base" and meta.prefix_choice == d["prefix_choice"]
    assert write_group(tmp_path / "a", meta.to_dict()) == write_group(tmp_path / "b", d)


def test_kind_enum_equals_its_strings():
    assert Kind.KEYS == "keys" and Kind.POST_PROJ == "post_proj" and json.dumps([Kind.VALUES]) == '["values"]'
    assert make_meta(kinds=(Kind.KEYS, Kind.VALUES)).to_dict()["kinds"] == ["keys", "values"]


def test_ids_fingerprint_of_non_utf8_names():
    name = b"caf\xe9.png".decode("utf-8", "surrogateescape")
    assert ids_fingerprint([name]) == ids_fingerprint([name])
    assert ids_fingerprint([name]) != ids_fingerprint(["caf\u00e9.png"])


def edit_meta(store: Path, **fields) -> None:
    doc = json.loads((store / "zarr.json").read_text())
    doc["attributes"]["kvpipe"].update(fields)
    (store / "zarr.json").write_text(json.dumps(doc))


@pytest.mark.parametrize("field,value,says", [
    ("n_images", 10**9, "n_images"),
    ("n_images", 10**7, "more than 1000000"),  # 5,000,000 parts of 2
    ("part_size", 0, "part_size is 0"),
    ("layers", "abc", "layers must be a list"),
    ("layers", [0, 7], "layers[1] is 7"),
    ("head_dim", -1, "head_dim is -1"),
    ("store_dtype", "complex128", "encoding 'complex128' (store_dtype)"),  # a newer store's: upgrade
    ("kinds", ["keys", "logits"], "kinds[1]"),
    ("n_kv_heads", True, "n_kv_heads must be an integer"),
    ("compressor", {"codec": "blosc", "cname": "zstd", "clevel": 99, "shuffle": "byte"}, "compressor.clevel"),
    ("model", "m", "model must be a JSON object"),
])
def test_metadata_out_of_bounds_is_one_line_naming_field_and_file(tmp_path, field, value, says):
    store = tmp_path / "s"
    write_two_parts(store)[0].close()
    edit_meta(store, **{field: value})
    for open_it in (FeatureStore.open, verify_store, store_status):
        with pytest.raises(StoreError) as err:
            open_it(store)
        msg = str(err.value)
        assert says in msg and str(store) in msg and "\n" not in msg, msg


def edit_record(store: Path, part: int, column: str | None = None, value=None, row: int = 0,
                meta: dict | None = None) -> None:
    path = store / layout.MANIFEST / f"p{part:06d}.parquet"
    table = pq.read_table(path)
    if column is not None:
        import pyarrow as pa

        values = table.column(column).to_pylist()
        values[row] = value
        table = table.set_column(table.schema.get_field_index(column), column,
                                 pa.array(values, type=table.schema.field(column).type))
    if meta is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}),
                                               **{k.encode(): v.encode() for k, v in meta.items()}})
    pq.write_table(table, path)


@pytest.mark.parametrize("column,value,says", [
    ("token_offset", -100, "row 0 token_offset is -100"),
    ("token_offset", 3, "overlaps"),
    ("n_tokens", 10**10, "row 0 n_tokens"),
    ("segments", "not json", "row 0 segments is not JSON"),
    ("segments", json.dumps([{"name": "base", "offset": 0, "rows": 9, "cols": 9, "newline": False}]), "runs past"),
    ("meta", "[", "row 0 meta is not a JSON object"),
    ("status", "maybe", "row 0 status"),
    ("part", 1, "row 0 part is 1, but the file is part 0"),
    ("index", 5, "row 0 index is 5, outside its part's images 0..1"),
])
def test_manifest_row_out_of_bounds(tmp_path, column, value, says):
    store = tmp_path / "s"
    write_two_parts(store)[0].close()
    edit_record(store, 0, column, value)
    with pytest.raises(StoreError) as err:
        FeatureStore.open(store)
    msg = str(err.value)
    assert says in msg and "p000000.parquet" in msg and "\n" not in msg, msg
    report = verify_store(store)  # verify names the part instead of stopping
    assert list(report.problems) == [0] and says in report.problems[0][0]


def test_token_offset_past_the_parts_tokens_is_an_error(tmp_path):
    store = tmp_path / "s"
    write_two_parts(store)[0].close()
    edit_record(store, 1, "token_offset", 6)  # part 1 holds 6 tokens: 6..12 is past them
    s = FeatureStore.open(store)
    with pytest.raises(StoreError, match="holds 6 tokens, the manifest says 12"):
        s.read("values", 1, 1)
    assert "past the 6 tokens" in " ".join(verify_store(store).problems[1])


@pytest.mark.parametrize("key,value,says", [
    ("kvpipe.data", "../../etc", "kvpipe.data is '../../etc'"),
    ("kvpipe.data", "/abs/parts/p000000-ab", "kvpipe.data"),
    ("kvpipe.data", "parts/p000001-ab", "kvpipe.data"),
    ("kvpipe.checksums", json.dumps({"../x": "00000000"}), "a path outside the part"),
    ("kvpipe.checksums", json.dumps({"/etc/passwd": "00000000"}), "a path outside the part"),
    ("kvpipe.checksums", json.dumps({"keys/c/0/0/0/0": "zz"}), "not a CRC32C"),
    ("kvpipe.checksums", "{", "is not JSON"),
])
def test_record_paths_stay_inside_the_store(tmp_path, key, value, says, monkeypatch):
    store = tmp_path / "s"
    write_two_parts(store)[0].close()
    edit_record(store, 0, meta={key: value})
    walked = []
    from kvpipe.store import fs

    real = fs.LocalLocation.files
    monkeypatch.setattr(fs.LocalLocation, "files", lambda self, rel: walked.append(rel) or real(self, rel))
    with pytest.raises(StoreError, match="p000000.parquet"):
        FeatureStore.open(store)
    report = verify_store(store)
    assert says in report.problems[0][0]
    assert all(".." not in w and not w.startswith("/") for w in walked), walked


def test_status_of_a_huge_n_images_does_not_allocate(tmp_path):
    store = tmp_path / "s"
    write_two_parts(store)[0].close()
    edit_meta(store, n_images=10**9, part_size=1)
    with pytest.raises(StoreError, match="n_images"):
        store_status(store)


def test_verify_checks_dataset_json_against_its_sha256(tmp_path):
    from kvpipe.store.schema import structure_fingerprint

    structure = {"classes": ["bg", "cat"]}
    store = tmp_path / "s"
    meta = make_meta(dataset={"name": "d", "tasks": [], "structure_sha256": structure_fingerprint(structure)})
    from kvpipe.store.writer import StoreWriter

    StoreWriter.create_or_resume(store, meta, structure).close()
    assert verify_store(store).ok
    (store / "dataset.json").write_text(json.dumps({"classes": ["bg", "dog"]}))
    report = verify_store(store)
    assert not report.ok and "structure_sha256" in report.store_problems[0]
    (store / "dataset.json").unlink()
    assert verify_store(store).store_problems == ["dataset.json: is missing"]
    shutil.rmtree(store)
