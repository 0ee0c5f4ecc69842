"""normbench: normalization and optimization studies on CNNs as Hydra sweeps."""

__version__ = "0.1.0"
