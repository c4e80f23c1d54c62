"""Per-image text prefixes (--prefix-from / --prefix-control): texts, controls, stores, report."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from kvpipe.errors import DataError, StoreError, UsageError
from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.datasets.bdd10k import domain_text
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.extraction.prefix import RANDOM_PREFIX, resolve_prefixes
from kvpipe.store import FeatureStore
from kvpipe.store.schema import FeatureSetMeta

from fixtures.cli import invoke
from fixtures.layouts_pascal_msrc_imagenet_s_coco_bdd import make_tiny_bdd
from fixtures.layouts_refcoco_spair import make_tiny_refcoco, make_tiny_spair

# 4 videos x 2 frames of 112x84: classes rectangle, triangle, circle, circle (by largest object)
SYNTH = {"n_frames": 2, "width": 112, "height": 84}
DAY_STREET = "The image is taken at daytime and it is from city street view"
NIGHT_HIGHWAY = "The image is taken at nighttime and it is from highway"


def synth_records():
    return create_dataset("synthetic", **SYNTH).records()


@pytest.fixture(scope="module")
def adapter():
    a = load_model("tiny-qwen25vl")
    a.accelerate()  # the kernels extraction uses (fast_kernels), so references match bit for bit
    return a


def run(adapter, out: Path, **kw) -> Path:
    cfg = dict(model="tiny-qwen25vl", dataset="synthetic", out=str(out), dataset_options=SYNTH, batch_size=4,
               part_size=4, kinds="keys,values")
    extract(ExtractConfig(**{**cfg, **kw}), adapter=adapter)
    return out


@pytest.fixture(scope="module")
def stores(adapter, tmp_path_factory):
    base = tmp_path_factory.mktemp("prefix")
    return {
        "caption1": run(adapter, base / "caption1", prefix_from="caption", batch_size=1),
        "caption4": run(adapter, base / "caption4", prefix_from="caption"),
        "random": run(adapter, base / "random", prefix_control="random"),
        "fixed": run(adapter, base / "fixed", prefix=RANDOM_PREFIX),
    }


def reference(adapter, img, prefix: str) -> dict[str, torch.Tensor]:
    """An unbatched capture of one image with one prefix."""
    sel = Selection(tuple(range(adapter.n_layers)), tuple(range(adapter.n_kv_heads)), ("keys", "values"),
                    "post-rope")
    return run_capture(adapter, adapter.preprocess([img], prefix), sel)[0]


def check_against_unbatched(adapter, path: Path, atol: float) -> None:
    s = FeatureStore.open(path)
    by_id = {r.image_id: r for r in synth_records()}
    captions = resolve_prefixes(list(by_id.values()), "caption")
    assert len(set(captions)) == 4  # one per video: the prefixes really differ
    for i, row in enumerate(s.images()):
        rec = by_id[row.image_id]
        assert json.loads(row.meta)["prefix"] == rec.texts["caption"]  # the manifest names each image's prefix
        ref = reference(adapter, rec.image(), rec.texts["caption"])
        for kind in ("keys", "values"):
            for layer in s.meta.layers:
                for head in s.meta.heads:
                    got = s.read(kind, layer, head).image(i)
                    want = ref[kind][layer, head].numpy()
                    if atol == 0:
                        np.testing.assert_array_equal(got, want, err_msg=f"{row.image_id} {kind} {layer}.{head}")
                    else:
                        np.testing.assert_allclose(got, want, atol=atol, rtol=0)


# --- stores ------------------------------------------------------------------------------------

def test_per_image_prefixes_equal_unbatched_runs_bit_for_bit(adapter, stores):
    check_against_unbatched(adapter, stores["caption1"], atol=0)
    meta = FeatureStore.open(stores["caption1"]).meta
    assert meta.prefix == "" and meta.prefix_choice == {"source": "caption", "control": "none", "seed": 0}
    # prefix_token_ids: the template's tokens before where each image's own prefix goes
    assert list(meta.prefix_token_ids) == adapter.preprocess([synth_records()[0].image()], "").prefix_ids[0]


def test_batched_per_image_prefixes_match_unbatched(adapter, stores):
    # captions differ in length, so sequences are right-padded; padded keys change the attention's
    # summation order only (the oracle's tolerance for batches of differently sized images)
    check_against_unbatched(adapter, stores["caption4"], atol=1e-6)


def test_random_control_is_the_fixed_sentence_for_every_image(stores):
    rnd, fixed = FeatureStore.open(stores["random"]), FeatureStore.open(stores["fixed"])
    assert [json.loads(r.meta)["prefix"] for r in rnd.images()] == [RANDOM_PREFIX] * 8
    assert all("prefix" not in json.loads(r.meta) for r in fixed.images())  # --prefix: recorded once, in meta
    assert rnd.meta.prefix == fixed.meta.prefix == RANDOM_PREFIX
    assert rnd.meta.prefix_token_ids == fixed.meta.prefix_token_ids
    for layer in rnd.meta.layers:
        for head in rnd.meta.heads:
            np.testing.assert_array_equal(rnd.read("values", layer, head).data, fixed.read("values", layer, head).data)
    assert rnd.meta.prefix_choice == {"source": None, "control": "random", "seed": 0}
    assert rnd.meta.fingerprint() != fixed.meta.fingerprint()


def test_other_prefix_choice_is_refused(adapter, stores):
    with pytest.raises(StoreError, match=r"holds another feature set \(differs in prefix_choice\)"):
        run(adapter, stores["caption4"], prefix_from="caption", prefix_control="incorrect")
    with pytest.raises(StoreError, match=r"differs in prefix_choice"):
        run(adapter, stores["fixed"], prefix_control="random")
    with pytest.raises(StoreError, match="holds another feature set"):
        run(adapter, stores["caption4"])  # no prefix at all
    res = extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(stores["caption4"]),
                                dataset_options=SYNTH, batch_size=4, part_size=4, kinds="keys,values",
                                prefix_from="caption"), adapter=adapter)
    assert res.parts_done == 0 and res.parts_skipped == 2  # the same choice resumes


def test_old_metadata_without_prefix_choice_reads_and_keeps_its_fingerprint(stores):
    meta = FeatureStore.open(stores["fixed"]).meta
    old = meta.to_dict()
    del old["prefix_choice"]  # metadata written before per-image prefixes existed
    again = FeatureSetMeta.from_dict(old)
    assert again.prefix_choice == {} and "prefix_choice" not in again.identity()
    assert again.fingerprint() == meta.fingerprint()


# --- controls ----------------------------------------------------------------------------------

def test_class_texts_and_incorrect_class_control():
    recs = synth_records()
    true = resolve_prefixes(recs, "class")
    assert true == [r.texts["class"] for r in recs]
    assert true == ["rectangle"] * 2 + ["triangle"] * 2 + ["circle"] * 4
    wrong = resolve_prefixes(recs, "class", "incorrect", seed=0)
    assert all(w != t and w in {"circle", "rectangle", "triangle"} for w, t in zip(wrong, true))
    assert resolve_prefixes(recs, "class", "incorrect", seed=0) == wrong  # deterministic
    seeds = {tuple(resolve_prefixes(recs, "class", "incorrect", seed=s)) for s in range(8)}
    assert len(seeds) > 1  # the seed moves the draw
    # seeded by the image id: the same image gets the same wrong class in any order, or in a subset
    # holding the same classes
    assert resolve_prefixes(recs[::-1], "class", "incorrect", seed=0) == wrong[::-1]
    assert resolve_prefixes([recs[i] for i in (5, 2, 0)], "class", "incorrect", seed=0) == [wrong[i] for i in (5, 2, 0)]


def test_random_control_alone_and_with_a_source():
    recs = synth_records()
    assert resolve_prefixes(recs, None, "random") == [RANDOM_PREFIX] * len(recs)
    assert resolve_prefixes(recs, "class", "random") == [RANDOM_PREFIX] * len(recs)
    assert RANDOM_PREFIX.startswith("A rustic wooden table") and RANDOM_PREFIX.endswith("ripe figs.")
    assert resolve_prefixes(recs, None, "none") == [""] * len(recs)


def test_spair_class_is_the_category_and_incorrect_is_the_other(tmp_path):
    recs = create_dataset("spair", root=str(make_tiny_spair(tmp_path))).records()
    assert [r.texts["class"] for r in recs] == [r.image_id.split("/")[0] for r in recs]
    wrong = resolve_prefixes(recs, "class", "incorrect", seed=3, dataset="spair")
    assert wrong == ["dog" if r.texts["class"] == "cat" else "cat" for r in recs]


def test_bdd_domain_prefix_and_incorrect_domain(tmp_path):
    root = str(make_tiny_bdd(tmp_path))
    recs = create_dataset("bdd10k", root=root).records()
    assert {r.image_id: r.texts.get("domain") for r in recs} == {
        "7d06fefd-f7be05a6": DAY_STREET, "7d128593-0ccfea4c": NIGHT_HIGHWAY,
        "7d15b18b-1e0d6e3f": "The image is taken at nighttime and it is from city street view",
        "80a9e37d-e4548ac1": None}  # untagged: no domain
    night = create_dataset("bdd10k", root=root, timeofday="night", scene="highway").records()
    assert resolve_prefixes(night, "domain") == [NIGHT_HIGHWAY]
    # one domain in the dataset: the incorrect one is still the other domain of the template
    assert resolve_prefixes(night, "domain", "incorrect") == [DAY_STREET]
    day = create_dataset("bdd10k", root=root, timeofday="daytime", scene="city street").records()
    assert resolve_prefixes(day, "domain", "incorrect") == [NIGHT_HIGHWAY]
    assert domain_text("dawn/dusk", "highway") is None and domain_text("night", "residential") is None


def test_missing_field_is_one_line_naming_dataset_and_field(tmp_path):
    recs = create_dataset("bdd10k", root=str(make_tiny_bdd(tmp_path / "bdd"))).records()
    with pytest.raises(DataError) as err:
        resolve_prefixes(recs, "domain", dataset="bdd10k")
    msg = str(err.value)
    assert "\n" not in msg and "dataset bdd10k has no domain for image 80a9e37d-e4548ac1" in msg
    assert "1 of 4 images" in msg and "--option timeofday" in msg
    with pytest.raises(DataError, match="dataset synthetic has no domain"):
        extract(ExtractConfig(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "s"),
                              dataset_options=SYNTH, prefix_from="domain"))
    assert not (tmp_path / "s").exists()  # refused before any store or model


def test_refcoco_caption_from_coco_captions_file(tmp_path):
    root = make_tiny_refcoco(tmp_path)
    recs = create_dataset("refcoco", root=str(root)).records()
    with pytest.raises(DataError, match="dataset refcoco has no caption .*captions_train2014.json"):
        resolve_prefixes(recs, "caption", dataset="refcoco")
    (root / "annotations").mkdir()
    (root / "annotations" / "captions_train2014.json").write_text(json.dumps({"images": [], "annotations": [
        {"image_id": 9, "id": 12, "caption": "Two people  and a dog.\n"},
        {"image_id": 9, "id": 7, "caption": "A man standing next to a dog. "},
        {"image_id": 25, "id": 3, "caption": "A red car parked."},
        {"image_id": 30, "id": 4, "caption": "A person in the back."}]}))
    recs = create_dataset("refcoco", root=str(root)).records()
    assert resolve_prefixes(recs, "caption") == ["A man standing next to a dog.", "A red car parked.",
                                                 "A person in the back."]  # lowest annotation id per image


def test_option_combinations(tmp_path):
    base = dict(model="tiny-qwen25vl", dataset="synthetic", out=str(tmp_path / "s"))
    with pytest.raises(UsageError, match="--prefix gives every image one fixed text"):
        extract(ExtractConfig(**base, prefix="a photo", prefix_from="class"))
    with pytest.raises(UsageError, match="--prefix-control incorrect needs --prefix-from"):
        extract(ExtractConfig(**base, prefix_control="incorrect"))
    with pytest.raises(UsageError, match="unknown prefix source 'colour' for --prefix-from; known: caption, class, domain"):
        extract(ExtractConfig(**base, prefix_from="colour"))
    with pytest.raises(UsageError, match="unknown prefix control 'wrong' for --prefix-control"):
        extract(ExtractConfig(**base, prefix_from="class", prefix_control="wrong"))
    with pytest.raises(DataError, match="has one class only"):
        resolve_prefixes([r for r in synth_records() if r.texts["class"] == "circle"], "class", "incorrect")


# --- Table 4 in shape --------------------------------------------------------------------------

def test_report_prefix_puts_conditions_side_by_side(stores):
    from kvpipe.probes import run_probe
    from kvpipe.probes.prefix_report import compare_prefixes, prefix_condition

    for name in ("caption4", "random"):
        run_probe(stores[name], "refexp-seg")
    rows = compare_prefixes([stores["caption4"], stores["random"]], "refexp-seg")
    assert [r["condition"] for r in rows] == ["Prefixing (caption)", "Prefixing-random"]
    for r, name in zip(rows, ("caption4", "random")):
        table = run_probe(stores[name], "refexp-seg").table.to_pylist()
        best = max((t for t in table if t["kind"] == "values" and t["metric"] == r["metric"] and t["layer"] >= 0
                    and not np.isnan(t["value"])), key=lambda t: t["value"])
        assert (r["value"], r["layer"], r["head"]) == (best["value"], best["layer"], best["head"])
    meta = FeatureStore.open(stores["random"]).meta
    assert prefix_condition(replace(meta, prefix="", prefix_choice={})) == "No prefixing"
    assert prefix_condition(replace(meta, prefix_choice={"source": "class", "control": "incorrect",
                                                         "seed": 0})) == "Prefixing-incorrect (class)"
    proc = invoke("report-prefix", "--store", str(stores["caption4"]), "--store", str(stores["random"]),
                  "--task", "refexp-seg")
    assert "Prefixing (caption)" in proc.stdout and "Prefixing-random" in proc.stdout
    proc = invoke("report-prefix", "--store", str(stores["fixed"]), "--task", "refexp-seg", check=False)
    assert proc.returncode == 2 and "no refexp-seg results" in proc.stderr
