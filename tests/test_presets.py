"""Study presets (conf/experiment/): each composes with Hydra's compose API, expands to its table's
grid exactly as the basic sweeper expands it, every job of every grid passes validation, and
docs/sweeps.md lists each preset with its run count."""

from __future__ import annotations

import re

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir

from normbench.sweep.plan import expand_grid, sweep_arguments
from normbench.validate import validate

EXPECTED_RUNS = {
    "vgg_bn_baseline": 2, "vgg_losses": 10, "vgg_activations": 12, "vgg_optimizers": 6, "vgg_dropout": 4,
    "vgg_schedulers": 4, "vgg_lr_robustness": 10, "alexnet_norm_batch": 16, "alexnet_lr": 3, "vgg_best": 1,
    "fmnist_bn_baseline": 2, "fmnist_lr_robustness": 10, "fmnist_norm_batch": 16,
}
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def compose_master(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides, return_hydra_config=True)


def compose_job(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


def grid(master, task: list[str]) -> list[list[str]]:
    params, _ = sweep_arguments(master)
    return expand_grid(params, task)


def test_one_preset_per_table():
    assert PRESETS == sorted(EXPECTED_RUNS)


@pytest.mark.parametrize("name", sorted(EXPECTED_RUNS))
def test_preset_expands_to_its_table(name):
    task = [f"+experiment={name}"]
    master = compose_master(task)
    assert master.experiment_name == name
    jobs = grid(master, task)
    assert len(jobs) == EXPECTED_RUNS[name]
    assert len({tuple(sorted(job)) for job in jobs}) == len(jobs)
    # seeds on the command line multiply the grid
    seeded = grid(master, [*task, "seed=0,1,2"])
    assert len(seeded) == 3 * EXPECTED_RUNS[name]
    # every job of the grid composes and passes validation (e.g. GN's 4 groups divide every layer)
    with initialize_config_dir(config_dir=str(CONF)):
        for job in jobs:
            cfg = compose(config_name="config", overrides=job)
            validate(cfg)
            assert cfg.experiment_name == name


def test_presets_fix_the_studies_settings():
    alex = compose_job(["+experiment=alexnet_norm_batch"])
    assert (alex.model._target_, alex.model.input_size, alex.trainer.epochs) == ("normbench.models.alexnet", 224, 10)
    assert alex.optimizer._target_ == "torch.optim.SGD"
    assert (alex.optimizer.lr, alex.optimizer.momentum) == (0.005, 0.9)
    assert {tuple(sorted(j)) for j in grid(compose_master(["+experiment=alexnet_norm_batch"]),
                                           ["+experiment=alexnet_norm_batch"])} == {
        tuple(sorted([f"norm={n}", f"batch_size={b}", "+experiment=alexnet_norm_batch"]))
        for n in ("none", "bn", "ln", "gn") for b in (8, 16, 32, 64)}
    gn = compose_job(["+experiment=alexnet_norm_batch", "norm=gn"])
    assert gn.norm.groups == 4
    lr = compose_job(["+experiment=alexnet_lr"])
    assert (lr.norm.name, lr.batch_size, lr.trainer.epochs) == ("none", 64, 10)
    robust = compose_job(["+experiment=vgg_lr_robustness"])
    assert (robust.trainer.epochs, robust.probe.name) == (10, "all")
    best = compose_job(["+experiment=vgg_best"])
    assert (best.norm.name, best.model.dropout, best.activation.name, best.loss.name, best.scheduler.name,
            best.optimizer._target_) == ("bn", 0.3, "leaky_relu", "focal", "cosine", "torch.optim.SGD")
    sched = compose_job(["+experiment=vgg_schedulers"])
    assert (sched.norm.name, sched.optimizer.lr) == ("bn", 0.001)
    opt = grid(compose_master(["+experiment=vgg_optimizers"]), ["+experiment=vgg_optimizers"])
    assert sorted(j for job in opt for j in job if j.startswith("optimizer=")) == [
        f"optimizer={o}" for o in sorted(("sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "adagrad"))]


def test_command_line_wins_over_the_preset():
    task = ["+experiment=vgg_losses", "norm=bn", "trainer.epochs=3"]
    master = compose_master(task)  # no sweep value on this command line: composes in run mode
    jobs = grid(master, task)
    assert len(jobs) == 5 and all("norm=bn" in job for job in jobs)
    assert compose_job(jobs[0]).trainer.epochs == 3


def test_docs_list_every_preset_with_its_run_count():
    text = (ROOT / "docs" / "sweeps.md").read_text()
    for name, runs in EXPECTED_RUNS.items():
        assert re.search(rf"\|\s*`{name}`\s*\|\s*{runs}\s*\|", text), f"docs/sweeps.md: no row for {name} ({runs})"


def test_plan_command_names_the_available_presets(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan.py"), "-m", "+experiment=vgg_nope"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Could not find 'experiment/vgg_nope'" in proc.stderr
    assert all(f"\t{name}\n" in proc.stderr for name in EXPECTED_RUNS)
    assert not (tmp_path / "multirun").exists()
