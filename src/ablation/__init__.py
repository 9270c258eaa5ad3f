"""Summaries of Hydra sweeps (``difflab-ablate``): which arm is better, by how much, and how sure we can be.

``sweep`` reads a multirun directory, ``stats`` holds the small-sample statistics (t intervals, paired and Welch
differences), ``summary`` turns both into summary.md, CSV tables and per-metric plots. Importing this package loads
neither torch nor Lightning.
"""
