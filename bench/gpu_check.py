"""GPU readiness: every CUDA path in one run of under 8 minutes, one JSON and one table. See
docs/PERFORMANCE.md ("GPU readiness").

    python bench/gpu_check.py                  # on a CUDA machine: writes gpu_check.json in ./gpu-check/
    python bench/gpu_check.py --out results/   # elsewhere
    python bench/gpu_check.py --cpu-dry-run    # every check at tiny sizes on the CPU (how it is tested)

Without CUDA (and without --cpu-dry-run) it says so in one line and exits 0.
"""

import sys
from pathlib import Path

from normbench.perf.gpu_cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(train_script=ROOT / "bench" / "train.py", conf_dir=ROOT / "conf"))
