"""hydra/launcher=submitit_local|slurm: the submitit launcher plugin, with one death costing only its job."""
