"""What to capture from a model: layers, KV heads, kinds, key convention (no torch).

Why its own module: the extraction's options are checked and turned into a selection before
any model code is imported, so a usage error answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Selection:
    """What to capture: model layer indices, KV head indices, kinds, key convention, and which
    views of an image's tokens ("all", or "base": the base view only, ``--views``)."""

    layers: tuple[int, ...]
    heads: tuple[int, ...]
    kinds: tuple[str, ...]
    keys_rope: str = "post-rope"
    views: str = "all"
