"""Metric functions, each checked against hand-computed cases."""
