"""hydra/launcher=joblib: the joblib launcher plugin, with one death costing only its job."""
