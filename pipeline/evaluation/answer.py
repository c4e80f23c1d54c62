"""Generate the model's answers to benchmark questions (greedy), optionally under a knock-out.

Why here and not in the extraction loop: answering needs the whole prompt (images, question,
the assistant's turn) and autoregressive decoding, whereas extraction stops after the last
image token. Both use the same adapters; the chat inputs come from ``ModelAdapter.chat_inputs``
(the model's own template, images in a user turn, left padding for this call only).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Callable, Iterable, Sequence

import torch
from PIL import Image

from kvpipe.errors import DataError, KvpipeError
from kvpipe.pipeline.models.capture import inputs_to_device
from kvpipe.pipeline.evaluation.knockout import knockout as knockout_ctx
from kvpipe.pipeline.models.base import ModelAdapter
from kvpipe.pipeline.vqa.base import VQAItem

DEFAULT_MAX_NEW_TOKENS = 128  # lmms-eval's POPE setting; greedy decoding stops at end-of-turn anyway


def load_images(item: VQAItem) -> list[Image.Image]:
    """The question's images, in order, as RGB; an unreadable one is a one-line DataError."""
    images = []
    for load, image_id in zip(item.images, item.image_ids):
        try:
            images.append(load().convert("RGB"))
        except KvpipeError:
            raise
        except Exception as err:
            raise DataError(f"cannot read image {image_id} of question {item.qid}: {err}") from None
    return images


def generate(adapter: ModelAdapter, prompts: Sequence[str], images: Sequence[list[Image.Image]],
             max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
             knockout: Iterable[tuple[int, int]] | None = None) -> list[str]:
    """Greedy answers to one batch: each prompt after its images; the decoded new text of each row."""
    inputs = adapter.chat_inputs(list(prompts), [list(x) for x in images])
    device = adapter.device
    inputs = inputs_to_device(inputs, device)
    tok = adapter.processor.tokenizer
    heads = frozenset(knockout or ())
    ctx = (knockout_ctx(adapter, heads, inputs["input_ids"] == adapter.image_token_id) if heads
           else nullcontext())
    with torch.inference_mode(), ctx:
        out = adapter.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                     temperature=None, top_p=None, top_k=None,
                                     pad_token_id=tok.pad_token_id)
    new = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in tok.batch_decode(new, skip_special_tokens=True)]


def answer_items(adapter: ModelAdapter, items: Sequence[VQAItem], max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                 batch_size: int = 8, knockout: Iterable[tuple[int, int]] | None = None,
                 progress: Callable[[int], None] | None = None,
                 on_batch: Callable[[dict[str, str]], Any] | None = None) -> dict[str, str]:
    """The model's generated text per question id, in batches of ``batch_size`` questions.

    ``knockout``: (layer, kv_head) pairs whose image keys text queries may not attend to
    (see ``kvpipe.pipeline.evaluation.knockout``); None or empty runs the unmodified model.
    ``progress(n)`` after each batch of n questions; ``on_batch(answers)`` gets each batch's
    answers as soon as they exist (the caller's resume log).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    answers: dict[str, str] = {}
    heads = frozenset(knockout or ())
    for start in range(0, len(items), batch_size):
        batch = items[start:start + batch_size]
        texts = generate(adapter, [it.prompt for it in batch], [load_images(it) for it in batch],
                         max_new_tokens, heads)
        got = {it.qid: text for it, text in zip(batch, texts)}
        answers.update(got)
        if on_batch is not None:
            on_batch(got)
        if progress is not None:
            progress(len(batch))
    return answers
