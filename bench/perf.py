"""normbench performance benchmarks: one table (rich) + JSON. See docs/PERFORMANCE.md.

    python bench/perf.py                 # full run on whatever device is present (~5-10 min on a laptop CPU)
    python bench/perf.py --quick         # tiny widths and few steps (CI)
    python bench/perf.py --out results/  # JSON to results/perf.json (default: ./perf.json)
    python bench/perf.py --sections loop,data --rounds 7
"""

import sys
from pathlib import Path

from normbench.perf.cli import main

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    sys.exit(main(train_script=ROOT / "bench" / "train.py", conf_dir=ROOT / "conf"))
