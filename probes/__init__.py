"""Probes: read a feature store (never a model), sweep (layer, head, kind), tabulate, plot.

Each probe is one module, looked up by name in ``PROBES`` and imported when first used."""

from kvpipe.probes.base import PROBES, Probe, Target
from kvpipe.probes.runner import ProbeRun, run_probe

__all__ = ["PROBES", "Probe", "ProbeRun", "Target", "run_probe"]
