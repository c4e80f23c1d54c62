"""``kvpipe bench extract`` on the CPU with tiny models: every run happens, on the same images,
and the figures it reports are consistent with the store it wrote."""

from __future__ import annotations

import json

import pytest

from kvpipe.benchmarks.extract_bench import BenchConfig, bench_extract

RUNS = ("floor-hf", "floor-kvpipe", "kvpipe", "kvpipe-lz4bit", "kvpipe-int8", "naive")


@pytest.mark.parametrize("model, kinds", [("tiny-qwen25vl", ("keys", "values")),
                                           ("tiny-dinov2", ("hidden",))])
def test_bench_extract_runs_everything_on_the_same_images(tmp_path, model, kinds):
    cfg = BenchConfig(model=model, device="cpu", dtype="float32", size=56, images=8, batch_size=2,
                      part_size=4, naive_images=2, runs=RUNS, out=str(tmp_path), disk_probe_bytes=64 << 20)
    lines: list[str] = []
    result = bench_extract(cfg, log=lines.append)
    assert set(result.images_per_s) >= set(RUNS) | {"kvpipe-steady", "kvpipe-int8-steady"}
    assert all(v > 0 for v in result.images_per_s.values())
    assert tuple(result.config["kinds"].split(",")) == kinds  # the model's own kinds by default
    from kvpipe.store import FeatureStore

    store = FeatureStore.open(tmp_path / "kvpipe")
    meta = store.meta
    assert meta.kinds == kinds and len(store.images()) == 8
    # raw bytes per image: every stored (kind, layer, head) token vector in float32
    want = len(kinds) * len(meta.layers) * len(meta.heads) * result.image_tokens * meta.head_dim * 4
    assert result.bytes_per_image_raw == want
    # int8 stores a quarter of float32 plus a 4-byte scale per token, before compression
    assert result.stored_per_image["kvpipe-int8"] < result.stored_per_image["kvpipe"]
    assert len(list((tmp_path / "naive").glob("*.pt"))) == 2
    ratios = result.ratios()
    assert ratios["kvpipe / naive"] == pytest.approx(result.images_per_s["kvpipe"] / result.images_per_s["naive"])
    assert result.disk_write_mb_s > 0 and any("stored per image" in line for line in lines)
    json.dumps(result.to_dict())  # the --json output


def test_bench_extract_int4_and_the_base_view(tmp_path):
    cfg = BenchConfig(model="tiny-llava-ov", device="cpu", dtype="float32", size=130, images=4, batch_size=2,
                      part_size=2, runs=("kvpipe", "kvpipe-int4"), views="base", store_dtype="int4",
                      out=str(tmp_path), disk_probe_bytes=1 << 20)
    result = bench_extract(cfg, log=lambda line: None)
    from kvpipe.store import FeatureStore

    store = FeatureStore.open(tmp_path / "kvpipe")
    assert store.meta.store_dtype == "int4" and store.meta.stored_views == "base"
    assert result.image_tokens == 16 == store.images()[0].n_tokens  # the 4 x 4 base view of a 130 px image
    # raw bytes: keys and values x layers x heads x tokens x (8 code bytes + 8 scale/min bytes)
    assert result.bytes_per_image_raw == 2 * 2 * 2 * 16 * (8 + 8)
    assert 0 < result.stored_per_image["kvpipe-int4"]


def test_bench_extract_rounds_alternate_and_report_medians(tmp_path):
    cfg = BenchConfig(model="tiny-qwen25vl", device="cpu", dtype="float32", size=56, images=4, batch_size=2,
                      part_size=2, runs=("kvpipe-int8", "kvpipe-int4"), rounds=3, out=str(tmp_path),
                      disk_probe_bytes=1 << 20)
    lines: list[str] = []
    result = bench_extract(cfg, log=lines.append)
    order = [line.split()[0] for line in lines if line.strip().startswith("kvpipe-int") and "img/s  (" in line
             and "-steady" not in line]
    assert order == ["kvpipe-int8", "kvpipe-int4", "kvpipe-int4", "kvpipe-int8", "kvpipe-int8", "kvpipe-int4"]
    for run in ("kvpipe-int8", "kvpipe-int4", "kvpipe-int8-steady", "kvpipe-int4-steady"):
        assert len(result.rounds[run]) == 3
        assert result.images_per_s[run] == sorted(result.rounds[run])[1]
