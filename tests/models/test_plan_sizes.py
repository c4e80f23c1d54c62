"""The size data of ``kvpipe plan`` agree with the catalog and the models' config presets."""

from __future__ import annotations

import pytest

from kvpipe.pipeline.models.catalog import MODELS
from kvpipe.pipeline.models.sizes import SIZES


@pytest.mark.parametrize("name", sorted(SIZES))
def test_sizes_match_the_catalog_and_the_preset(name):
    size, entry = SIZES[name], MODELS.get(name)
    assert size.rule.tokens(448, 448) == entry.tokens_448
    assert (size.layers, size.kv_heads) == (entry.layers, entry.kv_heads)
    text = entry.preset().get_text_config()
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    assert (size.head_dim, size.hidden) == (head_dim, text.hidden_size)
    assert size.rule.multi_view == entry.adapter.multi_view
