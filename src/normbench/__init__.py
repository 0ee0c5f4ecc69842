"""normbench: normalization and optimization studies on CNNs as Hydra sweeps."""

import importlib

__version__ = "0.1.0"
__all__ = ["load_runs", "train"]


def __getattr__(name: str):
    if name in __all__:  # the notebook API (docs/api.md), imported on first use: `import normbench` is light
        return getattr(importlib.import_module("normbench.api"), name)
    raise AttributeError(f"module 'normbench' has no attribute {name!r}")
