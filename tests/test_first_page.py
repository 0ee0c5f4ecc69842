"""The README's first answer run exactly as written: its commands parsed from the README and run with bash
from a directory laid out like the repository (offline, W&B offline, Debian's Fashion-MNIST), then the
report's answer read back: BN against plain, with the verdict of the comparison."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

from normbench.datasets.idx import DEBIAN_FASHION_MNIST

HEADING = "## The first answer"
COMMAND = ".venv/bin/python "


def first_answer_commands() -> list[str]:
    """The lines of the first bash block under the README's first-answer heading that run normbench."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(HEADING):]
    block = re.search(r"```bash\n(.*?)```", section, flags=re.DOTALL).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.startswith(COMMAND)]


def test_the_first_answer_is_on_the_first_screen():
    """Within the first 50 lines: a user reads it before scrolling."""
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:50])
    assert HEADING in head and "bench/report.py" in head
    commands = first_answer_commands()
    assert [c.split()[1] for c in commands] == ["bench/train.py", "bench/report.py"]
    assert "data=synthetic" not in " ".join(commands)


@pytest.mark.slow
@pytest.mark.skipif(not Path(DEBIAN_FASHION_MNIST, "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN_FASHION_MNIST} "
                           "(apt-get install dataset-fashion-mnist; scripts/install.sh --dev installs it)")
def test_the_first_answer_runs_as_written(tmp_path, wandb_env):
    venv = Path(sys.executable).parent.parent  # the interpreter running the tests: the README's .venv
    for name, target in ((".venv", venv), ("bench", ROOT / "bench"), ("conf", ROOT / "conf")):
        (tmp_path / name).symlink_to(target)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    for command in first_answer_commands():
        proc = subprocess.run(["bash", "-c", command], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=1800, check=False)
        assert proc.returncode == 0, f"{command}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    report = tmp_path / "reports" / "fmnist_quick"
    with open(report / "runs.csv", newline="") as f:
        runs = list(csv.DictReader(f))
    error = {norm: [1 - float(r["metric/test/acc"]) for r in runs if r["choice/norm"] == norm]
             for norm in ("none", "bn")}
    assert len(runs) == 6 and all(r["status"] == "completed" for r in runs)
    assert all(r["choice/data"] == "fashion_mnist" for r in runs)
    assert max(error["bn"]) < min(error["none"]), error  # BN ahead on every seed: the answer
    text = (report / "report.md").read_text()
    bn_row = next(line for line in text.splitlines() if line.startswith("| BN |"))
    assert "vs plain" in bn_row and "differs" in bn_row, bn_row
