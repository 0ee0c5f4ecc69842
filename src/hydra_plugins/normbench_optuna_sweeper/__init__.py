"""normbench's extension of hydra-optuna-sweeper: per-epoch pruning in the jobs, failure handling, a
study-wide trial budget shared by many workers, masked storage credentials. See docs/optuna.md."""
