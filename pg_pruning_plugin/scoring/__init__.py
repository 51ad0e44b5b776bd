"""Importance without the search: initial metrics (metrics.py) and the baseline pruners (baselines.py)."""
