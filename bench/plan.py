"""Plan a sweep before running it: how many runs, how many already done, how long the rest takes.

Same arguments as bench/train.py (the -m flag is optional here); nothing is trained or written:

    python bench/plan.py -m +experiment=vgg_losses seed=0,1,2
    python bench/plan.py -m norm=bn,ln,gn batch_size=8,16,32,64
"""

import sys
from pathlib import Path

from normbench.plan import main

CONF = Path(__file__).resolve().parents[1] / "conf"

if __name__ == "__main__":
    sys.exit(main(config_dir=CONF))
