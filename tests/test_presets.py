"""Study presets (conf/experiment/): each composes with Hydra's compose API, expands to its table's
grid exactly as the basic sweeper expands it, every job of every grid passes validation, and
docs/sweeps.md lists each preset with its run count."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import CONF, ROOT
from hydra import compose, initialize_config_dir

from normbench.plan import expand_grid, sweep_arguments
from normbench.validate import validate

EXPECTED_RUNS = {
    "vgg_bn_baseline": 2, "vgg_losses": 10, "vgg_activations": 12, "vgg_optimizers": 6, "vgg_dropout": 4,
    "vgg_schedulers": 4, "vgg_lr_robustness": 10, "alexnet_norm_batch": 16, "alexnet_lr": 3, "vgg_best": 6,
    "fmnist_bn_baseline": 2, "fmnist_lr_robustness": 10, "fmnist_norm_batch": 15, "fmnist_quick": 2,
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


# composing and validating a grid of 10 or more jobs takes over ~3 s: the inner loop keeps the smaller ones
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if EXPECTED_RUNS[n] >= 10 else n
                                  for n in sorted(EXPECTED_RUNS)])
def test_preset_expands_to_its_table(name):
    task = [f"experiment={name}"]
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
    alex = compose_job(["experiment=alexnet_norm_batch"])
    assert (alex.model._target_, alex.model.input_size, alex.trainer.epochs) == (
        "normbench.models.alexnet", 224, 10)
    assert alex.optimizer._target_ == "torch.optim.SGD"
    assert (alex.optimizer.lr, alex.optimizer.momentum) == (0.005, 0.9)
    assert {tuple(sorted(j)) for j in grid(compose_master(["experiment=alexnet_norm_batch"]),
                                           ["experiment=alexnet_norm_batch"])} == {
        tuple(sorted([f"norm={n}", f"batch_size={b}", "experiment=alexnet_norm_batch"]))
        for n in ("none", "bn", "ln", "gn") for b in (8, 16, 32, 64)}
    gn = compose_job(["experiment=alexnet_norm_batch", "norm=gn"])
    assert gn.norm.groups == 4
    lr = compose_job(["experiment=alexnet_lr"])
    assert (lr.norm.name, lr.batch_size, lr.trainer.epochs) == ("none", 64, 10)
    robust = compose_job(["experiment=vgg_lr_robustness"])
    assert (robust.trainer.epochs, robust.probe.name) == (10, "all")
    best = compose_job(["experiment=vgg_best"])
    assert (best.norm.name, best.model.dropout, best.activation.name, best.loss.name, best.scheduler.name,
            best.optimizer._target_) == ("bn", 0.3, "leaky_relu", "focal", "cosine", "torch.optim.SGD")
    sched = compose_job(["experiment=vgg_schedulers"])
    assert (sched.norm.name, sched.optimizer.lr) == ("bn", 0.001)
    opt = grid(compose_master(["experiment=vgg_optimizers"]), ["experiment=vgg_optimizers"])
    assert sorted(j for job in opt for j in job if j.startswith("optimizer=")) == [
        f"optimizer={o}" for o in sorted(("sgd", "sgd_momentum", "adam", "adamw", "rmsprop", "adagrad"))]


def test_command_line_wins_over_the_preset():
    task = ["experiment=vgg_losses", "norm=bn", "trainer.epochs=3"]
    master = compose_master(task)  # no sweep value on this command line: composes in run mode
    jobs = grid(master, task)
    assert len(jobs) == 5 and all("norm=bn" in job for job in jobs)
    assert compose_job(jobs[0]).trainer.epochs == 3


def test_docs_list_every_preset_with_its_run_count():
    text = (ROOT / "docs" / "sweeps.md").read_text()
    for name, runs in EXPECTED_RUNS.items():
        row = rf"\|\s*`{name}`\s*\|\s*{runs}\s*\|"
        assert re.search(row, text), f"docs/sweeps.md: no row for {name} ({runs})"


def test_plan_command_names_the_available_presets(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "plan.py"), "-m", "+experiment=vgg_nope"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert "Could not find 'experiment/vgg_nope'" in proc.stderr
    assert all(f"\t{name}\n" in proc.stderr for name in EXPECTED_RUNS)
    assert not (tmp_path / "multirun").exists()


# ------------------------------------------------------------------------------------------------
# each study row run with the settings the study states for it

def _row_settings(cfg) -> dict:
    """The settings a reference row names, read from a composed job config."""
    choices = cfg.hydra.runtime.choices
    return {"model": choices.model, "norm": choices.norm, "activation": choices.activation,
            "loss": choices.loss,
            "optimizer": choices.optimizer, "scheduler": choices.scheduler, "batch_size": cfg.batch_size,
            "dropout": cfg.model.dropout, "lr": cfg.optimizer.lr}


@pytest.mark.parametrize("name", ["vgg_bn_baseline", "vgg_losses", "vgg_optimizers", "vgg_schedulers",
                                  "vgg_best",
                                  "alexnet_norm_batch"])
def test_every_study_row_is_a_job_with_its_stated_settings(name):
    from normbench.report.reference import TABLES_BY_NAME

    table = TABLES_BY_NAME[name]
    task = [f"experiment={name}"]
    jobs = grid(compose_master(task), task)
    with initialize_config_dir(config_dir=str(CONF)):
        settings = [_row_settings(compose(config_name="config", overrides=job, return_hydra_config=True))
                    for job in jobs]
    for row in table.rows:
        wanted = {**table.context, **row.settings}
        hits = [s for s in settings if all(s[k] == v for k, v in wanted.items())]
        assert len(hits) == 1, (name, row.label, wanted)


def test_study_000_baseline_is_lr_0001_and_sgd_row_lr_001():
    # "固定学习率 (0.001)" -> 12.35 %: the baseline and every table whose base row is the baseline
    for name in ("vgg_bn_baseline", "vgg_losses", "vgg_activations", "vgg_dropout", "vgg_schedulers"):
        cfg = compose_job([f"experiment={name}"])
        assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.scheduler.name) == (
            0.001, 0.9, "constant"), name
    # "SGD (lr=0.01, momentum=0.9)" -> 11.32 %: a row of its own
    sgd = compose_job(["experiment=vgg_optimizers", "optimizer=sgd"])
    assert (sgd.optimizer.lr, sgd.optimizer.momentum, sgd.optimizer.nesterov) == (0.01, 0.9, False)
    best = {row: compose_job(["experiment=vgg_best", f"vgg_best_row={row}"])
            for row in ("plain", "bn_sgd", "best")}
    assert (best["plain"].norm.name, best["plain"].optimizer.lr) == ("none", 0.001)
    assert best["bn_sgd"].optimizer.lr == 0.01 and best["bn_sgd"].activation.name == "relu"
    assert (best["best"].optimizer.lr, best["best"].model.dropout, best["best"].scheduler.name) == (
        0.01, 0.3, "cosine")
    # the options where text and course code disagree are visible in the presets, with their defaults
    assert compose_job(["experiment=vgg_bn_baseline"]).data.augment is True
    assert compose_job(["experiment=vgg_schedulers", "scheduler=onecycle"]).scheduler.max_lr is None


def test_study_002_trains_on_all_50k_images_with_the_last_batch_kept():
    import torch

    from normbench.data import BatchStream, Split

    alex = compose_job(["experiment=alexnet_norm_batch", "norm=ln"])
    assert (alex.data.val_size, alex.trainer.drop_last, alex.norm.affine) == (0, False, "element")
    assert (alex.model.conv_groups, alex.model.norm_at) == (1, "after_pool")
    assert compose_job(["experiment=alexnet_lr"]).data.val_size == 0
    split = Split(torch.zeros(50_000, 1, 1, 1, dtype=torch.uint8), torch.zeros(50_000, dtype=torch.int64))
    per_epoch = {bs: len(BatchStream(split, bs, [0.0], [1.0], augment=False,
                                     drop_last=alex.trainer.drop_last))
                 for bs in (64, 32, 16, 8)}
    assert per_epoch == {64: 782, 32: 1563, 16: 3125, 8: 6250}  # the study's logs


def test_study_002_layers_as_the_study_states():
    import torch
    from torch import nn

    from normbench.models import alexnet
    from normbench.norms import NormSpec

    def build(norm, **kw):
        return alexnet(num_classes=10, in_channels=3, image_size=224, norm=NormSpec(**norm).make,
                       activation=nn.ReLU, width=0.25 if kw.pop("narrow", False) else 1.0, **kw)

    ln = build({"name": "ln", "affine": "element"})
    assert [tuple(m.normalized_shape) for m in ln.modules() if isinstance(m, nn.LayerNorm)] == [
        # the study's nn.LayerNorm shapes
        (96, 27, 27), (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 6, 6)]
    grouped = build({"name": "none"}, conv_groups=2, narrow=True)
    convs = [m for m in grouped.modules() if isinstance(m, nn.Conv2d)]
    assert [c.groups for c in convs] == [1, 2, 1, 2, 2]  # the text's 5x5x48 and 3x3x192 kernels
    lrn = build({"name": "lrn"}, norm_at="before_pool", norm_layers=[1, 2], narrow=True)
    kinds = [type(m).__name__ for m in lrn.features]
    assert kinds[:4] == ["Conv2d", "ReLU", "LocalResponseNorm", "MaxPool2d"]
    assert kinds.count("LocalResponseNorm") == 2
    assert lrn(torch.zeros(1, 3, 224, 224)).shape == (1, 10)


def test_val_size_0_trains_on_every_image_and_validates_on_the_test_set():
    from normbench.data import load_data

    cfg = compose_job(["experiment=alexnet_norm_batch", "data=synthetic", "data.num_train=200",
                       "data.num_test=50"])
    assert cfg.data.val_size == 0
    data = load_data(cfg.data, "cpu")
    assert len(data.train) == 200 and data.val is data.test and len(data.test) == 50


@pytest.mark.slow
def test_a_preset_is_chosen_with_or_without_plus():
    """conf/config.yaml lists the experiment group, so `experiment=NAME` is the spelling; the `+` form that
    appends the group still composes the same job (bench/train.py rewrites it before Hydra reads it)."""
    def job(spelling: str) -> str:
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), spelling, "--cfg", "job"],
                              capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    plain = job("experiment=vgg_losses")
    assert "experiment_name: vgg_losses" in plain and plain == job("+experiment=vgg_losses")
    assert compose_job([]).experiment_name == "default"
