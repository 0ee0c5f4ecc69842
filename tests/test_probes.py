"""Optimization probes: math against a quadratic with known answers, gradient similarity against hand-computed
values, exact state restoration on a tiny BN+dropout CNN, and config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch import nn

from normbench.errors import ConfigError
from normbench.probes import (
    GradSimilarityProbe,
    GradVarianceProbe,
    LandscapeProbe,
    build_probes,
    probe_batch,
    run_probes,
)

torch.set_num_threads(1)
CONF = Path(__file__).resolve().parents[1] / "conf" / "probe"


# ------------------------------------------------------------------------------------------------ quadratic


class Quadratic(nn.Module):
    """L(w) = ½ wᵀAw with w split over two parameters (to exercise the all-parameter flattening)."""

    def __init__(self, A: torch.Tensor, w: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.w1 = nn.Parameter(w[:3].clone())
        self.w2 = nn.Parameter(w[3:].clone())

    def w(self) -> torch.Tensor:
        return torch.cat([self.w1, self.w2])

    def forward(self) -> torch.Tensor:
        w = self.w()
        return 0.5 * w @ self.A @ w


def _psd(eigs: list[float], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigs), len(eigs), generator=gen, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(eigs, dtype=torch.float64)) @ q.T, q


EIGS = [4.0, 2.0, 1.0, 0.5, 0.0]


def _quadratic_with_grad(w: torch.Tensor) -> tuple[Quadratic, torch.Tensor]:
    A, _ = _psd(EIGS)
    model = Quadratic(A, w)
    model().backward()
    return model, A


def test_eta_grid_log_and_linear():
    p = LandscapeProbe(eta_min_factor=0.5, eta_max_factor=4.0, num_steps=4, spacing="log")
    assert p.eta_grid(0.1) == pytest.approx([0.05, 0.1, 0.2, 0.4])
    p = LandscapeProbe(eta_min_factor=0.5, eta_max_factor=2.0, num_steps=4, spacing="linear")
    assert p.eta_grid(1.0) == pytest.approx([0.5, 1.0, 1.5, 2.0])


def test_landscape_quadratic_closed_form():
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    model, A = _quadratic_with_grad(w)
    g = A @ w
    assert torch.allclose(torch.cat([model.w1.grad, model.w2.grad]), g)
    lr = 0.1
    probe = LandscapeProbe(interval=1, num_steps=8)
    out = probe.on_step(0, model, model, lr)

    etas = probe.eta_grid(lr)
    assert etas[0] == pytest.approx(0.05) and etas[-1] == pytest.approx(0.4)
    losses = [float(0.5 * (w - e * g) @ A @ (w - e * g)) for e in etas]
    Ag = float(torch.linalg.vector_norm(A @ g))
    gn = float(torch.linalg.vector_norm(g))
    assert out["probe/loss_min"] == pytest.approx(min(losses), rel=1e-12)
    assert out["probe/loss_max"] == pytest.approx(max(losses), rel=1e-12)
    # ∇L(w − ηg) − g = −ηAg
    assert out["probe/grad_pred"] == pytest.approx(etas[-1] * Ag, rel=1e-10)
    assert out["probe/grad_pred_min"] == pytest.approx(etas[0] * Ag, rel=1e-10)
    assert out["probe/beta"] == pytest.approx(Ag / gn, rel=1e-10)
    assert out["probe/beta"] <= max(EIGS) + 1e-12
    assert out["probe/grad_norm"] == pytest.approx(gn, rel=1e-12)
    assert all(type(v) is float for v in out.values())

    # weights and gradients untouched
    assert torch.equal(model.w1.detach(), w[:3]) and torch.equal(model.w2.detach(), w[3:])
    assert torch.equal(torch.cat([model.w1.grad, model.w2.grad]), g)


def test_landscape_beta_equals_top_eigenvalue_on_eigenvector():
    _, q = _psd(EIGS)
    w = 2.0 * q[:, 0]  # eigenvector of λ = 4, so g = 4w is one too
    model, _ = _quadratic_with_grad(w)
    out = LandscapeProbe(interval=1).on_step(0, model, model, 0.01)
    assert out["probe/beta"] == pytest.approx(4.0, rel=1e-10)
    # along an eigenvector the loss is ½λ(1 − ηλ)²‖w‖²
    etas = LandscapeProbe().eta_grid(0.01)
    losses = [0.5 * 4.0 * (1 - e * 4.0) ** 2 * 4.0 for e in etas]
    assert out["probe/loss_min"] == pytest.approx(min(losses), rel=1e-10)
    assert out["probe/loss_max"] == pytest.approx(max(losses), rel=1e-10)


def test_landscape_interval_and_skips():
    w = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=torch.float64)
    model, _ = _quadratic_with_grad(w)
    calls = []

    def closure():
        calls.append(1)
        return model()

    probe = LandscapeProbe(interval=5, num_steps=3)
    assert probe.on_step(3, model, closure, 0.1) is None and not calls
    assert probe.on_step(5, model, closure, 0.1) is not None
    assert len(calls) == 3 + 1  # num_steps + the reference gradient
    assert probe.on_step(10, model, closure, 0.0) is None  # lr 0: no direction scale


# ------------------------------------------------------------------------------------------------ similarity


class TwoParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.zeros(2))
        self.b = nn.Parameter(torch.zeros(1))


def _set_grad(model: TwoParams, values: list[float]) -> None:
    model.a.grad = torch.tensor(values[:2])
    model.b.grad = torch.tensor(values[2:])


def test_grad_similarity_hand_computed():
    model, probe = TwoParams(), GradSimilarityProbe(interval=2)
    _set_grad(model, [9.0, 9.0, 9.0])
    assert probe.on_step(0, model, None, 0.1) is None  # no previous gradient
    assert probe._prev is None  # step 0 precedes no probe step: nothing kept
    _set_grad(model, [3.0, 0.0, 4.0])
    assert probe.on_step(1, model, None, 0.1) is None
    assert probe._prev is not None  # kept for step 2
    _set_grad(model, [0.0, 0.0, 5.0])
    out = probe.on_step(2, model, None, 0.1)
    assert out["probe/grad_cos"] == pytest.approx(20.0 / 25.0)
    assert out["probe/grad_l2"] == pytest.approx(math.sqrt(9.0 + 1.0))
    assert all(type(v) is float for v in out.values())
    assert probe._prev is None  # step 2 precedes no probe step

    # interval 1: every step compares with the previous one
    probe = GradSimilarityProbe(interval=1)
    _set_grad(model, [1.0, 0.0, 0.0])
    assert probe.on_step(0, model, None, 0.1) is None
    _set_grad(model, [-2.0, 0.0, 0.0])
    out = probe.on_step(1, model, None, 0.1)
    assert out == {"probe/grad_cos": pytest.approx(-1.0), "probe/grad_l2": pytest.approx(3.0)}


def test_lipschitz_along_the_path_hand_computed():
    model, probe = TwoParams(), GradSimilarityProbe(interval=1)
    _set_grad(model, [1.0, 0.0, 0.0])
    assert probe.on_step(0, model, None, 0.1) is None
    with torch.no_grad():
        model.a.copy_(torch.tensor([0.3, 0.0]))
        model.b.copy_(torch.tensor([0.4]))  # ||w_1 - w_0|| = 0.5
    _set_grad(model, [1.0, 3.0, 4.0])  # ||g_1 - g_0|| = 5
    out = probe.on_step(1, model, None, 0.1)
    assert out["probe/lipschitz"] == pytest.approx(10.0)
    assert out["probe/grad_l2"] == pytest.approx(5.0)


def test_grad_variance_over_the_window_hand_computed():
    model, probe = TwoParams(), GradVarianceProbe(interval=4, window=3)
    grads = {1: [9.0, 9.0, 9.0], 2: [1.0, 0.0, 2.0], 3: [3.0, 2.0, 2.0], 4: [2.0, 4.0, 2.0]}
    seen = []
    for step, g in grads.items():
        _set_grad(model, g)
        seen.append(probe.reads_gradient(step))
        out = probe.on_step(step, model, None, 0.1)
        if step < 4:
            assert out is None
    assert seen == [False, True, True, True]  # step 1 is outside the window of steps 2..4
    window = torch.tensor([grads[s] for s in (2, 3, 4)], dtype=torch.float64)
    var = float(((window - window.mean(0)) ** 2).sum() / 2)  # trace of the sample covariance
    assert out["probe/grad_var"] == pytest.approx(var)
    assert out["probe/grad_var_rel"] == pytest.approx(var / float(window.mean(0).square().sum()))
    # a gap in the steps restarts the window: one gradient only, nothing reported
    probe = GradVarianceProbe(interval=4, window=3)
    for step in (6, 8):
        _set_grad(model, [1.0, 2.0, 3.0])
        assert probe.on_step(step, model, None, 0.1) is None


# ------------------------------------------------------------------------------------------------ restoration


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.drop = nn.Dropout(0.3)
        self.fc = nn.Linear(4 * 4 * 4, 10)
        self.bn1 = nn.BatchNorm1d(10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.bn1(self.fc(self.drop(x.flatten(1))))


def _train(probes, steps: int = 4):
    torch.manual_seed(0)
    model = TinyCNN().train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(1)
    rows = []
    for step in range(steps):
        x = torch.randn(8, 3, 8, 8, generator=gen)
        y = torch.randint(0, 10, (8,), generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()

        def closure(x=x, y=y):
            return F.cross_entropy(model(x), y)

        out = run_probes(probes, step, model, closure, opt.param_groups[0]["lr"])
        if out:
            rows.append(out)
        opt.step()
    return model, opt, rows, torch.rand(3)


def test_probed_training_is_bit_identical():
    ref_model, ref_opt, rows, ref_next = _train([])
    assert rows == []
    probes = [LandscapeProbe(interval=1, num_steps=3), GradSimilarityProbe(interval=1)]
    model, opt, rows, nxt = _train(probes)
    assert len(rows) == 4
    keys = {
        "probe/loss_min",
        "probe/loss_max",
        "probe/grad_pred",
        "probe/grad_pred_min",
        "probe/beta",
        "probe/grad_norm",
    }
    assert set(rows[0]) == keys
    assert set(rows[1]) == keys | {"probe/grad_cos", "probe/grad_l2", "probe/lipschitz"}
    for row in rows:
        assert all(type(v) is float and math.isfinite(v) for v in row.values())
    ref_state, state = ref_model.state_dict(), model.state_dict()
    assert ref_state.keys() == state.keys()
    for k in ref_state:  # weights and BN running_mean / running_var / num_batches_tracked
        assert torch.equal(ref_state[k], state[k]), k
    for p_ref, p in zip(ref_model.parameters(), model.parameters()):
        assert torch.equal(ref_opt.state[p_ref]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert torch.equal(ref_next, nxt)  # RNG state restored
    assert model.training and all(m.training for m in model.modules())


def test_restores_mode_rng_grads_even_if_closure_changes_them():
    torch.manual_seed(0)
    model = TinyCNN().train()
    x, y = torch.randn(8, 3, 8, 8), torch.randint(0, 10, (8,))
    F.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    grad_values = [g.clone() for g in grads]
    buffers = {k: v.clone() for k, v in model.named_buffers()}

    def closure():
        model.bn.eval()  # a closure that flips a mode must not leak it
        return F.cross_entropy(model(x), y)

    rng = torch.get_rng_state()
    LandscapeProbe(interval=1, num_steps=2).on_step(0, model, closure, 0.1)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(m.training for m in model.modules())
    assert all(p.grad is g for p, g in zip(model.parameters(), grads))
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), grad_values))
    assert all(torch.equal(v, buffers[k]) for k, v in model.named_buffers())


def test_same_dropout_mask_for_every_eta():
    """With tiny η, ∇L(w − ηg) ≈ ∇L(w) only if the dropout masks match (and the reference is recomputed)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(16, 1))
    x, y = torch.randn(32, 16), torch.randn(32, 1)
    F.mse_loss(model(x), y).backward()
    out = LandscapeProbe(interval=1, num_steps=3).on_step(0, model, lambda: F.mse_loss(model(x), y), 1e-6)
    assert out["probe/grad_pred"] < 1e-4 * out["probe/grad_norm"]
    assert math.isfinite(out["probe/beta"])


# ------------------------------------------------------------------------------------------------ config


def test_build_from_conf_files():
    assert build_probes(OmegaConf.load(CONF / "none.yaml")) == []
    assert build_probes(None) == []
    (land,) = build_probes(OmegaConf.load(CONF / "landscape.yaml"))
    assert isinstance(land, LandscapeProbe)
    assert (land.interval, land.eta_min_factor, land.eta_max_factor, land.num_steps, land.spacing) == (
        50,
        0.5,
        4.0,
        8,
        "log",
    )
    (sim,) = build_probes(OmegaConf.load(CONF / "grad_similarity.yaml"))
    assert isinstance(sim, GradSimilarityProbe) and sim.interval == 10
    (var,) = build_probes(OmegaConf.load(CONF / "grad_variance.yaml"))
    assert isinstance(var, GradVarianceProbe) and (var.interval, var.window) == (50, 4)
    land, sim, var, layers = build_probes(OmegaConf.load(CONF / "all.yaml"))
    assert (land.interval, sim.interval, var.interval, layers.interval) == (50, 10, 50, 50)
    cfg = OmegaConf.load(CONF / "all.yaml")
    cfg.interval = 20
    assert [p.interval for p in build_probes(cfg)] == [20, 20, 20, 20]
    cfg.interval = 2
    assert build_probes(cfg)[2].window == 2  # capped at the interval
    cfg = OmegaConf.load(CONF / "landscape.yaml")
    cfg.interval = 20
    assert build_probes(cfg)[0].interval == 20


@pytest.mark.parametrize(
    "cfg, key",
    [
        ({"name": "landscape", "interval": 0}, "probe.interval"),
        ({"name": "landscape", "interval": 2.5}, "probe.interval"),
        ({"name": "landscape", "eta_min_factor": -1.0}, "probe.eta_min_factor"),
        ({"name": "landscape", "eta_max_factor": 0}, "probe.eta_max_factor"),
        ({"name": "landscape", "eta_min_factor": 4.0, "eta_max_factor": 0.5}, "probe.eta_min_factor"),
        ({"name": "landscape", "num_steps": 1}, "probe.num_steps"),
        ({"name": "landscape", "spacing": "cubic"}, "probe.spacing"),
        ({"name": "landscape", "eta_max": 3.0}, "probe.eta_max"),
        ({"name": "grad_similarity", "interval": -3}, "probe.interval"),
        ({"name": "all", "grad_similarity": {"interval": 0}}, "probe.grad_similarity.interval"),
        ({"name": "all", "interval": 0}, "probe.interval"),
        ({"name": "hessian"}, "probe.name"),
        ({"name": "grad_variance", "window": 1}, "probe.window"),
        ({"name": "layers", "interval": 0}, "probe.interval"),
        ({"name": "all", "grad_variance": {"window": 2.5}}, "probe.grad_variance.window"),
    ],
)
def test_bad_config_raises(cfg, key):
    with pytest.raises(ConfigError) as err:
        build_probes(OmegaConf.create(cfg))
    assert err.value.key == key


# ------------------------------------------------------------------------------------------------ precision


def _fake_data():
    from normbench.data import load_data

    cfg = OmegaConf.create({"_target_": "normbench.datasets.synthetic", "val_size": 32, "split_seed": 0,
                            "num_train": 96, "num_test": 32, "image_size": 32, "num_classes": 10,
                            "channels": 3, "mean": None, "std": None, "generator_seed": 0, "noise": 0.25})
    return load_data(cfg, torch.device("cpu"))


@pytest.mark.parametrize("norm", ["bn", "none"])
def test_probes_under_bf16_autocast_equal_fp32(norm):
    """The trainer's probe step under CPU bf16 autocast gives the fp32 values (same weights, same batch).
    Before probes ran in fp32, β at lr 1e-4 came out ~5x (BN) and ~12x (no norm) too large."""
    import copy

    from test_fast_path import make_model, make_trainer

    from normbench.trainer import LoopState

    data = _fake_data()
    base = make_model("vgg_a", norm)
    rows = {}
    for amp in (None, torch.bfloat16):
        trainer, sink = make_trainer(copy.deepcopy(base), data, amp=amp, batch=32, lr=1e-4)
        trainer.probes = [LandscapeProbe(interval=1, num_steps=4)]
        trainer.train_steps(1, LoopState(), 1)  # one step: the probe sees the initial weights
        (rows[amp],) = sink.probes
    for key in ("probe/beta", "probe/grad_pred", "probe/grad_pred_min", "probe/loss_min", "probe/grad_norm"):
        assert rows[torch.bfloat16][key] == pytest.approx(rows[None][key], rel=1e-3), key


def test_gradient_reading_probes_see_fp32_gradients_under_bf16():
    """probe_batch (the trainer's probe step, callable from scripts): the gradients the similarity and
    variance probes read are the fp32 ones whatever the autocast dtype of the training backward (same
    dropout mask as the training step's)."""
    torch.manual_seed(0)
    base = TinyCNN()
    # with dropout on: the fp32 recomputation uses the training forward's RNG state, so its mask
    gen = torch.Generator().manual_seed(3)
    batches = [(torch.randn(16, 3, 8, 8, generator=gen), torch.randint(0, 10, (16,), generator=gen))
               for _ in range(2)]

    def criterion(logits, y, model):
        return F.cross_entropy(logits, y)

    rows = {}
    for amp in (None, torch.bfloat16):
        torch.manual_seed(5)  # the same dropout masks in both runs
        model = copy_module(base)
        probes = [GradSimilarityProbe(interval=2), GradVarianceProbe(interval=2, window=2)]
        out = [probe_batch(probes, step, model, criterion, x, y, 0.1, amp)
               for step, (x, y) in zip((1, 2), batches)]
        assert out[0] is None
        rows[amp] = out[1]
    assert set(rows[None]) == {"probe/grad_cos", "probe/grad_l2", "probe/grad_var", "probe/grad_var_rel"}
    for key, value in rows[None].items():
        assert rows[torch.bfloat16][key] == pytest.approx(value, rel=1e-5), key


def copy_module(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)


def test_bf16_training_with_probes_is_bit_identical_to_without():
    """The fp32 recomputation under autocast leaves weights, BN statistics and RNG as they were."""
    import copy

    from test_fast_path import make_model, make_trainer

    from normbench.trainer import LoopState

    data = _fake_data()
    base = make_model("vgg_a", "bn")
    states = []
    for probes in ([], [LandscapeProbe(interval=2, num_steps=2), GradSimilarityProbe(interval=2),
                        GradVarianceProbe(interval=2, window=2)]):
        torch.manual_seed(7)
        trainer, sink = make_trainer(copy.deepcopy(base), data, amp=torch.bfloat16, batch=8, lr=1e-2)
        trainer.probes = probes
        trainer.train_steps(1, LoopState(), 2)  # step 2 is a probe step of all three
        states.append((trainer.model.state_dict(), torch.rand(2)))
        assert bool(sink.probes) == bool(probes)
    (ref, ref_next), (got, got_next) = states
    assert all(torch.equal(ref[k], got[k]) for k in ref)
    assert torch.equal(ref_next, got_next)
