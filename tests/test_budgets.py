"""Run budgets in sight: the steps and images a run trained on are in its record, W&B and last line;
trainer.max_steps caps the steps across epochs, after a resume and in fused training; optimizer.lr_ref_batch
scales the lr (and one-cycle's peak) linearly with the batch; model.init draws the built-in models' weights.
Configs composed with Hydra, parts built by the real `build_parts`, checkpoints written and read back."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import CONF, TINY, run_train, wandb_inspect
from hydra import compose, initialize_config_dir
from torch import nn

from normbench.checkpoint import load_checkpoint, save_checkpoint
from normbench.errors import ConfigError
from normbench.fused_trainer import FusedTrainer
from normbench.identity import register_resolvers, run_identity
from normbench.loggers import FanOut
from normbench.models import alexnet_cifar, vgg_a
from normbench.record import Status
from normbench.run import build_parts
from normbench.trainer import LoopState
from normbench.validate import validate

# TINY in-process: 512 synthetic images, batches of 16, 4 steps an epoch, no W&B
QUICK = [*TINY, "logger=none", "trainer.device=cpu", "trainer.checkpoint=false"]


def compose_cfg(overrides: list[str]):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF)):
        return compose(config_name="config", overrides=[*QUICK, *overrides])


def make_parts(overrides: list[str]):
    cfg = compose_cfg(overrides)
    parts = build_parts(cfg, validate(cfg, device="cpu"), sink=FanOut())
    parts.trainer.settings.progress = False
    return parts


# --------------------------------------------------------------------------------------------------
# optimizer.lr_ref_batch


@pytest.mark.parametrize("batch_size,reference,lr,expected", [(16, 64, 0.02, 0.005), (16, 4, 0.01, 0.04),
                                                               (16, None, 0.01, 0.01), (16, 16, 0.03, 0.03)])
def test_lr_is_scaled_by_batch_size_over_lr_ref_batch(batch_size, reference, lr, expected):
    ref = "null" if reference is None else reference
    parts = make_parts([f"batch_size={batch_size}", f"optimizer.lr={lr}", f"optimizer.lr_ref_batch={ref}"])
    assert parts.optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("max_lr,expected_peak", [("null", 0.01 * 16 / 64), ("0.2", 0.2 * 16 / 64)])
def test_one_cycle_peak_is_scaled_too_and_the_cycle_spans_the_step_budget(max_lr, expected_peak):
    parts = make_parts(["optimizer.lr=0.01", "optimizer.lr_ref_batch=64", "scheduler=onecycle",
                        f"scheduler.max_lr={max_lr}", "trainer.epochs=3", "trainer.max_steps=10"])
    assert parts.optimizer.defaults["lr"] == pytest.approx(0.0025)
    assert parts.optimizer.param_groups[0]["max_lr"] == pytest.approx(expected_peak)
    lrs = []
    for _ in range(10):  # the run's 10 steps (of its 3 x 4 without the budget)
        lrs.append(parts.scheduler.get_last_lr()[0])
        parts.optimizer.step()
        parts.scheduler.step()
    # the peak at 30 % of the 10 steps, the floor (peak / div_factor / final_div_factor) at the last one
    assert lrs[2] == max(lrs) == pytest.approx(expected_peak, rel=1e-9)
    assert lrs[-1] == pytest.approx(expected_peak / 25 / 1e4, rel=1e-9)


@pytest.mark.parametrize("value", ["0", "-8", "1.5", "true", "abc"])
def test_a_bad_lr_ref_batch_is_one_line(value):
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg([f"optimizer.lr_ref_batch={value}"]), device="cpu")
    assert str(caught.value).startswith("bad value optimizer.lr_ref_batch=")
    assert "positive integer" in str(caught.value) and "\n" not in str(caught.value)


# --------------------------------------------------------------------------------------------------
# model.init


def weighted_layers(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def fans(layer: nn.Module) -> tuple[int, int]:
    receptive = layer.weight[0, 0].numel()
    return layer.weight.shape[1] * receptive, layer.weight.shape[0] * receptive


def build(builder, init: str) -> nn.Module:
    torch.manual_seed(0)
    return builder(num_classes=10, in_channels=3, image_size=32, norm=lambda c, s: nn.BatchNorm2d(c),
                   activation=nn.ReLU, width=0.5, init=init)


@pytest.mark.parametrize("builder", [vgg_a, alexnet_cifar])
def test_each_init_draws_the_weights_it_names(builder):
    for layer in weighted_layers(build(builder, "xavier_uniform")):
        fan_in, fan_out = fans(layer)
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert layer.weight.abs().max() <= bound and layer.weight.abs().max() > 0.9 * bound
        assert not layer.bias.any()
    for layer in weighted_layers(build(builder, "kaiming_normal")):
        _, fan_out = fans(layer)
        if layer.weight.numel() >= 4000:  # enough draws for the sample std to be within 10 %
            assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / fan_out), rel=0.1)
        assert not layer.bias.any()
    for layer in weighted_layers(build(builder, "torch")):  # kaiming_uniform(a=sqrt(5)): bound 1/sqrt(fan_in)
        fan_in, _ = fans(layer)
        assert layer.weight.abs().max() <= 1 / math.sqrt(fan_in) + 1e-7
        assert layer.bias.abs().max() > 0
    default = build(builder, "xavier_uniform")
    torch.manual_seed(0)
    unnamed = builder(num_classes=10, in_channels=3, image_size=32, norm=lambda c, s: nn.BatchNorm2d(c),
                      activation=nn.ReLU, width=0.5)
    pairs = zip(default.state_dict().values(), unnamed.state_dict().values())
    assert all(torch.equal(a, b) for a, b in pairs)


def test_init_is_in_the_config_and_the_identity_and_checked():
    cfg = compose_cfg([])
    assert cfg.model.init == "xavier_uniform"
    for model in ("alexnet", "alexnet_cifar", "vgg_a_light"):
        assert compose_cfg([f"model={model}"]).model.init == "xavier_uniform"
    identities = {run_identity(compose_cfg([f"model.init={init}"]))
                  for init in ("xavier_uniform", "kaiming_normal", "torch")}
    assert len(identities) == 3
    with pytest.raises(ConfigError) as caught:
        validate(compose_cfg(["model.init=he_normal"]), device="cpu")
    assert str(caught.value) == ("bad value model.init='he_normal': choose one of xavier_uniform, "
                                 "kaiming_normal, torch")


# --------------------------------------------------------------------------------------------------
# trainer.max_steps


@pytest.mark.parametrize("max_steps,steps,epochs_done", [(10, [4, 8, 10], 3), (6, [4, 6], 2),
                                                         (100, [4, 8, 12], 3)])
def test_max_steps_stops_the_run_mid_epoch_after_validating(max_steps, steps, epochs_done):
    parts = make_parts(["trainer.epochs=3", f"trainer.max_steps={max_steps}"])
    state = parts.trainer.run()
    assert state.status == Status.COMPLETED and state.epochs_done == epochs_done
    assert state.step == steps[-1] and state.images == 16 * steps[-1]
    assert [row["step"] for row in state.history] == steps
    assert [row["train/images"] for row in state.history] == [16 * s for s in steps]
    assert all("val/acc" in row for row in state.history)  # the cut epoch validated too
    assert parts.trainer.settings.total_steps(len(parts.stream)) == min(max_steps, 12)


def test_max_steps_holds_after_a_resume_from_a_checkpoint(tmp_path):
    """Stopped after epoch 1's checkpoint, then resumed in new parts: it stops at the same total step
    count, with the weights of the run that was never stopped."""
    overrides = ["trainer.epochs=3", "trainer.max_steps=10"]
    whole = make_parts(overrides)
    whole_state = whole.trainer.run()

    class Stopped(Exception):
        pass

    first = make_parts(overrides)
    path = tmp_path / "checkpoint.pt"

    def checkpoint_then_stop(state: LoopState) -> bool:
        save_checkpoint(path, identity="x", model=first.model, optimizer=first.optimizer,
                        scheduler=first.scheduler, generator=first.generator, state=state)
        raise Stopped

    with pytest.raises(Stopped):
        first.trainer.run(on_epoch_end=checkpoint_then_stop)
    again = make_parts(overrides)
    state = load_checkpoint(path, identity="x", model=again.model, optimizer=again.optimizer,
                            scheduler=again.scheduler, generator=again.generator)
    assert (state.epochs_done, state.step, state.images) == (1, 4, 64)
    state = again.trainer.run(state)
    assert state.status == Status.COMPLETED and (state.step, state.images) == (10, 160)
    assert [row["step"] for row in state.history] == [4, 8, 10]
    for a, b in zip(whole.model.state_dict().values(), again.model.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), atol=1e-6)
    assert whole_state.history[-1]["val/acc"] == state.history[-1]["val/acc"]


def test_fused_runs_stop_at_max_steps():
    runs = [make_parts(["trainer.epochs=3", "trainer.max_steps=6", f"seed={seed}"]) for seed in (0, 1)]
    states = FusedTrainer([run.trainer for run in runs]).run([None, LoopState(epochs_done=1, step=4,
                                                                               images=64)])
    for state in states:
        assert state.status == Status.COMPLETED and state.epochs_done == 2 and state.step == 6
    assert [row["step"] for row in states[0].history] == [4, 6]
    assert [row["step"] for row in states[1].history] == [6]  # resumed at epoch 1: one partial epoch
    assert [row["train/images"] for row in states[1].history] == [96]


# --------------------------------------------------------------------------------------------------
# the record, W&B and the last line


@pytest.mark.slow
def test_a_run_records_its_steps_images_and_effective_lr(tmp_path, wandb_env):
    proc = run_train([*TINY, "trainer.epochs=3", "trainer.max_steps=10", "optimizer.lr=0.02",
                      "optimizer.lr_ref_batch=64", "scheduler=onecycle", "model.init=kaiming_normal"],
                     tmp_path)
    (record,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    summary = json.loads((record / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["status"] == "completed" and summary["cut_by_max_steps"] is True
    assert (metrics["train/steps"], metrics["train/images"], summary["epochs_done"]) == (10, 160, 3)
    assert metrics["optimizer/lr_effective"] == pytest.approx(0.005)
    assert metrics["scheduler/max_lr_effective"] == pytest.approx(0.005)
    rows = [json.loads(line) for line in (record / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["train/images"]) for r in rows] == [(4, 64), (8, 128), (10, 160)]
    steps = [json.loads(line) for line in (record / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps] == list(range(1, 11))
    recorded = wandb_inspect(record / "wandb")["summary"]
    assert (recorded["train/steps"], recorded["train/images"]) == (10, 160) and recorded["cut_by_max_steps"]
    assert recorded["optimizer/lr_effective"] == pytest.approx(0.005)
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith(f"normbench: completed  test/acc {metrics['test/acc']:.4f}  "
                           "steps 10 (cut by trainer.max_steps)  images 160  record ")
