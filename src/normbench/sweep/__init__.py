"""Sweeps: the sweep index, the Hydra callbacks, planning, what a job returns to its sweeper, Optuna
trials."""
