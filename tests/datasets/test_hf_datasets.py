"""Hub-format data through the ``datasets`` library: ``--dataset hf:PATH_OR_ID`` for extraction
(save_to_disk folders and parquet copies built here), hub ids refused offline with one line, and
the benchmark readers reading copies that ``datasets`` itself wrote."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from fixtures.layouts_vqa import cell, color_of, hf_dataset, make_blink, make_pope_saved, write_parquet

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import DATASETS, create_dataset
from kvpipe.pipeline.vqa import create_benchmark

COLORS = (3, 5, 8, 13)


def close(a, b, tol=3):
    return all(abs(x - y) <= tol for x, y in zip(a, b))


def rows(names=("cat", "dog", "owl", "yak")) -> dict[str, list]:
    return {"name": list(names), "picture": [cell(c) for c in COLORS[:len(names)]]}


@pytest.fixture
def saved(tmp_path):
    """A DatasetDict written by datasets itself: train (4 images) and test (2)."""
    import datasets

    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": hf_dataset(rows(), ("picture",), "train"),
                          "test": hf_dataset(rows(("emu", "gnu")), ("picture",), "test")}).save_to_disk(str(folder))
    return folder


def test_hf_prefix_routes_to_the_registered_module(saved):
    assert "hf" in DATASETS and DATASETS.get("hf").__module__ == "kvpipe.pipeline.datasets.hf"
    ds = create_dataset(f"hf:{saved}", split="train", image_column="picture")
    assert type(ds) is DATASETS.get("hf") and ds.path == str(saved) and ds.tasks == ("input-agnostic",)
    with pytest.raises(UsageError, match="drop --option path"):
        create_dataset(f"hf:{saved}", path=str(saved))


def test_save_to_disk_copy_row_ids_id_column_limit_and_pixels(saved):
    records = create_dataset(f"hf:{saved}", split="train", image_column="picture").records()
    assert [r.image_id for r in records] == ["0", "1", "2", "3"]  # the row index when no id column
    assert [close(r.image().getpixel((2, 2)), color_of(c)) for r, c in zip(records, COLORS)] == [True] * 4
    named = create_dataset(f"hf:{saved}", split="test", image_column="picture", id_column="name", limit=1).records()
    assert [r.image_id for r in named] == ["emu"]
    again = create_dataset(f"hf:{saved}", split="train", image_column="picture", id_column="name").records()
    assert [r.image_id for r in again] == ["cat", "dog", "owl", "yak"]  # stable across openings
    desc = create_dataset(f"hf:{saved}", split="train", image_column="picture").describe()
    assert desc["name"] == "hf" and desc["path"] == str(saved.resolve()) and desc["image_column"] == "picture"


def test_parquet_file_and_folder(tmp_path):
    folder = tmp_path / "pq"
    write_parquet(folder / "train-00000-of-00002.parquet", rows(("a", "b")), ("picture",))
    write_parquet(folder / "train-00001-of-00002.parquet", rows(("c",)), ("picture",))
    records = create_dataset(f"hf:{folder}", image_column="picture", id_column="name").records()
    assert [r.image_id for r in records] == ["a", "b", "c"]  # one split: no --split needed; shards in order
    assert close(records[2].image().getpixel((1, 1)), color_of(COLORS[0]))
    one = create_dataset(f"hf:{folder / 'train-00001-of-00002.parquet'}", image_column="picture").records()
    assert [r.image_id for r in one] == ["0"]


def test_one_line_errors(tmp_path, saved):
    def one_line(err):
        assert len(str(err.value).splitlines()) == 1
        return str(err.value)

    with pytest.raises(UsageError) as err:  # several splits: say which
        create_dataset(f"hf:{saved}", image_column="picture").records()
    assert "test, train" in one_line(err) and "--split" in str(err.value)
    with pytest.raises(DataError) as err:
        create_dataset(f"hf:{saved}", split="train").records()  # default image_column "image"
    assert "no column 'image'" in one_line(err) and "picture" in str(err.value)
    with pytest.raises(DataError) as err:
        create_dataset(f"hf:{saved}", split="train", image_column="picture", id_column="nope").records()
    assert "id_column" in one_line(err)
    dup = tmp_path / "dup.parquet"
    write_parquet(dup, rows(("x", "x")), ("picture",))
    with pytest.raises(DataError) as err:
        create_dataset(f"hf:{dup}", image_column="picture", id_column="name").records()
    assert "not unique" in one_line(err)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "train-00000-of-00001.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(DataError) as err:
        create_dataset(f"hf:{broken}", image_column="picture").records()
    assert str(broken) in one_line(err)
    bad_png = tmp_path / "badpng.parquet"
    write_parquet(bad_png, {"picture": [{"bytes": b"not a png", "path": None}]}, ("picture",))
    rec = create_dataset(f"hf:{bad_png}", image_column="picture").records()[0]
    with pytest.raises(DataError) as err:
        rec.image()
    assert "cannot decode" in one_line(err) and "row 0" in str(err.value)


def test_hub_ids_offline_fail_with_one_line_naming_the_id(monkeypatch):
    import datasets

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(DataError) as err:
        create_dataset("hf:someone/pictures").records()
    msg = str(err.value)
    assert "'someone/pictures'" in msg and "local copy" in msg and len(msg.splitlines()) == 1
    for name in ("pope", "mme", "cvbench", "blink"):
        with pytest.raises(DataError) as err:
            create_benchmark(name, "lmms-lab/NOPE", split="Art_Style" if name == "blink" else None).items()
        assert "'lmms-lab/NOPE'" in str(err.value) and "local copy" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):  # a path-looking root stays a missing path
        create_benchmark("pope", "./no/such/POPE").items()


def test_benchmarks_read_copies_that_datasets_wrote(tmp_path):
    """The readers go through datasets: a POPE DatasetDict and a BLINK sub-task written by
    ``save_to_disk`` read as the questions, images decoded lazily by the Image feature."""
    pope = create_benchmark("pope", str(make_pope_saved(tmp_path / "pope")), split="random").items()
    assert [it.qid for it in pope] == ["random/1", "random/2"]
    assert close(pope[0].images[0]().getpixel((1, 1)), color_of(104))
    blink = create_benchmark("blink", str(make_blink(tmp_path / "BLINK")), subtask="Visual_Similarity").items()
    assert [it.subset for it in blink] == ["Visual_Similarity"] * 2 and len(blink[0].images) == 3


def test_extract_hf_dataset_end_to_end(tmp_path, saved, monkeypatch, capsys):
    from kvpipe.cli.app import main
    from kvpipe.store import FeatureStore

    out = tmp_path / "store"
    monkeypatch.setattr(sys, "argv", ["kvpipe", "extract", "--model", "tiny-qwen25vl", "--dataset", f"hf:{saved}",
                                      "--split", "train", "--option", "image_column=picture",
                                      "--option", "id_column=name", "--out", str(out)])
    main()
    fs = FeatureStore.open(out)
    assert [r.image_id for r in fs.images()] == ["cat", "dog", "owl", "yak"]
    assert fs.meta.dataset["name"] == "hf" and fs.meta.dataset["split"] == "train"
    assert fs.meta.dataset["tasks"] == ["input-agnostic"]
    feats = fs.read("values", layer=0, head=0)
    assert len(feats) == 4 and np.isfinite(feats.data).all()
    monkeypatch.setattr(sys, "argv", ["kvpipe", "extract", "--model", "tiny-qwen25vl", "--dataset", f"hf:{saved}",
                                      "--split", "train", "--option", "image_column=nope", "--out",
                                      str(tmp_path / "s2")])
    with pytest.raises(SystemExit) as code:
        main()
    err = capsys.readouterr().err.strip()
    assert code.value.code == 2 and "no column 'nope'" in err and len(err.splitlines()) == 1
