"""The model-in-the-loop workflow: answer benchmark questions, knock attention out, compare.

``answer`` (greedy answers), ``knockout`` (text queries blocked from chosen image keys),
``head_sets`` (which heads to block: input-agnostic and its controls), ``evaluate`` (one
resumable benchmark run, scored), ``intervene`` (baseline and knock-out side by side).
"""
