"""Recoding a lossless store: the lossy store extraction writes, byte for byte, without the model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch

from kvpipe.errors import UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.store import FeatureStore
from kvpipe.store.recode import recode
from kvpipe.store.verify import verify_store


def _files(root):
    """Every chunk file and the manifests' rows and checksums (what a commit records)."""
    chunks = {p.relative_to(root).as_posix(): p.read_bytes() for p in (root / "parts").rglob("*")
              if p.is_file() and "/c/" in p.as_posix()}
    manifests = {p.name: (pq.read_table(p).to_pylist(), pq.read_table(p).schema.metadata[b"kvpipe.checksums"])
                 for p in (root / "manifest").glob("*.parquet")}
    return chunks, manifests


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("store_dtype,step,device", [("pca", None, "cpu"), ("pca", 0.3, "cpu"), ("int4", None, "cpu"),
                                                     pytest.param("pca", None, "cuda", marks=CUDA)])
def test_recoding_gives_the_store_extraction_writes(tmp_path, store_dtype, step, device):
    """On a GPU too: the device sends bf16 for pca, and the host codes it as recoding does."""
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=5, batch_size=2, part_size=4, dtype="bfloat16",
              device=device)
    extract(ExtractConfig(out=str(tmp_path / "bf16"), **kw))
    extract(ExtractConfig(out=str(tmp_path / "direct"), store_dtype=store_dtype, pca_step=step, **kw))
    recode(tmp_path / "bf16", tmp_path / "recoded", store_dtype, step)
    assert verify_store(tmp_path / "recoded").ok
    direct, recoded = FeatureStore.open(tmp_path / "direct"), FeatureStore.open(tmp_path / "recoded")
    assert recoded.meta.compressor == direct.meta.compressor
    assert (recoded.meta.store_dtype, recoded.meta.text_dtype) == (store_dtype, "bfloat16")
    assert _files(tmp_path / "recoded") == _files(tmp_path / "direct")
    assert recoded.text("keys", 1, 0).tolist() == direct.text("keys", 1, 0).tolist()
    assert [r.image_id for r in recoded.images()] == [r.image_id for r in direct.images()]


def test_only_a_complete_lossless_store_in_its_compute_dtype_is_recoded(tmp_path):
    kw = dict(model="tiny-qwen25vl", dataset="synthetic", limit=2, batch_size=2)
    extract(ExtractConfig(out=str(tmp_path / "i8"), store_dtype="int8", **kw))
    with pytest.raises(UsageError, match="stored as int8, not in its compute dtype float32"):
        recode(tmp_path / "i8", tmp_path / "out", "pca")
    extract(ExtractConfig(out=str(tmp_path / "f32"), **kw))
    with pytest.raises(UsageError, match="--store-dtype must be one of"):
        recode(tmp_path / "f32", tmp_path / "out", "int2")
    doc = json.loads((tmp_path / "f32" / "zarr.json").read_text())
    doc["attributes"]["kvpipe"]["n_images"] = 40  # parts missing
    (tmp_path / "f32" / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(UsageError, match="not complete"):
        recode(tmp_path / "f32", tmp_path / "out", "pca")
