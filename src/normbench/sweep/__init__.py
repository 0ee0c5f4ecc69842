"""Sweeps: run identity, the sweep index, job dir names, pruning, the end-of-sweep line, planning, Optuna trials."""
