"""Vision-encoder baselines (SigLIP, CLIP, DINO, DINOv2): the "hidden" kind.

Oracle: stored hidden equal the encoder's own ``output_hidden_states`` at the patch positions,
bit for bit in float32, for a batch of a non-square and a square image; the token grid covers
the whole image (no centre crop); a saved full checkpoint (SigLIP / CLIP text + vision, as
the hub stores them) loads its vision tower; the full-size presets have the published shapes.
End to end: ``kvpipe extract`` of a tiny encoder over the synthetic dataset, then probes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kvpipe.errors import StoreError, UsageError
from kvpipe.pipeline.models.capture import Selection, run_capture
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.models import MODELS, load_model
from kvpipe.store import FeatureStore

from fixtures.cli import invoke
from fixtures.images import noise_image

# tiny preset -> tokens before the patches (SigLIP has no CLS token), patch grid side, width
TINY = {"tiny-siglip": (0, 4, 32), "tiny-clip": (1, 4, 32), "tiny-dino": (1, 4, 32), "tiny-dinov2": (1, 4, 32)}


def hidden_sel(adapter) -> Selection:
    return Selection(tuple(range(adapter.n_layers)), (0,), ("hidden",))


@pytest.fixture(scope="module", params=sorted(TINY))
def adapter(request):
    return load_model(request.param)


def test_stored_hidden_equal_model_hidden_states(adapter):
    prefix, side, width = TINY[adapter.source["name"]]
    imgs = [noise_image(130, 90, 1), noise_image(64, 64, 2)]
    batch = adapter.preprocess(imgs)
    got = run_capture(adapter, batch, hidden_sel(adapter))
    with torch.no_grad():
        ref = adapter.model(**batch.inputs, output_hidden_states=True).hidden_states
    assert len(ref) == adapter.n_layers + 1  # embeddings, then one state per block
    assert ref[0].shape[1] == prefix + side * side  # nothing but the prefix tokens is left out
    for i, lay in enumerate(batch.layouts):
        assert (lay.base.rows, lay.base.cols) == (side, side) and len(lay.segments) == 1
        assert got[i]["hidden"].shape == (adapter.n_layers, 1, side * side, width)
        for layer in range(adapter.n_layers):
            assert torch.equal(got[i]["hidden"][layer, 0], ref[layer + 1][i, prefix:])
    assert not torch.equal(got[0]["hidden"], got[1]["hidden"])


def test_batched_equals_one_at_a_time(adapter):
    imgs = [noise_image(130, 90, 3), noise_image(50, 120, 4)]
    batched = run_capture(adapter, adapter.preprocess(imgs), hidden_sel(adapter))
    for img, got in zip(imgs, batched):
        single = run_capture(adapter, adapter.preprocess([img]), hidden_sel(adapter))[0]
        torch.testing.assert_close(got["hidden"], single["hidden"], atol=1e-6, rtol=0)


def test_token_grid_covers_the_whole_image(adapter):
    """The left quarter of a 160 x 80 image is white: with the whole image resized (no centre
    crop) the left quarter of the pixel columns is white; a centre crop would cut it to ~1/8."""
    arr = np.zeros((80, 160, 3), np.uint8)
    arr[:, :40] = 255
    pixels = adapter.preprocess([Image.fromarray(arr)]).inputs["pixel_values"][0, 0]  # red channel
    w = pixels.shape[-1]
    white, black = pixels.max(), pixels.min()
    column = pixels.mean(dim=0)
    assert bool((column[: w // 4 - 2] > white - 0.05).all())
    assert bool((column[w // 4 + 2:] < black + 0.05).all())


# ------------------------------------------------------------------------------ checkpoints
def _save_full(family: str, tmp_path):
    """A full checkpoint as the hub stores it (text + vision for SigLIP/CLIP) with the family's
    processor as its checkpoints configure it (CLIP and DINOv2 centre-crop)."""
    import transformers as tf

    tiny = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    text = dict(tiny, vocab_size=100, max_position_embeddings=16)
    torch.manual_seed(0)
    if family == "siglip":
        full = tf.SiglipModel(tf.SiglipConfig(text_config=text, vision_config=dict(tiny, image_size=56, patch_size=14)))
        proc = tf.SiglipImageProcessor(size={"height": 56, "width": 56})
        tower = full.vision_model
    elif family == "clip":
        full = tf.CLIPModel(tf.CLIPConfig(text_config=text, projection_dim=32,
                                          vision_config=dict(tiny, image_size=56, patch_size=14)))
        proc = tf.CLIPImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56})
        tower = full.vision_model
    else:
        full = tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                              mlp_ratio=2, image_size=98, patch_size=14))
        proc = tf.BitImageProcessor(size={"shortest_edge": 64}, crop_size={"height": 56, "width": 56},
                                    image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        tower = full
    full.save_pretrained(tmp_path)
    proc.save_pretrained(tmp_path)
    return tower.eval()


@pytest.mark.parametrize("family, prefix", [("siglip", 0), ("clip", 1), ("dinov2", 1)])
def test_saved_full_checkpoint_loads_its_vision_tower(family, prefix, tmp_path):
    tower = _save_full(family, tmp_path)
    adapter = load_model(str(tmp_path))
    assert adapter.family == family and adapter.source["checkpoint"] == str(tmp_path)
    assert adapter.processor.do_center_crop is False  # the crop size became the input size
    batch = adapter.preprocess([noise_image(130, 90, 5)])
    assert batch.inputs["pixel_values"].shape[-2:] == (56, 56) and batch.layouts[0].base.rows == 4
    got = run_capture(adapter, batch, hidden_sel(adapter))[0]["hidden"]
    with torch.no_grad():
        ref = tower(pixel_values=batch.inputs["pixel_values"], output_hidden_states=True).hidden_states
    for layer in range(2):
        assert torch.equal(got[layer, 0], ref[layer + 1][0, prefix:])


FULL = [  # name, blocks, width, patch grid side, parameters (millions)
    ("siglip", 27, 1152, 27, 428.2),  # so400m vision tower incl. its attention-pooling head
    ("clip-vit-l14", 24, 1024, 16, 303.2),
    ("clip-vit-l14-336", 24, 1024, 24, 303.5),
    ("dino-vitb16", 12, 768, 14, 86.4),  # ViT-B/16 + ViTModel's pooler
    ("dino-vitb8", 12, 768, 28, 86.4),  # ViT-B/8: the checkpoint's 224 px (the catalog feeds it 480p)
    ("dino-vitb8-224", 12, 768, 28, 86.4),
    ("dinov2-base", 12, 768, 16, 86.6),
    ("dinov2-large", 24, 1024, 16, 304.4),
]


def test_every_encoder_entry_is_checked():
    encoders = {n for n, e in MODELS.items() if not e.adapter.encodes_text}
    # tiny-dino-vitb8 keeps each image's aspect ratio: tests/models/test_encoder_resolution.py
    assert encoders == {row[0] for row in FULL} | set(TINY) | {"tiny-dino-vitb8"}


@pytest.mark.parametrize("name, layers, width, grid, params_m", FULL)
def test_full_size_presets_have_the_published_shapes(name, layers, width, grid, params_m):
    entry = MODELS.get(name)
    config = entry.preset()
    with torch.device("meta"):  # shapes only, no memory
        model = entry.adapter.model_class()._from_config(config)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(params_m, abs=0.1)
    assert (config.num_hidden_layers, config.hidden_size) == (layers, width)
    processor = entry.adapter.build_processor(config)
    pixels = processor(images=[noise_image(130, 90, 6)], return_tensors="pt")["pixel_values"]
    assert tuple(int(n) // config.patch_size for n in pixels.shape[-2:]) == (grid, grid)  # 384 px / 14 -> 27


# ------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def encoder_store(tmp_path_factory):
    out = tmp_path_factory.mktemp("enc") / "s"
    invoke("extract", "--model", "tiny-dinov2", "--dataset", "synthetic", "--limit", "6", "--batch-size", "2",
           "--part-size", "4", "--out", str(out))
    return out


def test_cli_extract_stores_hidden_equal_to_the_model(encoder_store):
    store = FeatureStore.open(encoder_store)
    meta = store.meta
    assert meta.kinds == ("hidden",) and meta.heads == (0,) and meta.layers == (0, 1)
    assert (meta.n_kv_heads, meta.head_dim, meta.hidden_size) == (1, 32, 32)
    assert meta.text_queries == () and meta.keys_rope == "none" and meta.prefix_token_ids == ()
    assert meta.model["family"] == "dinov2" and "hidden_states[1:]" in meta.model["features"]
    assert not (encoder_store / "text.parquet").exists()
    from kvpipe.pipeline.datasets import create_dataset

    adapter = load_model("tiny-dinov2")
    records = create_dataset("synthetic", limit=6).records()
    for layer in (0, 1):
        feats = store.read("hidden", layer, 0)
        assert len(feats) == 6 and feats.grid(0).shape == (4, 4, 32)
        for start in (0, 2, 4):  # the extraction's batches of two
            batch = adapter.preprocess([r.image() for r in records[start:start + 2]])
            ref = run_capture(adapter, batch, hidden_sel(adapter))
            for i in range(2):
                assert np.array_equal(feats.image(start + i), ref[i]["hidden"][layer, 0].numpy())
    from kvpipe.store.verify import verify_store

    report = verify_store(encoder_store)
    assert report.ok and report.parts_checked == 2


def test_cli_probe_on_an_encoder_store(encoder_store):
    proc = invoke("probe", "--task", "temporal-corr", "--store", str(encoder_store))
    assert "image hidden (max)" in proc.stdout
    import pyarrow.parquet as pq

    rows = pq.read_table(encoder_store / "probes" / "temporal-corr" / "results.parquet").to_pylist()
    scored = {(r["kind"], r["layer"], r["head"]) for r in rows if r["metric"] == "JF_mean"}
    assert scored == {("hidden", 0, 0), ("hidden", 1, 0)}


def test_text_probes_say_why_they_cannot_run_on_an_encoder_store(encoder_store):
    for task in ("semantic-seg", "refexp-seg"):
        with pytest.raises(StoreError, match="only an MLM's store has") as err:
            from kvpipe.probes import run_probe

            run_probe(encoder_store, task)
        assert "\n" not in str(err.value)


def one_line_usage_error(tmp_path, **options) -> str:
    out = tmp_path / "s"
    with pytest.raises(UsageError) as err:
        extract(ExtractConfig(dataset="synthetic", out=str(out), limit=2, batch_size=2, part_size=2, **options))
    assert "\n" not in str(err.value)
    assert not out.exists() or not any(out.iterdir()), "nothing half-written"
    return str(err.value)


@pytest.mark.parametrize("options, fragment", [
    ({"model": "tiny-siglip", "kinds": "keys,values"}, "--kinds keys,values: tiny-siglip is a vision encoder"),
    ({"model": "tiny-clip", "prefix": "a photo of"}, "--prefix needs an MLM"),
    ({"model": "tiny-dino", "keys": "pre-rope"}, "--keys needs an MLM"),
    ({"model": "tiny-dinov2", "heads": "1"}, "--heads"),
    ({"model": "tiny-qwen25vl", "kinds": "values,hidden"}, "--kinds hidden is a vision encoder's kind"),
])
def test_options_a_model_cannot_honour_are_one_line_errors(tmp_path, options, fragment):
    assert fragment in one_line_usage_error(tmp_path, **options)

