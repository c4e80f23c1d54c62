"""visual-similarity: BLINK Visual_Similarity answered from image values (paired task, Table 5).

The paper: "We follow the same method as for the art style task": mean-pool each image's
tokens, choose the option most cosine-similar to the reference (see ``art_style``). Only the
questions differ: the store's dataset.json questions of sub-task Visual_Similarity.
"""

from __future__ import annotations

from kvpipe.probes.art_style import ReferenceChoice
from kvpipe.probes.base import PROBES


@PROBES.register
class VisualSimilarity(ReferenceChoice):
    description = ("BLINK Visual_Similarity from image values: mean-pooled tokens, option most cosine-similar "
                   "to the reference")
    subtask = "Visual_Similarity"
    extract_hint = "extract with --dataset blink --option subtask=Visual_Similarity (or subtask=paired) --multi-image"
