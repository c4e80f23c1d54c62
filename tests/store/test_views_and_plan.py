"""--views base (an any-resolution model's base view only) and kvpipe plan (sizes before a run)."""

from __future__ import annotations

import json
from collections import namedtuple

import numpy as np
import pytest
from PIL import Image

from fixtures.cli import invoke as _invoke
from kvpipe.errors import UsageError
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.models.sizes import (CODEC_RATIO, SIZES, TokenRule, bytes_per_token, select_best_resolution,
                                         unpadded_grid)
from kvpipe.probes.base import views_for
from kvpipe.probes.runner import run_probe
from kvpipe.store import FeatureStore
from kvpipe.store.verify import verify_store

def invoke(args: list[str]):
    """The CLI in this process: exit code and everything it printed."""
    res = _invoke(*args, check=False)
    return namedtuple("Res", "exit_code output")(res.returncode, " ".join((res.stdout + res.stderr).split()))


KW = dict(model="tiny-llava-ov", dataset="synthetic", limit=4, batch_size=2, part_size=2)


@pytest.fixture(scope="module")
def ov_stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("views")
    extract(ExtractConfig(out=str(root / "all"), **KW))
    extract(ExtractConfig(out=str(root / "base"), views="base", views_reason="--views", **KW))
    return root


def test_base_view_store_holds_the_base_tokens_of_the_full_store(ov_stores):
    full, base = FeatureStore.open(ov_stores / "all"), FeatureStore.open(ov_stores / "base")
    assert verify_store(ov_stores / "base").ok
    assert base.meta.stored_views == "base" and full.meta.stored_views == "all"
    assert base.meta.views.reason == "--views" and "base view only" in base.describe()["views"]
    assert base.meta.fingerprint() != full.meta.fingerprint()
    for rf, rb in zip(full.images(), base.images()):
        seg = json.loads(rb.segments)
        assert [s["name"] for s in seg] == ["base"] and seg[0]["offset"] == 0
        assert rb.n_tokens == 16 < rf.n_tokens  # 4 x 4 base tokens; the crops are gone
    for kind, layer, head in (("keys", 1, 0), ("values", 0, 1), ("post_proj", None, None)):
        a, b = full.read(kind, layer, head), base.read(kind, layer, head)
        for i in range(len(a)):
            np.testing.assert_array_equal(a.grid(i, "base"), b.grid(i, "base"))
            np.testing.assert_array_equal(b.image(i), b.grid(i, "base").reshape(16, -1))


def test_probes_of_the_base_view_score_the_same_and_crops_are_refused(ov_stores):
    rows = [{(r["kind"], r["layer"], r["head"], r["metric"]): r["value"]
             for r in run_probe(ov_stores / name, "fg-seg", {"shots": 1}, use_cache=False).table.to_pylist()}
            for name in ("all", "base")]
    assert rows[0] == rows[1]
    with pytest.raises(UsageError, match=r"tokens=crops reads the crops.*base view only.*--views all"):
        run_probe(ov_stores / "base", "temporal-corr", {"tokens": "crops"}, use_cache=False)


def test_views_follow_the_tasks():
    assert views_for(["fg-seg", "semantic-corr"])[0] == "base"
    need, why = views_for(["fg-seg", "art-style"])
    assert need == "all" and "art-style (tokens=all)" in why
    assert views_for(["input-agnostic"], {"input-agnostic": {"estimator": "pooled"}})[0] == "all"
    assert views_for(["temporal-corr"])[0] == "base"
    assert views_for(["temporal-corr"], {"temporal-corr": {"tokens": "crops"}})[0] == "all"


def test_extract_cli_views_default_error_and_metadata(tmp_path):
    res = invoke(["extract", "--model", "tiny-llava-ov", "--dataset", "synthetic", "--out", str(tmp_path / "s"),
                  "--limit", "2", "--batch-size", "2", "--tasks", "fg-seg,art-style", "--views", "base"])
    assert res.exit_code == 2 and "--views base: art-style (tokens=all) read the crops" in res.output
    res = invoke(["extract", "--model", "tiny-llava-ov", "--dataset", "synthetic", "--out", str(tmp_path / "s"),
                  "--limit", "2", "--batch-size", "2", "--tasks", "fg-seg"])
    assert res.exit_code == 0, res.output
    meta = FeatureStore.open(tmp_path / "s").meta
    assert meta.stored_views == "base" and "fg-seg" in meta.views.reason
    # a model with one view stores "all" whatever is asked
    extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "q"), limit=2,
                          batch_size=2, views="base"))
    assert FeatureStore.open(tmp_path / "q").meta.stored_views == "all"


def test_anyres_rules_by_hand():
    assert select_best_resolution(375, 500, [[384, 384], [384, 768], [768, 384]]) == (384, 768)
    assert unpadded_grid(375, 500, 27, 54) == (27, 36)  # 375 * 54 / 500 = 40.5 rows fit; cols cut to 36
    # LLaVA-OV at 384 x 384: 729 base + 27 x (27 + 1) crops and newlines (docs/BENCHMARKS.md: 1485)
    assert SIZES["llava-ov"].rule.tokens(384, 384) == 1485 and SIZES["llava-ov"].rule.tokens(384, 384, "base") == 729
    assert SIZES["qwen25vl"].rule.tokens(448, 448) == 256 and SIZES["qwen25vl"].rule.tokens(500, 375) == 18 * 13
    # anyres_max_9: a 2304 x 2304 image's 162 x 162 grid shrinks by 162 / 81 = 2 to 81 x 81
    assert SIZES["llava-ov"].rule.tokens(2304, 2304) == 729 + 81 * 82
    assert TokenRule("fixed", {"tile": 336, "patch": 14}).tokens(1000, 10) == 576


@pytest.mark.parametrize("model", ["tiny-qwen25vl", "tiny-llava-ov", "tiny-llava-next-llama3"])
def test_plan_tokens_equal_what_extraction_stores(tmp_path, model):
    sizes = [(130, 90), (56, 56), (200, 60), (90, 130)]
    root = tmp_path / "imgs" / "set"
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.png")
    extract(ExtractConfig(model=model, dataset="folder", data_root=str(tmp_path / "imgs"), out=str(tmp_path / "s"),
                          batch_size=2))
    rows = FeatureStore.open(tmp_path / "s").images()
    rule = SIZES[model].rule
    assert [r.n_tokens for r in rows] == [rule.tokens(r.image_w, r.image_h) for r in rows]
    assert sorted((r.image_w, r.image_h) for r in rows) == sorted(sizes)
    # kvpipe plan over the same folder reads the images' sizes: its mean tokens are the store's
    res = invoke(["plan", "--model", model, "--dataset", "folder", "--data-root", str(tmp_path / "imgs"),
                  "--views", "all"])
    assert res.exit_code == 0, res.output
    assert f" {sum(r.n_tokens for r in rows) / len(rows):.0f} " in res.output and " 4 " in res.output


def test_bytes_per_token_by_hand():
    s = SIZES["qwen25vl"]
    # K/V: 2 kinds x 28 layers x 4 heads x 128 x 2 bytes; post_proj 3584 x 2 bytes; zstd ratio 0.72
    assert bytes_per_token(s, "bfloat16") == pytest.approx((2 * 28 * 4 * 128 * 2 + 3584 * 2) * 0.72)
    assert bytes_per_token(s, "int4") == (2 * 28 * 4 * (64 + 8) + 1792 + 8) * 1.0
    # pca: one int8 code per value, compressed to CODEC_RATIO["pca"] (its per-part basis included)
    assert bytes_per_token(s, "pca") == pytest.approx((2 * 28 * 4 * 128 + 3584) * CODEC_RATIO["pca"])


def test_plan_command_prints_every_encoding(tmp_path):
    res = invoke(["plan", "--model", "qwen25vl", "--dataset", "coco"])
    assert res.exit_code == 0, res.output
    # COCO's typical 640 x 480: smart_resize to 476 x 644, 17 x 23 = 391 tokens; one view (no base row)
    assert "coco" in res.output and "1000" in res.output and " 391 " in res.output and "base" not in res.output
    mb = 391 * bytes_per_token(SIZES["qwen25vl"], "bfloat16") / 1e6
    assert f" {mb:.1f} " in res.output and f" {mb * 1000 / 1e3:.1f} " in res.output  # MB per image, total GB
    res = invoke(["plan", "--model", "llava-ov", "--dataset", "paper"])
    assert res.exit_code == 0 and " base* " in res.output and " total " in res.output and " default * " in res.output
    res = invoke(["plan", "--model", "llava-ov", "--dataset", "coco", "--tasks", "art-style", "--views", "base"])
    assert res.exit_code == 2 and "art-style (tokens=all) read the crops" in res.output
    res = invoke(["plan", "--model", "nonesuch", "--dataset", "coco"])
    assert res.exit_code == 2 and "kvpipe plan knows" in res.output


def test_plan_counts_the_text_queries_lossless_in_every_encoding():
    from kvpipe.cli.plan import estimate_bytes, make_plan
    from kvpipe.pipeline.datasets import create_dataset

    s = SIZES["qwen25vl"]
    plan = make_plan("qwen25vl", "refcoco")
    assert plan.queries == 10834
    for enc in ("bfloat16", "int8", "int4", "pca"):  # a query is one token's K/V and post_proj, in bf16
        images = plan.images * plan.bytes_per_image[("all", enc)]
        assert plan.total("all", enc) == pytest.approx(images + 10834 * bytes_per_token(s, "bfloat16"))
    assert make_plan("qwen25vl", "spair").queries == 0
    # from the data: the adapter's own queries; a CPU run (float32) keeps them in float32
    queries = len(create_dataset("synthetic", limit=4).text_queries())
    plan = make_plan("qwen25vl", "synthetic", limit=4)
    assert queries > 0 and plan.queries == queries
    cfg = ExtractConfig(model="qwen25vl", dataset="synthetic", out="unused", limit=4, store_dtype="int4",
                        dtype="float32")
    tokens = plan.tokens["all"] * plan.images
    assert estimate_bytes(cfg, "all") == pytest.approx(tokens * bytes_per_token(s, "int4")
                                                       + queries * bytes_per_token(s, "float32"))


def test_extract_refuses_a_disk_too_small(tmp_path, monkeypatch):
    import shutil

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    args = ["extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--out", str(tmp_path / "new" / "s"),
            "--limit", "2", "--batch-size", "2"]
    res = invoke(args)
    assert res.exit_code == 2 and "GB (kvpipe plan), the disk has 0.0 GB free" in res.output
    assert "--force" in res.output and not (tmp_path / "new").exists()
    assert invoke(args + ["--force"]).exit_code == 0
    # resuming the finished store needs nothing more: the bytes already written count
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**6, 10**6, 0))
    res = invoke(args)
    assert res.exit_code == 0 and "0 new parts, 1 already committed" in res.output, res.output


def test_store_size_skips_what_another_run_removes_during_the_walk(tmp_path, monkeypatch):
    """extract's disk check and `kvpipe info` sum a store's files while another run may be
    renaming or removing its staging folders: a folder listed but gone before it is read is not
    counted (the other run's lease then refuses this extraction in one line), where rglob raised
    FileNotFoundError."""
    import os
    import shutil

    from kvpipe.store.fs import LocalLocation

    sizes = {"x": 100, "y": 7}
    for top, size in sizes.items():
        (tmp_path / top / "sub").mkdir(parents=True)
        (tmp_path / top / "sub" / "chunk").write_bytes(b"x" * size)
    assert LocalLocation(tmp_path).size() == 107
    real_stat, seen = os.stat, []

    def stat_while_the_other_run_removes_a_folder(path, *args, **kwargs):
        if not seen and str(path).endswith("chunk"):  # the first file read: the other top folder goes
            seen.append(os.path.relpath(path, tmp_path).split(os.sep)[0])
            shutil.rmtree(tmp_path / ("y" if seen[0] == "x" else "x"))
        return real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat_while_the_other_run_removes_a_folder)
    assert LocalLocation(tmp_path).size() == sizes[seen[0]]
