"""Answer generation (every family, one and several images, batched = one at a time), and the
`kvpipe answer` / `kvpipe intervene` commands end to end with a benchmark defined here
(`kvpipe extract` and `kvpipe probe --task input-agnostic` make the store the head sets come from)."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch


from kvpipe.pipeline.evaluation.answer import answer_items, generate
from kvpipe.pipeline.models import load_model
from kvpipe.pipeline.vqa.base import BENCHMARKS, Benchmark, VQAItem

from fixtures.cli import invoke
from fixtures.images import noise_image

TINY = ["tiny-qwen25vl", "tiny-qwen2vl", "tiny-llava-ov", "tiny-llava-next-llama3"]


def item(qid: str, sizes: list[tuple[int, int]], seed: int, subset: str = "a", answer: str = "yes",
         prompt: str = "is there a dog in the image ? answer yes or no .") -> VQAItem:
    loaders = tuple((lambda w=w, h=h, s=seed * 10 + i: noise_image(w, h, s)) for i, (w, h) in enumerate(sizes))
    return VQAItem(qid=qid, benchmark="fake-vqa", subset=subset, question=prompt, prompt=prompt, images=loaders,
                   image_ids=tuple(f"{qid}-{i}" for i in range(len(sizes))), choices=(), answer=answer)


class FakeVQA(Benchmark):
    """Yes/no questions over procedural images; two subsets, one two-image question."""

    name = "fake-vqa"
    description = "procedural yes/no questions for tests"

    def items(self) -> list[VQAItem]:
        prompts = ["is there a red object ?", "is the cat left of the dog ?", "what color is the car ?"]
        out = []
        for i in range(6):
            sizes = [(84, 56), (56, 84)] if i == 3 else [(56 + 14 * (i % 3), 70)]
            out.append(item(f"q{i}", sizes, i, subset="a" if i % 2 else "b", answer="yes" if i % 3 else "no",
                            prompt=prompts[i % 3]))
        return out[: self.limit] if self.limit else out

    def parse(self, it: VQAItem, text: str) -> str:
        words = text.lower().split()
        return "yes" if "yes" in words else "no" if "no" in words else "other"

    def score(self, items: list[VQAItem], predictions: dict[str, str]) -> list[dict[str, Any]]:
        rows = []
        for subset in sorted({it.subset for it in items}):
            sub = [it for it in items if it.subset == subset]
            acc = sum(self.parse(it, predictions[it.qid]) == it.answer for it in sub) / len(sub)
            rows.append({"subset": subset, "metric": "accuracy", "value": acc})
        return rows


if "fake-vqa" not in BENCHMARKS:
    BENCHMARKS.add("fake-vqa", FakeVQA)


@pytest.fixture(scope="module", params=TINY)
def adapter(request):
    return load_model(request.param)


def test_one_and_two_image_questions_batched_equals_unbatched(adapter):
    items = [item("one", [(96, 72)], 1), item("two", [(70, 56), (56, 98)], 2),
             item("three", [(60, 60)], 3, prompt="what color is the car ?")]
    batched = answer_items(adapter, items, max_new_tokens=6, batch_size=3)
    single = {it.qid: answer_items(adapter, [it], max_new_tokens=6, batch_size=1)[it.qid] for it in items}
    assert batched == single and set(batched) == {"one", "two", "three"}
    assert all(isinstance(t, str) for t in batched.values())
    assert adapter.processor.tokenizer.padding_side == "right"  # extraction's padding is untouched


def test_two_images_both_reach_the_model(adapter):
    """The prompt holds one image placeholder run per image, and the second image changes the logits."""
    a = adapter.chat_inputs(["what ?"], [[noise_image(70, 56, 1), noise_image(56, 98, 2)]])
    b = adapter.chat_inputs(["what ?"], [[noise_image(70, 56, 1), noise_image(56, 98, 3)]])
    assert torch.equal(a["input_ids"], b["input_ids"])
    ids = a["input_ids"][0]
    runs = int(((ids == adapter.image_token_id) & (torch.roll(ids, 1) != adapter.image_token_id)).sum())
    if adapter.family in ("qwen25vl", "qwen2vl"):
        assert runs == 2
    with torch.no_grad():
        la, lb = adapter.model(**a).logits[0, -1], adapter.model(**b).logits[0, -1]
    assert not torch.allclose(la, lb, atol=1e-5)


def test_generation_matches_a_hand_written_greedy_loop():
    adapter = load_model("tiny-qwen25vl")
    inputs = adapter.chat_inputs(["is there a dog ?"], [[noise_image(84, 56, 4)]])
    got = generate(adapter, ["is there a dog ?"], [[noise_image(84, 56, 4)]], max_new_tokens=4)
    with torch.no_grad():  # greedy by hand: full forward each step (no cache), argmax of the last logits
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask", "mm_token_type_ids")}
        new = []
        for _ in range(4):
            mm = torch.cat([inputs["mm_token_type_ids"], torch.zeros(1, len(new), dtype=torch.long)], 1)
            logits = adapter.model(input_ids=ids, attention_mask=mask, mm_token_type_ids=mm, **extra).logits
            nxt = int(logits[0, -1].argmax())
            new.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
            if nxt == adapter.model.generation_config.eos_token_id:
                break
    want = adapter.processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    assert got == [want]


def test_knockout_generation_batched_equals_unbatched():
    adapter = load_model("tiny-llava-ov")
    items = [item("one", [(96, 72)], 5), item("two", [(70, 56), (56, 98)], 6)]
    heads = {(0, 0), (1, 1)}
    batched = answer_items(adapter, items, max_new_tokens=6, batch_size=2, knockout=heads)
    single = {it.qid: answer_items(adapter, [it], max_new_tokens=6, knockout=heads)[it.qid] for it in items}
    assert batched == single
    every = {(l, h) for l in range(adapter.n_layers) for h in range(adapter.n_kv_heads)}
    seeing = [answer_items(adapter, [item("x", [(84, 84)], s)], max_new_tokens=6)["x"] for s in (7, 8)]
    blind = [answer_items(adapter, [item("x", [(84, 84)], s)], max_new_tokens=6, knockout=every)["x"]
             for s in (7, 8)]
    assert seeing[0] != seeing[1]  # the stock model answers differently for the two images ...
    assert blind[0] == blind[1]  # ... blind to them, it gives one answer for any image of that size


# ---- the commands ----------------------------------------------------------------------------------

@pytest.fixture
def kvpipe():
    """``kvpipe ARGS`` in this process, where the test benchmark is registered, on a wide pipe."""
    return functools.partial(invoke, env={"COLUMNS": "200"})


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_answer_command_writes_answers_scores_and_resumes(tmp_path, kvpipe):
    out = tmp_path / "ans"
    proc = kvpipe("answer", "--model", "tiny-qwen25vl", "--benchmark", "fake-vqa", "--limit", "5", "--out", str(out),
                  "--batch-size", "3", "--max-new-tokens", "4")
    assert "5 answered now, 0 reused" in proc.stdout and "accuracy" in proc.stdout
    answers = rows(out / "answers.parquet")
    bench = FakeVQA(None, None, 5)
    items = bench.items()
    want = answer_items(load_model("tiny-qwen25vl"), items, max_new_tokens=4, batch_size=3)
    assert [a["qid"] for a in answers] == [it.qid for it in items]
    for a, it in zip(answers, items):
        assert a["text"] == want[it.qid] and a["gold"] == it.answer and a["subset"] == it.subset
        assert a["parsed"] == bench.parse(it, want[it.qid]) and a["correct"] == (a["parsed"] == it.answer)
    scores = rows(out / "scores.parquet")
    for s in scores:
        sub = [a for a in answers if a["subset"] == s["subset"]]
        assert s["model"] == "tiny-qwen25vl" and s["benchmark"] == "fake-vqa" and s["metric"] == "accuracy"
        assert s["value"] == pytest.approx(sum(a["correct"] for a in sub) / len(sub))
    assert (out / "scores.csv").read_text().splitlines()[0] == '"model","benchmark","subset","metric","value"'
    # Resume: a killed run's log lost its last answer (and a half-written line); only that one is redone.
    log = (out / "answers.jsonl").read_text().splitlines()
    (out / "answers.jsonl").write_text("\n".join(log[:-1]) + '\n{"qid": "q4", "te')
    proc = kvpipe("answer", "--model", "tiny-qwen25vl", "--benchmark", "fake-vqa", "--limit", "5", "--out", str(out),
                  "--batch-size", "3", "--max-new-tokens", "4")
    assert "1 answered now, 4 reused" in proc.stdout
    assert rows(out / "answers.parquet") == answers
    proc = kvpipe("answer", "--model", "tiny-qwen25vl", "--benchmark", "fake-vqa", "--out", str(out),
                  "--max-new-tokens", "8", check=False)
    assert proc.returncode == 2 and "another run" in proc.stderr and "max_new_tokens" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = kvpipe("answer", "--model", "tiny-qwen25vl", "--benchmark", "nope", check=False)
    assert proc.returncode == 2 and "unknown benchmark 'nope'" in proc.stderr and "fake-vqa" in proc.stderr


def test_intervene_command_runs_knockout_and_baseline(tmp_path, kvpipe):
    store = tmp_path / "store"
    kvpipe("extract", "--model", "tiny-qwen25vl", "--dataset", "synthetic", "--out", str(store), "--limit", "6")
    kvpipe("probe", "--task", "input-agnostic", "--store", str(store))
    table = rows(store / "probes" / "input-agnostic" / "results.parquet")
    variance = {(r["layer"], r["head"]): r["value"] for r in table if r["metric"] == "l2_variance"}
    threshold = float(np.median(list(variance.values())))
    agnostic = {k for k, v in variance.items() if v < threshold}
    assert len(agnostic) == 2

    out = tmp_path / "ko"
    common = ["--model", "tiny-qwen25vl", "--store", str(store), "--layers", "0-1", "--threshold", f"{threshold!r}",
              "--benchmark", "fake-vqa", "--limit", "4", "--out", str(out), "--max-new-tokens", "4"]
    proc = kvpipe("intervene", "--heads", "input-agnostic", *common)
    name = f"input-agnostic-0-1-t{threshold:g}"
    assert name in proc.stdout and "change" in proc.stdout
    run = json.loads((out / name / "run.json").read_text())
    assert {tuple(h) for h in run["condition"]["heads"]} == agnostic
    adapter = load_model("tiny-qwen25vl")
    items = FakeVQA(None, None, 4).items()
    plain = answer_items(adapter, items, max_new_tokens=4)
    knocked = answer_items(adapter, items, max_new_tokens=4, knockout=agnostic)
    assert [a["text"] for a in rows(out / "answers.parquet")] == [plain[it.qid] for it in items]  # the baseline
    assert [a["text"] for a in rows(out / name / "answers.parquet")] == [knocked[it.qid] for it in items]
    scores = rows(out / "knockout.parquet")
    assert {s["condition"] for s in scores} == {"none", name}
    assert {s["n_heads"] for s in scores if s["condition"] == name} == {2}
    assert all(s["heads"] == "input-agnostic" and s["layers"] == "0-1" for s in scores if s["condition"] == name)

    # A control into the same OUT reuses the baseline's answers and keeps the first condition's scores.
    proc = kvpipe("intervene", "--heads", "input-dependent", "--control-seed", "3", *common)
    control = f"input-dependent-0-1-seed3-t{threshold:g}"
    heads = {tuple(h) for h in json.loads((out / control / "run.json").read_text())["condition"]["heads"]}
    assert heads == set(variance) - agnostic  # two input-dependent heads: all there are
    assert {s["condition"] for s in rows(out / "knockout.parquet")} == {"none", name, control}
    assert len((out / "answers.jsonl").read_text().splitlines()) == 4  # the baseline was not redone

    proc = kvpipe("intervene", "--heads", "everything", *common, check=False)
    assert proc.returncode == 2 and "unknown head set 'everything'" in proc.stderr
    proc = kvpipe("intervene", "--heads", "input-agnostic", "--layers", "5", "--model", "tiny-qwen25vl", "--store",
                  str(store), "--benchmark", "fake-vqa", "--out", str(out), check=False)
    assert proc.returncode == 2 and "--layers 5: the model has 2 layers" in proc.stderr
    proc = kvpipe("intervene", "--heads", "input-agnostic", "--layers", "late", "--model", "tiny-qwen25vl",
                  "--store", str(tmp_path), "--benchmark", "fake-vqa", "--out", str(out), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
