"""Probes: read a feature store (never a model), sweep (layer, head, kind), tabulate, plot."""

from kvpipe.probes import cosegmentation, fg_seg, input_agnostic, refexp_seg, semantic_corr, semantic_seg, temporal_corr  # noqa: F401  (register)
from kvpipe.probes import art_style, spair_vqa, visual_similarity  # noqa: F401  (register the paired tasks)
from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.runner import ProbeRun, run_probe

__all__ = ["PROBES", "Probe", "ProbeRun", "Target", "run_probe"]
