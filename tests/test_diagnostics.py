"""The normalization diagnostics: batch renormalization against BatchNorm, the per-layer probe on a
constructed layer, the batch- vs running-statistics gap, and tiny real runs that record them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CONF, TINY, run_train, wandb_inspect
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from normbench.activations import activation_factory
from normbench.fused import unfusable_reason
from normbench.fused_launch import unfusable_job_reason
from normbench.job import run_job
from normbench.models import VGG
from normbench.norms import BatchRenorm2d, NormSpec
from normbench.probes import LayersProbe, conv_blocks

torch.set_num_threads(1)


# ------------------------------------------------------------------------------------------------ brn


def _pair(dtype, r_max: float, d_max: float, channels: int = 3) -> tuple[nn.BatchNorm2d, BatchRenorm2d]:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(channels).to(dtype)
    brn = BatchRenorm2d(channels, eps=bn.eps, momentum=bn.momentum, r_max=r_max, d_max=d_max, start=0,
                        warmup=0).to(dtype)
    with torch.no_grad():
        for layer in (bn, brn):
            layer.weight.copy_(torch.linspace(0.5, 2.0, channels))
            layer.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return bn, brn


def _step(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    (out * upstream).sum().backward()
    grads = (x.grad, layer.weight.grad, layer.bias.grad)
    layer.zero_grad(set_to_none=True)
    return out.detach(), *grads


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
def test_brn_clipped_to_r1_d0_is_batchnorm(dtype, tol):
    """Several training steps on batches whose statistics differ from the running ones (so an unclipped r, d
    would not be 1, 0): outputs, input and affine gradients, running statistics and eval outputs agree."""
    bn, brn = _pair(dtype, r_max=1.0, d_max=0.0)
    gen = torch.Generator().manual_seed(1)
    for step in range(5):
        x = (torch.randn(6, 3, 4, 4, generator=gen) * (1 + step) + step).to(dtype)
        upstream = torch.randn(6, 3, 4, 4, generator=gen).to(dtype)
        for a, b in zip(_step(bn, x, upstream), _step(brn, x, upstream)):
            torch.testing.assert_close(b, a, atol=tol, rtol=tol)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(brn, name), getattr(bn, name), atol=tol, rtol=tol)
    bn.eval(), brn.eval()
    assert torch.equal(bn(x), brn(x))


def test_brn_unclipped_output_uses_running_statistics_and_no_gradient_through_r_d():
    """With clips that never bind, y = (x - mu) / sigma * weight + bias for the running mu, sigma before the
    update (the paper's identity), and dL/dx is r times BatchNorm's (r, d are constants to autograd)."""
    bn, brn = _pair(torch.float64, r_max=1e6, d_max=1e6)
    with torch.no_grad():
        for layer in (bn, brn):
            layer.weight.fill_(1.0), layer.bias.fill_(0.0)
            layer.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))
            layer.running_var.copy_(torch.tensor([4.0, 0.25, 1.0], dtype=torch.float64))
    mean, std = brn.running_mean.clone(), (brn.running_var + brn.eps).sqrt()
    x = torch.randn(8, 3, 5, 5, dtype=torch.float64) * 3 + 1
    upstream = torch.randn_like(x)
    out, grad_x, _, _ = _step(brn, x, upstream)
    torch.testing.assert_close(out, (x - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1), atol=1e-12, rtol=0)
    batch_var, _ = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
    r = ((batch_var + brn.eps).sqrt() / std).view(1, -1, 1, 1)
    _, bn_grad_x, _, _ = _step(bn, x, upstream * r)
    torch.testing.assert_close(grad_x, bn_grad_x, atol=1e-12, rtol=0)
    torch.testing.assert_close(brn.running_mean, bn.running_mean, atol=1e-12, rtol=0)


def test_brn_schedule_and_config():
    spec = NormSpec.from_cfg(OmegaConf.load("conf/norm/brn.yaml"))
    layer = spec.make(8, 4)
    assert isinstance(layer, BatchRenorm2d) and (layer.r_max, layer.d_max) == (3.0, 5.0)
    start, warmup = spec.renorm_start, spec.renorm_warmup
    assert layer.limits(0) == layer.limits(start) == (1.0, 0.0)
    assert layer.limits(start + warmup // 2) == pytest.approx((2.0, 2.5))
    assert layer.limits(start + warmup) == layer.limits(10**9) == (3.0, 5.0)
    layer.train()(torch.randn(4, 8, 4, 4))
    assert int(layer.num_batches_tracked) == 1


def test_brn_runs_unfused():
    model = VGG(NormSpec(name="brn").make, activation_factory("relu"), width=0.125)
    assert "BatchRenorm2d" in unfusable_reason(model)
    cfg = OmegaConf.create({"model": {"_target_": "normbench.models.vgg_a"}, "norm": {"name": "brn"}})
    assert unfusable_job_reason(cfg) == "norm=brn"


# ------------------------------------------------------------------------------------------------ layers


def test_layers_probe_on_a_constructed_layer():
    """A 1x1 conv of 4 channels on positive inputs: channels 0 and 1 are negative everywhere (dead), channel
    2 is positive only at one pixel of the second sample (alive: dead means zero for every sample), channel 3
    is positive everywhere. Every number is checked against its definition."""
    conv = nn.Conv2d(1, 4, 1)
    model = nn.Sequential(conv, nn.BatchNorm2d(4, affine=False), nn.ReLU())
    x = torch.full((2, 1, 3, 3), 0.1)
    x[1, 0, 2, 2] = 1.0
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([-1.0, -2.0, 1.0, 1.0]).view(4, 1, 1, 1))
        conv.bias.copy_(torch.tensor([0.0, -1.0, -0.5, 0.0]))
    model[1].eval()  # running statistics (0, 1): the norm passes the conv output on unchanged
    conv.weight.grad = torch.full_like(conv.weight, 0.5)
    lr = 0.1
    out = LayersProbe(interval=2).on_step(4, model, lambda: model(x).sum(), lr)
    pre = conv(x).detach() / math.sqrt(1 + 1e-5)
    post = pre.clamp(min=0)
    expected = {"norm_mean": pre.mean(), "norm_std": pre.std(), "act_mean": post.mean(),
                "act_std": post.std(), "dead_frac": 0.5, "weight_norm": math.sqrt(7.0), "grad_norm": 1.0,
                "eff_lr": lr / 7.0}
    assert set(out) == {f"probe/layers/conv1/{k}" for k in expected}
    for key, value in expected.items():
        assert out[f"probe/layers/conv1/{key}"] == pytest.approx(float(value), rel=1e-6), key
    assert LayersProbe(interval=2).on_step(3, model, lambda: model(x).sum(), lr) is None


def test_conv_blocks_of_the_builtin_models():
    plain = VGG(NormSpec(name="none").make, activation_factory("relu"), width=0.125)
    blocks = conv_blocks(plain)
    assert list(blocks) == [f"conv{i}" for i in range(1, 9)]
    assert all(set(b) == {"conv", "act"} for b in blocks.values())  # no norm: no norm stats, no eff_lr
    gn = conv_blocks(VGG(NormSpec(name="gn", groups=2).make, activation_factory("gelu"), width=0.125))
    assert all(isinstance(b["norm"], nn.GroupNorm) and isinstance(b["act"], nn.GELU) for b in gn.values())


# ------------------------------------------------------------------------------------------------ runs


def _tiny_run(overrides: list[str], out: Path) -> tuple[list[dict], dict]:
    """A tiny run in this process (real Hydra composition, the real job); its epoch rows and summary."""
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*TINY, "logger=none", *overrides])
    run_job(cfg, output_dir=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return rows, json.loads((out / "summary.json").read_text())


@pytest.mark.slow
def test_brn_with_layers_probe_trains_and_records_everything(tmp_path, wandb_env):
    """norm=brn whose clips relax within the run, probe=layers every 2 steps, logged to W&B offline."""
    run_train([*TINY, "norm=brn", "norm.renorm_start=1", "norm.renorm_warmup=2", "probe=layers",
               "probe.interval=2", "trainer.epochs=2"], tmp_path)
    (run,) = [p.parent for p in (tmp_path / "outputs").rglob("summary.json")]
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    probes = [json.loads(line) for line in (run / "probes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in probes] == [2, 4, 6, 8]
    kinds = ("norm_mean", "norm_std", "act_mean", "act_std", "dead_frac", "weight_norm", "eff_lr",
             "grad_norm")
    layer_keys = {f"probe/layers/conv{i}/{k}" for i in range(1, 9) for k in kinds}
    for row in probes:
        assert set(row) == {"step", "epoch"} | layer_keys
        assert all(math.isfinite(v) for v in row.values())
        assert all(0 <= row[f"probe/layers/conv{i}/dead_frac"] <= 1 for i in range(1, 9))
    epochs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    gap_keys = {f"val/{m}_{mode}" for m in ("loss", "acc") for mode in ("evalmode", "batchstats")}
    assert all(gap_keys <= set(row) and all(math.isfinite(row[k]) for k in gap_keys) for row in epochs)
    (wandb_run,) = run.glob("wandb/offline-run-*")
    summary = wandb_inspect(wandb_run)["summary"]
    assert summary["probe/layers/conv1/act_std"] == probes[-1]["probe/layers/conv1/act_std"]
    assert summary["val/acc_batchstats"] == epochs[-1]["val/acc_batchstats"]


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_batchstats_gap_is_zero_without_a_norm(tmp_path, dropout):
    """No norm layer: train-mode norms with dropout off is eval mode, so the two agree exactly (dropout is
    off in both)."""
    rows, _ = _tiny_run(["norm=none", f"model.dropout={dropout}"], tmp_path)
    (row,) = rows
    assert row["val/acc_batchstats"] == row["val/acc_evalmode"]
    assert row["val/loss_batchstats"] == row["val/loss_evalmode"]


def test_batchstats_gap_leaves_training_unchanged(tmp_path):
    """BN with dropout, two epochs: with the gap measured (default) and without (0), every training and
    evaluation number is the same, so neither the running statistics nor the RNG were disturbed; with BN
    the two modes do differ."""
    base = ["norm=bn", "model.dropout=0.5", "trainer.epochs=2"]
    measured, summary = _tiny_run(base, tmp_path / "on")
    plain, plain_summary = _tiny_run([*base, "trainer.batchstats_images=0"], tmp_path / "off")
    assert all("val/acc_batchstats" not in row for row in plain)
    for with_gap, without in zip(measured, plain, strict=True):
        for key in ("train/loss", "train/acc", "val/loss", "val/acc"):
            assert with_gap[key] == without[key], key
        assert with_gap["val/loss_batchstats"] != with_gap["val/loss_evalmode"]
    for key in ("test/loss", "test/acc"):
        assert summary["metrics"][key] == plain_summary["metrics"][key]


def test_batchstats_gap_evalmode_shares_the_validation_passes(tmp_path):
    """Eval mode does not depend on the batch: when validation covers the gap's images (here all 128),
    its figures are the validation's own; when it does not (one batch of 64), they come from a pass at the
    training batch size, and agree to float rounding."""
    shared, _ = _tiny_run(["norm=bn", "data.val_size=128"], tmp_path / "shared")
    separate, _ = _tiny_run(["norm=bn", "data.val_size=128", "trainer.max_eval_batches=1"],
                            tmp_path / "separate")
    (row,), (apart,) = shared, separate
    assert (row["val/loss_evalmode"], row["val/acc_evalmode"]) == (row["val/loss"], row["val/acc"])
    assert apart["val/loss_evalmode"] == pytest.approx(row["val/loss_evalmode"], rel=1e-5)
    assert apart["val/acc_evalmode"] == row["val/acc_evalmode"]
    assert apart["val/loss"] != apart["val/loss_evalmode"]  # 64 validated images against the gap's 128
    assert apart["val/loss_batchstats"] == row["val/loss_batchstats"]


def test_layers_probe_leaves_training_bit_identical():
    """The probe's forward (batch statistics, dropout) is undone: weights, BN buffers and the RNG as if
    unprobed (test_probes' tiny BN+dropout CNN, probed at every step)."""
    from test_probes import _train

    ref_model, _, _, ref_next = _train([])
    model, _, rows, nxt = _train([LayersProbe(interval=1)])
    assert len(rows) == 4 and all(math.isfinite(r["probe/layers/conv1/norm_std"]) for r in rows)
    for key, value in ref_model.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    assert torch.equal(ref_next, nxt)
