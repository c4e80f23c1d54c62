"""Offline tokenizers for tiny models.

Why: tests and the embedded demo must build a complete processor (tokenizer + image
processor + chat template) without reaching a model hub. A word-level vocabulary over the
`tokenizers` library, holding the family's real special tokens, is enough: kvpipe only needs
the tokenizer to place the image tokens and to record the token ids before them.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

_WORDS = (
    "you are a helpful assistant system user image picture photo of the an this is what in "
    "describe object objects segment find where background person dog cat car bear video frame "
    "answer question yes no left right top bottom color count how many red green blue"
).split()


def build_word_tokenizer(
    special_tokens: list[str], unk: str, pad: str, extra_words: tuple[str, ...] = (),
    named: dict[str, str] | None = None,
) -> PreTrainedTokenizerFast:
    """A deterministic word-level tokenizer: specials first, then words, punctuation, letters.

    ``named``: special tokens a processor reads by attribute (``tokenizer.image_token``, ...),
    saved with the tokenizer like the real checkpoints' ``extra_special_tokens``."""
    vocab: dict[str, int] = {}
    for tok in [unk, pad, *special_tokens, *_WORDS, *extra_words, *string.punctuation,
                *string.ascii_letters, *string.digits, "\n"]:
        vocab.setdefault(tok, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=unk))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()]
    )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token=unk, pad_token=pad, extra_special_tokens=named)
    fast.add_special_tokens({"additional_special_tokens": list(special_tokens)})
    return fast


def with_bos(tok: PreTrainedTokenizerFast, bos: str) -> PreTrainedTokenizerFast:
    """Make ``tok`` prepend ``bos`` to every text, as the Llama / Gemma tokenizers do."""
    tok._tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.convert_tokens_to_ids(bos))])
    tok.bos_token = bos
    return tok
