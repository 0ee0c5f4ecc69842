"""Every option of every config group composes with Hydra and trains a few steps."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from conftest import CONF, TINY
from fake_cifar import write_fake_cifar
from fake_datasets import write_fake_mnist, write_fake_svhn, write_image_folder
from hydra import compose, initialize_config_dir

from normbench.job import run_job

GROUP_OPTIONS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("model", "norm", "activation", "loss", "optimizer", "scheduler", "data", "probe", "logger")
}
CASES = [(group, option) for group, options in GROUP_OPTIONS.items() for option in options]
# A model-specific width that still lets gn's 4 groups divide every layer.
SMALL_WIDTH = {"alexnet": 0.0625, "alexnet_cifar": 0.125, "vgg_a": 0.125, "vgg_a_light": 0.5}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=overrides)


def tiny_overrides(group: str, option: str) -> list[str]:
    overrides = [o for o in TINY if not o.startswith("model.width")] + ["logger=none"]
    overrides = [o for o in overrides if not (group == "data" and o.startswith("data"))]
    model = option if group == "model" else "vgg_a"
    overrides += [f"{group}={option}", f"model.width={SMALL_WIDTH[model]}"]
    if model == "alexnet":
        overrides += ["model.input_size=64"]  # keeps the 224-input path's resize but runs in seconds
    if group == "probe":
        overrides += ["probe.interval=2"] if option != "none" else []
    if (group, option) == ("scheduler", "step"):  # a decay within the run (a longer step is refused)
        overrides += ["trainer.epochs=2", "trainer.max_steps_per_epoch=2", "scheduler.every_epochs=1"]
    return overrides


def test_every_group_has_the_options_the_studies_use():
    assert GROUP_OPTIONS["model"] == ["alexnet", "alexnet_cifar", "vgg_a", "vgg_a_light"]
    assert GROUP_OPTIONS["norm"] == ["bn", "brn", "gn", "ln", "lrn", "none"]
    assert GROUP_OPTIONS["activation"] == ["elu", "gelu", "leaky_relu", "mish", "relu", "swish"]
    assert GROUP_OPTIONS["loss"] == ["ce", "ce_l1", "ce_l2", "focal", "label_smoothing"]
    assert GROUP_OPTIONS["optimizer"] == ["adagrad", "adam", "adamw", "rmsprop", "sgd", "sgd_momentum"]
    assert GROUP_OPTIONS["scheduler"] == ["constant", "cosine", "onecycle", "step"]
    assert {"cifar10", "cifar100", "synthetic"} <= set(GROUP_OPTIONS["data"])


@pytest.fixture
def fake_cifar(tmp_path, monkeypatch):
    """Real torchvision CIFAR classes reading small files in the real on-disk format."""
    root = tmp_path / "data"
    for name, cls in (("cifar10", torchvision.datasets.CIFAR10), ("cifar100", torchvision.datasets.CIFAR100)):
        md5s = write_fake_cifar(root, name, n_train=300, n_test=60)
        monkeypatch.setattr(cls, "train_list", [[f, md5s[f]] for f, _ in cls.train_list])
        monkeypatch.setattr(cls, "test_list", [[f, md5s[f]] for f, _ in cls.test_list])
        monkeypatch.setattr(cls, "meta", {**cls.meta, "md5": md5s[cls.meta["filename"]]})
    return root


def write_other_datasets(root: Path, monkeypatch) -> None:
    """The other data options' files in the same root: MNIST / Fashion-MNIST idx files, SVHN .mat files,
    an image folder of 10 classes."""
    for folder in ("MNIST", "FashionMNIST"):
        write_fake_mnist(root / folder / "raw", n_train=300, n_test=60)
    for split, (md5, _, _) in write_fake_svhn(root, n=300).items():
        monkeypatch.setitem(torchvision.datasets.SVHN.split_list, split,
                            [*torchvision.datasets.SVHN.split_list[split][:2], md5])
    for split, n in (("train", 200), ("test", 50)):
        write_image_folder(root, split, np.random.default_rng(0).integers(0, 256, (n, 32, 32, 3)),
                           np.arange(n) % 10, [f"class_{i}" for i in range(10)])


# logger=wandb starts W&B's service process: a slow test
@pytest.mark.parametrize("group,option", [pytest.param(*c, marks=pytest.mark.slow) if c == ("logger", "wandb")
                                          else c
                                          for c in CASES], ids=[f"{g}={o}" for g, o in CASES])
def test_option_composes_and_trains(group, option, tmp_path, fake_cifar, wandb_env, monkeypatch):
    overrides = tiny_overrides(group, option)
    if group == "data" and option != "synthetic":
        if not option.startswith("cifar"):
            write_other_datasets(fake_cifar, monkeypatch)
        overrides += [f"data.root={fake_cifar}", "data.val_size=60"]
        overrides += ["data.download=false"] if option != "imagefolder" else []  # nothing to download
    cfg = compose_cfg(overrides)
    assert cfg[group].get("name", option) == option or group in ("optimizer", "data")
    objective = run_job(cfg, output_dir=tmp_path / "run")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    assert 0.0 <= objective <= 1.0 and objective == pytest.approx(1 - summary["metrics"]["val/best_acc"])
    assert summary["metrics"]["model/params"] > 0
    steps = [json.loads(line) for line in (tmp_path / "run" / "steps.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    if group == "probe" and option != "none":
        probes = (tmp_path / "run" / "probes.jsonl").read_text().splitlines()
        assert probes and all("probe/" in "".join(json.loads(p)) for p in probes)


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(line)["train/loss"] for line in (run_dir / "steps.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["norm=bn", "optimizer=sgd"],
    ["norm=gn", "activation=leaky_relu", "loss=focal"],
    ["norm=none", "optimizer=adam", "scheduler=cosine"],
    ["model=alexnet_cifar", "norm=ln", "model.width=0.25", "model.dropout=0.0"],
], ids=lambda o: ",".join(o))
def test_loss_decreases_over_a_short_run(overrides, tmp_path):
    # vgg_a_light at its own width (0.25), not quick's
    cfg = compose_cfg([*TINY, "logger=none", "model=vgg_a_light", "model.width=0.25", "trainer.epochs=3",
                              "trainer.max_steps_per_epoch=30", "data.num_train=1024",
                              "data.augment=false", *overrides])
    run_job(cfg, output_dir=tmp_path)
    losses = _losses(tmp_path)
    assert len(losses) == 90
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_vgg_a_parameter_counts_match_the_study():
    from normbench.activations import activation_factory
    from normbench.models import build_model, count_parameters
    from normbench.norms import NormSpec

    cfg = compose_cfg(["model=vgg_a"])
    relu = activation_factory("relu")
    shape = {"num_classes": 10, "in_channels": 3, "image_size": 32, "activation": relu}
    assert count_parameters(build_model(cfg.model, norm=NormSpec(name="none").make, **shape)) == 9_750_922
    assert count_parameters(build_model(cfg.model, norm=NormSpec(name="bn").make, **shape)) == 9_756_426


def test_alexnet_layer_norm_shapes_match_the_study():
    from normbench.activations import activation_factory
    from normbench.models import build_model
    from normbench.norms import NormSpec

    cfg = compose_cfg(["model=alexnet"])
    model = build_model(cfg.model, num_classes=10, in_channels=3, image_size=224,
                        norm=NormSpec(name="ln", affine="element").make,
                        activation=activation_factory("relu"))
    shapes = [tuple(m.normalized_shape) for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert shapes == [(96, 27, 27), (256, 13, 13), (384, 13, 13), (384, 13, 13), (256, 6, 6)]


@pytest.mark.parametrize("optimizer", ["adagrad", "rmsprop", "adam", "sgd"])
def test_onecycle_works_with_every_kind_of_optimizer(optimizer, tmp_path):
    cfg = compose_cfg([*TINY, "logger=none", "scheduler=onecycle", f"optimizer={optimizer}"])
    run_job(cfg, output_dir=tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "completed"


def test_fp16_trains_with_loss_scaling(tmp_path):
    from normbench.trainer import LoopSettings, Trainer

    cfg = compose_cfg([*TINY, "logger=none", "trainer.precision=fp16"])
    run_job(cfg, output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    trainer = Trainer(torch.nn.Linear(2, 2), None, None, None, None, [], LoopSettings(epochs=1,
                      amp_dtype=torch.float16), None, device=torch.device("cpu"))
    assert trainer.scaler is not None


@pytest.mark.parametrize("model", ["vgg_a", "alexnet_cifar"])
def test_builtin_models_train_on_one_channel_images_of_another_size(model, tmp_path):
    """The pipeline applies unchanged to grayscale 28x28 data: 1 input channel, resized to 32 on the
    device."""
    cfg = compose_cfg([*TINY, "logger=none", f"model={model}", "data.channels=1", "data.image_size=28",
                       "norm=gn", "trainer.epochs=2"])
    run_job(cfg, output_dir=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    first = next(m for m in torch.load(tmp_path / "checkpoint.pt", weights_only=True)["model"].values()
                 if m.dim() == 4)
    assert first.shape[1] == 1  # the first convolution takes one channel
    assert (tmp_path / "filters.png").stat().st_size > 0
