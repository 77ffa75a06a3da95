"""Experiments over many runs: Optuna sweeps and the comparison of their results."""
