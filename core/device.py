"""``--device auto|cpu|cuda[:N]`` (and ``numpy``, the probes' reference code) made concrete.

Why one function: extraction, the benchmarks and the probes all take ``--device`` and must
refuse a GPU that is not there with the same one line, before any work starts. torch is
imported inside the function only, so the probes and the command line's fast paths do not
load it by importing this module.
"""

from __future__ import annotations

import re

from kvpipe.errors import UsageError

DEVICES = "auto, cpu, cuda, cuda:N"
REFERENCE = "numpy"  # the probes' float64 reference code: no torch at all


def resolve_device(device: str | None = "auto", *, reference: bool = False) -> str:
    """``auto`` -> ``cuda:0`` when torch sees a GPU, else ``cpu``; ``cuda`` -> ``cuda:0``;
    ``cpu`` / ``cuda:N`` checked. ``reference``: ``numpy`` is a device too, and ``auto`` /
    ``cpu`` fall back to it without torch. A GPU asked for where torch sees none, or a device
    index it does not have: one-line UsageError."""
    device = (device or "auto").strip().lower()
    known = DEVICES + (f", {REFERENCE}" if reference else "")
    if reference and device == REFERENCE:
        return device
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise UsageError(f"--device {device!r} is not a device; use one of {known}")
    try:
        import torch
    except ImportError:
        if device.startswith("cuda") or not reference:
            raise UsageError(f"--device {device}: torch is not installed, so no GPU can be used "
                             f"(use --device cpu)" if reference else
                             f"--device {device}: torch is not installed; pip install torch") from None
        return REFERENCE
    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if device == "auto":
        return "cuda:0" if n_gpus else "cpu"
    if device == "cpu":
        return device
    index = int(device.split(":")[1]) if ":" in device else 0
    if n_gpus == 0:
        raise UsageError(f"--device {device}: torch sees no CUDA device on this machine (use --device cpu or auto)")
    if index >= n_gpus:
        raise UsageError(f"--device {device}: torch sees {n_gpus} GPU(s), cuda:0..cuda:{n_gpus - 1}")
    return f"cuda:{index}"
