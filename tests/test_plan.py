"""bench/plan.py's time estimate: from finished runs of the same size only, scaled to each run's
epochs (3-second smoke runs say nothing about full runs); and its --help."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from conftest import CONF, ROOT, TINY, run_train

from normbench.sweep.plan import Finished, estimate, plan

SMOKE = ["model=vgg_a_light", "logger=none", *TINY]


def plan_output(args, cwd, monkeypatch) -> str:
    monkeypatch.chdir(cwd)
    out = io.StringIO()
    assert plan(args, config_dir=CONF, out=out) == 0
    return out.getvalue()


@pytest.mark.slow
def test_the_estimate_comes_from_runs_of_the_same_size(tmp_path, monkeypatch):
    run_train(["-m", "norm=bn", *SMOKE], tmp_path)  # a smoke run finishes in seconds

    same = plan_output(["-m", "norm=bn,none", "seed=1", *SMOKE], tmp_path, monkeypatch)
    assert "2 to run" in same and "(2 runs x " in same and "mean of 1 finished runs of the same size" in same

    full = plan_output(["-m", "norm=bn,none", "seed=1", "model=vgg_a", "logger=none", "trainer.epochs=30"],
                       tmp_path, monkeypatch)
    assert "30 runs" not in full and "2 to run" in full
    assert "estimated time left: unknown (none of its 1 finished runs is of the same size" in full, full

    mixed = plan_output(["-m", "norm=bn,none", "seed=1", *SMOKE, "model=vgg_a_light,alexnet_cifar"], tmp_path,
                        monkeypatch)
    assert "4 to run" in mixed and "estimated time left: at least " in mixed
    assert "(2 runs x " in mixed and "2 more run(s) have no finished run of their size" in mixed, mixed


def test_estimate_scales_per_epoch_and_prefers_completed_runs_of_as_many_epochs():
    smoke = Finished("a", 1, 1, 3.0, "completed")
    assert estimate("a", 30, [smoke]) == (90.0, 1)                    # 3 s per epoch x 30 epochs
    assert estimate("b", 30, [smoke]) is None                         # another size: no guess
    full = Finished("a", 30, 30, 600.0, "completed")
    assert estimate("a", 30, [smoke, full]) == (600.0, 1)             # a completed run of 30 epochs
    pruned = Finished("a", 30, 5, 50.0, "pruned")
    assert estimate("a", 10, [pruned]) == (100.0, 1)                  # 10 s per epoch, pruned or not


def test_plan_answers_help():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan.py"), "--help"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: plan.py")
    assert "same size" in proc.stdout and "-m" in proc.stdout
