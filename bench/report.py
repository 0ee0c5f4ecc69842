"""Comparison report over sweep directories: python bench/report.py multirun/<sweep> [--out DIR] [--wandb]."""

import sys

from normbench.report.cli import main

if __name__ == "__main__":
    sys.exit(main())
