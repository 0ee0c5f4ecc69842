"""Whole runs and sweeps on real-format data: BN vs plain on real Fashion-MNIST (Debian's
dataset-fashion-mnist), `data=imagefolder` through bench/train.py, `+debug=quick`, and the report over the
Fashion-MNIST presets' sweeps (the study numbers are CIFAR-10's only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CONF, ROOT, TINY, run_train
from fake_datasets import write_fake_mnist, write_image_folder
from hydra import compose, initialize_config_dir

from normbench.datasets.idx import DEBIAN_FASHION_MNIST

DEBIAN = Path(DEBIAN_FASHION_MNIST)
# The sizes of the BN-vs-plain check, and what they gave on this 2-core CPU (val/best_acc, seeds 0, 1, 2):
# BN 0.674 0.716 0.705, plain 0.300 0.392 0.372 -- BN ahead by 0.32-0.37 on every seed.
BN_VS_PLAIN = ["+experiment=fmnist_bn_baseline", "logger=none", "model.width=0.125", "trainer.epochs=1",
               "trainer.max_steps_per_epoch=200", "batch_size=32", "data.val_size=1000",
               "trainer.eval_batch_size=500", "trainer.max_eval_batches=2", "trainer.threads=1",
               "trainer.checkpoint=false"]
MIN_MARGIN = 0.15  # BN - plain, under half the smallest measured margin
BEST_FLOOR = 0.55  # the best run; chance is 0.10, the measured best runs 0.67-0.72


def summaries(sweep: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN} (apt-get install "
                    "dataset-fashion-mnist; "
                           "scripts/install.sh --dev installs it)")
def test_bn_beats_plain_on_real_fashion_mnist(tmp_path):
    run_train(["-m", *BN_VS_PLAIN, f"data.root={DEBIAN}", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
              cwd=tmp_path)
    acc = {s["choices"]["norm"]: s["metrics"]["val/best_acc"] for s in summaries(tmp_path / "sweep")}
    assert set(acc) == {"none", "bn"} and all(s["choices"]["data"] == "fashion_mnist"
                                              for s in summaries(tmp_path / "sweep"))
    assert acc["bn"] - acc["none"] >= MIN_MARGIN, acc
    assert max(acc.values()) >= BEST_FLOOR, acc


# Plain VGG-A at the study's lr 0.001 leaves its ln 10 plateau after ~840 steps (seed 0); the check runs the
# first 3 of the preset's epochs (1,287 steps), a prefix of the preset's own run: the lr is constant and each
# epoch's order depends on the seed and epoch only, so a run that leaves chance here leaves it within the
# preset's budget too.
PLAIN_EPOCHS = 3
STEPS_PER_EPOCH = 55_000 // 128  # the preset's whole epochs of 55k training images, batches of 128
LEFT_CHANCE = 0.30  # val accuracy; chance is 0.10, seed 0 reaches 0.56 after 3 epochs


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~90 s on an idle core; 10 min on the shared 2-core VM at load 12
@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {DEBIAN} "
                    "(apt-get install dataset-fashion-mnist)")
def test_plain_vgg_leaves_chance_within_the_bn_baseline_budget(tmp_path):
    with initialize_config_dir(config_dir=str(CONF)):
        preset = compose(config_name="config", overrides=["experiment=fmnist_bn_baseline"])
    assert preset.optimizer.lr == 0.001 and preset.trainer.max_steps_per_epoch is None
    assert preset.batch_size == 128 and preset.trainer.epochs >= PLAIN_EPOCHS
    run_train(["+experiment=fmnist_bn_baseline", "norm=none", "seed=0", "logger=none", f"data.root={DEBIAN}",
               f"trainer.epochs={PLAIN_EPOCHS}", "trainer.checkpoint=false"], cwd=tmp_path, timeout=1800)
    run = next((tmp_path / "outputs" / "fmnist_bn_baseline").iterdir())
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert epochs[0]["val/acc"] < LEFT_CHANCE  # the plateau: the first epoch is near chance
    assert max(e["val/acc"] for e in epochs) >= LEFT_CHANCE, epochs
    steps = [json.loads(line) for line in (run / "steps.jsonl").read_text().splitlines()]
    assert steps[-1]["step"] == PLAIN_EPOCHS * STEPS_PER_EPOCH <= preset.trainer.epochs * STEPS_PER_EPOCH
    losses = [s["train/loss"] for s in steps]
    left = next(steps[i]["step"] for i in range(len(losses)) if max(losses[i:i + 25]) < 2.0)
    assert 200 < left < PLAIN_EPOCHS * STEPS_PER_EPOCH  # a plateau first, then training

def test_debug_quick_is_the_tests_and_perfs_tiny_run():
    from normbench.perf.startup import TINY as PERF_TINY

    assert "+debug=quick" in TINY and "+debug=quick" in PERF_TINY
    perf_only = ["trainer.max_steps_per_epoch=1", "trainer.log_every_steps=1", "logger=none"]
    with initialize_config_dir(config_dir=str(CONF)):
        tiny = compose(config_name="config", overrides=TINY)
        # one definition: the perf run is the tests' tiny run plus the keys its measurement needs
        assert compose(config_name="config", overrides=PERF_TINY) == compose(config_name="config",
                                                                             overrides=[*TINY, *perf_only])
        # after a preset it still wins over the preset's sizes
        preset = compose(config_name="config", overrides=["experiment=fmnist_bn_baseline", "+debug=quick"])
    for cfg in (tiny, preset):
        assert (cfg.trainer.epochs, cfg.trainer.max_steps_per_epoch, cfg.batch_size, cfg.model.width) == (
            1, 4, 16, 0.125)
    assert preset.data._target_ == "normbench.datasets.fashion_mnist"


@pytest.mark.slow
def test_image_folder_trains_through_train_py(tmp_path):
    rng = np.random.default_rng(0)
    for split, n in (("train", 30), ("test", 9)):
        labels = np.arange(n) % 3
        images = (rng.integers(0, 40, (n, 20, 24, 3)) + labels[:, None, None, None] * 80).astype(np.uint8)
        write_image_folder(tmp_path / "imgs", split, images, labels, ["a", "b", "c"])
    run_train(["data=imagefolder", f"data.root={tmp_path / 'imgs'}", "data.num_classes=3", "data.val_size=6",
               "+debug=quick", "logger=none", "trainer.max_steps_per_epoch=2", "batch_size=8"], cwd=tmp_path)
    summary = summaries(tmp_path / "outputs" / "default")[0]
    assert summary["status"] == "completed" and summary["choices"]["data"] == "imagefolder"


@pytest.mark.slow
def test_report_over_fashion_mnist_preset_sweeps(tmp_path):
    """Both presets' sweeps (shrunk by +debug=quick) fill the study tables with "no study number for this
    dataset" where the study has CIFAR-10 numbers, and draw the figures."""
    root = tmp_path / "data"
    write_fake_mnist(root / "FashionMNIST" / "raw", n_train=400, n_test=100)
    common = [f"data.root={root}", "data.download=false", "logger=none", "+debug=quick"]
    run_train(["-m", "+experiment=fmnist_bn_baseline", *common], cwd=tmp_path)
    run_train(["-m", "+experiment=fmnist_lr_robustness", "optimizer.lr=5e-3", "probe.landscape.interval=2",
               "probe.grad_similarity.interval=1", *common], cwd=tmp_path)
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"),
                           str(tmp_path / "multirun" / "fmnist_bn_baseline"),
                           str(tmp_path / "multirun" / "fmnist_lr_robustness"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False, env=env)
    assert proc.returncode == 0, proc.stderr
    md = (out / "report.md").read_text()

    def section(title: str) -> str:
        text = md[md.index(f"## {title} "):]
        return text[:text.index("\n## ", 3)] if "\n## " in text[3:] else text

    base = section("vgg_bn_baseline")
    rows = [line for line in base.splitlines() if line.startswith(("| plain |", "| BN |"))]
    assert len(rows) == 2  # the preset runs the study's section-2 settings (lr 0.001): its rows
    assert all("| no study number for this dataset |" in r for r in rows)
    assert not any("26.58" in r or "12.35" in r for r in rows)  # the study's CIFAR-10 errors
    assert "data=fashion_mnist; the study reports CIFAR-10 only" in base
    lr = section("vgg_lr_robustness")
    # per norm
    mechanism = [line for line in lr.splitlines() if line.startswith(("| plain | all ", "| BN | all "))]
    assert len(mechanism) == 2 and all(r.count("no study number for this dataset") == 3 for r in mechanism)
    assert "15.7" not in lr  # the study's Lipschitz estimate
    figures = {p.name for p in (out / "fig").glob("*.png")}
    assert {"vgg_bn_baseline_bars.png", "vgg_lr_robustness_landscape.png",
            "vgg_lr_robustness_probes.png"} <= figures
