"""``kvpipe extract --multi-image`` and the BLINK counting rule of the paired tasks.

The store oracle: each BLINK question is answered by the MLM from one prompt holding all its
images (``kvpipe answer``); the stored K/V of every image equal that prompt's own cache (cut
after its last image token) at the image's positions, and the manifest row says where the
image sat (sequence, index, first token).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from kvpipe.errors import DataError, UsageError
from kvpipe.pipeline.datasets import create_dataset
from kvpipe.pipeline.evaluation.answer import load_images
from kvpipe.pipeline.extraction import ExtractConfig, extract
from kvpipe.pipeline.extraction.config import validate
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.vqa import create_benchmark
from kvpipe.store import FeatureStore

from fixtures.layouts_vqa import BLINK_COLUMNS, BLINK_IMAGES, blink_rows, columns_of, make_blink, write_parquet


def answer_cache(adapter, images):
    inputs = adapter.chat_inputs(["Which image shares the style of the first one?"], [images])
    ids = inputs["input_ids"]
    pos = torch.where(ids[0] == adapter.image_token_id)[0]
    inputs = {k: (v[:, : int(pos.max()) + 1] if isinstance(v, torch.Tensor) and v.shape == ids.shape else v)
              for k, v in inputs.items()}
    with torch.no_grad():
        return adapter.model(**inputs, use_cache=True).past_key_values, pos


@pytest.mark.parametrize("model", ["tiny-qwen25vl", "tiny-llava-ov"])
def test_stored_kv_equal_the_answer_prompts_cache(tmp_path, model):
    root = make_blink(tmp_path / "BLINK")
    out = tmp_path / "store"
    # one question per batch, parts of 4 images: question 2 straddles parts 0 and 1
    extract(ExtractConfig(model=model, dataset="blink", out=str(out), data_root=str(root), dtype="float32",
                          device="cpu", batch_size=1, part_size=4, multi_image=True,
                          dataset_options={"subtask": "Art_Style"}))
    fs = FeatureStore.open(out)
    adapter = load_model(model)
    adapter.accelerate()  # the kernels extraction uses (fast_kernels), so the reference matches bit for bit
    items = create_benchmark("blink", str(root), subtask="Art_Style").items()
    rows = {r.image_id: r for r in fs.images()}
    assert len(rows) == 3 * len(items) == 9
    for item in items:
        cache, pos = answer_cache(adapter, load_images(item))
        mine = [rows[i] for i in item.image_ids]
        assert [(r.sequence, r.sequence_index) for r in mine] == [(item.qid, j) for j in range(3)]
        starts = torch.tensor([r.sequence_offset for r in mine])
        assert torch.equal(starts, pos[torch.tensor([0, mine[0].n_tokens, mine[0].n_tokens + mine[1].n_tokens])])
        for layer in (0, adapter.n_layers - 1):
            for head in range(adapter.n_kv_heads):
                for kind in ("values", "keys"):
                    got = fs.read(kind, layer, head, images=mine).data
                    ref = getattr(cache.layers[layer], kind)[0, head][pos].numpy()
                    np.testing.assert_array_equal(got, ref)


def test_multi_image_refusals_are_one_line(tmp_path):
    root = str(make_blink(tmp_path / "BLINK"))
    base = dict(model="tiny-qwen25vl", out=str(tmp_path / "s"), data_root=root, multi_image=True)
    cases = [
        (ExtractConfig(dataset="synthetic", data_root=None, **{k: v for k, v in base.items() if k != "data_root"}),
         "no multi-image questions"),
        (ExtractConfig(dataset="blink", prefix="a painting", **base), "--prefix"),
    ]
    for cfg, words in cases:
        with pytest.raises(UsageError, match=words) as err:
            validate(cfg)
        assert "\n" not in str(err.value) and "--multi-image" in str(err.value)
    with pytest.raises(UsageError, match="--multi-image") as err:
        extract(ExtractConfig(dataset="blink", **{**base, "model": "tiny-siglip"}))
    assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ counting rule
def paired_copy(root: Path, val: int, test: int, test_answers: str) -> Path:
    """Art_Style with ``val`` and ``test`` questions; the test rows' answers as the copy has them."""
    for split, n in (("val", val), ("test", test)):
        rows = blink_rows("Art_Style", "val", 3, ["the second image", "the third image"], ["(A)"] * n, 0)
        for r in rows:
            r["idx"] = r["idx"].replace("val_", f"{split}_")
            if split == "test":
                r["answer"] = test_answers
        write_parquet(root / "Art_Style" / f"{split}-00000-of-00001.parquet", columns_of(rows, BLINK_COLUMNS),
                      BLINK_IMAGES)
    return root


def test_paired_tasks_count_every_split_whose_answers_are_in_the_files(tmp_path):
    """The paper's 234 Art_Style questions are val 117 + test 117: with a copy whose test rows carry
    answers both splits count, with the public copy (test answers "hidden") val alone."""
    answered = str(paired_copy(tmp_path / "answered", 3, 2, "(B)"))
    hidden = str(paired_copy(tmp_path / "hidden", 3, 2, "hidden"))
    for root, n in ((answered, 5), (hidden, 3)):
        qids = [q["qid"] for q in create_dataset("blink", root, subtask="Art_Style").structure()["questions"]]
        assert len(qids) == n and len(set(qids)) == n
        items = create_benchmark("blink", root, subtask="Art_Style").items()  # the MLM's side: the same questions
        assert [it.qid for it in items] == qids
    splits = [it.meta["data_split"] for it in create_benchmark("blink", answered, subtask="Art_Style").items()]
    assert splits == ["val"] * 3 + ["test"] * 2
    # explicit splits keep their meaning; the perception sub-tasks keep val as default
    assert len(create_benchmark("blink", answered, subtask="Art_Style", data_split="val").items()) == 3
    mixed = paired_copy(tmp_path / "mixed", 2, 2, "(A)")
    rows = blink_rows("Art_Style", "val", 3, ["a", "b"], ["(A)", "(B)"], 0)
    rows[0]["idx"], rows[1]["idx"], rows[1]["answer"] = "test_1", "test_2", "hidden"
    write_parquet(mixed / "Art_Style" / "test-00000-of-00001.parquet", columns_of(rows, BLINK_COLUMNS), BLINK_IMAGES)
    with pytest.raises(DataError, match="not public") as err:
        create_dataset("blink", str(mixed), subtask="Art_Style").structure()
    assert "\n" not in str(err.value)
