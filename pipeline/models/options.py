"""Model options that are checked before any model code is imported: --dtype names, --init.

Why no torch here: a misspelt option must answer at once, not after importing torch.
"""

from __future__ import annotations

from kvpipe.errors import UsageError

INITS = ("pretrained", "random")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16"}


def dtype_name(name: str) -> str:
    """The canonical compute dtype for ``--dtype`` (``bf16`` -> ``bfloat16``); ``auto`` stays."""
    name = DTYPE_ALIASES.get(name, name)
    if name != "auto" and name not in DTYPE_NAMES:
        raise UsageError(f"--dtype must be auto, {', '.join(DTYPE_NAMES)} (or bf16, fp16, fp32), not {name!r}")
    return name


def check_init(init: str) -> None:
    if init not in INITS:
        raise UsageError(f"--init must be one of {', '.join(INITS)}, not {init!r}")
