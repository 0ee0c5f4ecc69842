"""Train one configuration, or sweep many with -m. See README.md.

    python bench/train.py model=vgg_a norm=bn loss=focal
    python bench/train.py -m norm=bn,ln,gn batch_size=8,16,32,64
"""

import sys

import hydra
from omegaconf import DictConfig

from normbench.identity import register_resolvers
from normbench.job import cli
from normbench.job import main as run_main
from normbench.preflight import check_command_line

register_resolvers()


# Targets that Hydra itself instantiates from this config outside normbench's own instantiate calls:
# the hydra.callbacks of conf/config.yaml (Hydra 1.4 warns about, and 1.5 refuses, a config-selected
# _target_ that no execution whitelist names).
TRUSTED_TARGETS = ["normbench.sweep.callbacks.*"]


@hydra.main(config_path="../conf", config_name="config", execution_whitelist=TRUSTED_TARGETS)
def main(cfg: DictConfig) -> float:
    return run_main(cfg)


if __name__ == "__main__":
    check_command_line(sys.argv)  # before Hydra: an unparsable override is one line, passwords masked
    cli(main)
