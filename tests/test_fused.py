"""Fused training (normbench.fused, normbench.fused_trainer): K runs trained as one fused model give each
run the numbers of its own unfused run -- every run built by the real `build_parts` from a composed config
on Fashion-MNIST, with its own seed, optimizer, learning rate and loss -- and a diverging run stops alone."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from normbench.fused import FusedModel, unfusable_reason
from normbench.fused_trainer import FusedTrainer
from normbench.identity import register_resolvers
from normbench.record import Status
from normbench.run import build_parts
from normbench.trainer import LoopState
from normbench.validate import validate

# every test here trains fused and unfused models: out of the inner loop (pytest -m 'not slow')
pytestmark = pytest.mark.slow

CONF = Path(__file__).resolve().parents[1] / "conf"
FASHION = Path("/usr/share/datasets/fashion-mnist")
needs_fashion_mnist = pytest.mark.skipif(
    not FASHION.is_dir(),
    reason=f"Fashion-MNIST is not installed in {FASHION} (apt-get install dataset-fashion-mnist)",
)
BASE = [
    "data=fashion_mnist",
    f"data.root={FASHION}",
    "data.train_size=256",
    "data.val_size=64",
    "model=vgg_a",
    "model.width=0.125",
    "batch_size=8",
    "trainer.device=cpu",
    "trainer.precision=fp32",
    "trainer.channels_last=false",
    "trainer.log_every_steps=2",
    "trainer.eval_batch_size=64",
    "trainer.max_eval_batches=1",
    "trainer.max_steps_per_epoch=5",
    "logger=none",
    "trainer.checkpoint=false",
]
# Four runs of one group: what may differ between fused runs (seed, optimizer, lr, momentum, loss)
MEMBERS = [
    ["seed=0", "optimizer=sgd_momentum", "optimizer.lr=0.02"],
    ["seed=1", "optimizer=sgd_momentum", "optimizer.lr=0.05", "loss=ce_l2", "loss.l2=1e-3"],
    ["seed=2", "optimizer=adam", "optimizer.lr=0.001", "+optimizer.eps=1e-6"],
    ["seed=3", "optimizer=adam", "optimizer.lr=0.003", "+optimizer.eps=1e-6", "scheduler=cosine"],
]
# Adam's eps: a convolution's bias before a BatchNorm has a gradient of exactly zero in exact arithmetic,
# so its float64 gradient is rounding noise (~1e-13) that Adam scales up by lr/eps; at the default eps
# (1e-8) fused and unfused runs' noise-driven biases differ by ~6e-10 after 5 steps, at 1e-6 by ~1e-11.


class StepLosses:
    """A sink that keeps the step losses and epoch rows."""

    def __init__(self):
        self.losses: list[float] = []
        self.epochs: list[dict] = []

    def log_steps(self, rows):
        self.losses += [row["train/loss"] for row in rows]

    def log_epoch(self, row):
        self.epochs.append(row)


class AsDouble:
    """A run's batch stream in float64."""

    def __init__(self, stream):
        self.stream = stream

    def __len__(self):
        return len(self.stream)

    def __iter__(self):
        for x, y in self.stream:
            yield x.double(), y


def make_run(overrides: list[str], dtype=torch.float32):
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*BASE, *overrides])
    parts = build_parts(cfg, validate(cfg, device="cpu"), sink=StepLosses())
    parts.trainer.settings.progress = False
    if dtype == torch.float64:
        parts.model.double()  # the optimizer's Parameter objects stay the same
        parts.trainer.stream = AsDouble(parts.trainer.stream)
    return parts


def max_difference(a: dict, b: dict) -> float:
    return max((x.double() - y.double()).abs().max().item() for x, y in zip(a.values(), b.values()))


def unfused_and_fused(norm: str, dtype, steps: int, members=MEMBERS):
    runs = [make_run([f"norm={norm}", *m], dtype) for m in members]
    for run in runs:
        run.trainer.train_steps(1, LoopState(), steps)
    fused = [make_run([f"norm={norm}", *m], dtype) for m in members]
    states = [LoopState() for _ in fused]
    trainer = FusedTrainer([run.trainer for run in fused])
    trainer.train_steps(1, states, None, steps)
    trainer.release()
    assert [s.step for s in states] == [steps] * len(members)
    return runs, fused


@needs_fashion_mnist
@pytest.mark.parametrize("norm", ["bn", "gn", "none"])
def test_fused_float64_equals_unfused_runs(norm):
    runs, fused = unfused_and_fused(norm, torch.float64, steps=5)
    for run, twin in zip(runs, fused):
        assert len(run.trainer.sink.losses) == len(twin.trainer.sink.losses) == 5
        assert max(abs(a - b) for a, b in zip(run.trainer.sink.losses, twin.trainer.sink.losses)) < 1e-10
        start = make_run([f"norm={norm}"], torch.float64).model.state_dict()
        assert max_difference(run.model.state_dict(), start) > 1e-4  # the runs did train
        assert max_difference(run.model.state_dict(), twin.model.state_dict()) < 1e-10  # weights, BN stats
    assert runs[0].trainer.sink.losses != runs[1].trainer.sink.losses


SGD_MEMBERS = {  # runs whose plain SGD steps as one over the fused tensors (FusedSGD)
    "one lr": [["seed=0"], ["seed=1"], ["seed=2", "loss=ce_l2", "loss.l2=1e-3"], ["seed=3"]],
    "own lrs": [["seed=0", "optimizer.lr=0.02"], ["seed=1", "optimizer.lr=0.05"],
                ["seed=2", "optimizer.lr=0.01", "scheduler=cosine"], ["seed=3", "optimizer.lr=0.03"]],
}


@needs_fashion_mnist
@pytest.mark.parametrize("lrs", SGD_MEMBERS)
@pytest.mark.parametrize("optimizer", [["optimizer=sgd_momentum", "optimizer.weight_decay=5e-4"],
                                       ["optimizer=sgd", "optimizer.momentum=0.0"]])
def test_fused_sgd_step_equals_each_runs_own_sgd(lrs, optimizer):
    """float64, BN: SGD with Nesterov momentum and weight decay (or plain SGD), one lr or each run its own
    (one on a cosine schedule): the fused step's losses, weights and momentum buffers equal the unfused
    runs', and after the pass each run's optimizer state has its own storage."""
    members = [[*optimizer, *m] for m in SGD_MEMBERS[lrs]]
    runs = [make_run(["norm=bn", *m], torch.float64) for m in members]
    for run in runs:
        run.trainer.train_steps(1, LoopState(), 5)
    fused = [make_run(["norm=bn", *m], torch.float64) for m in members]
    trainer = FusedTrainer([run.trainer for run in fused])
    trainer._fuse(list(range(len(fused))))
    assert trainer.fused_sgd is not None
    trainer.train_steps(1, [LoopState() for _ in fused], None, 5)
    assert trainer.fused_sgd is None  # released with the pass
    for run, twin in zip(runs, fused):
        assert max(abs(a - b) for a, b in zip(run.trainer.sink.losses, twin.trainer.sink.losses)) < 1e-10
        assert max_difference(run.model.state_dict(), twin.model.state_dict()) < 1e-10
        mine, theirs = (r.optimizer.state_dict()["state"] for r in (run, twin))
        assert mine.keys() == theirs.keys()
        for key, state in mine.items():
            if "momentum_buffer" in state:
                assert (state["momentum_buffer"] - theirs[key]["momentum_buffer"]).abs().max() < 1e-10
                assert theirs[key]["momentum_buffer"]._base is None  # its own storage
    assert runs[0].trainer.sink.losses != runs[1].trainer.sink.losses


@needs_fashion_mnist
@pytest.mark.parametrize("norm", ["bn", "gn"])
def test_fused_float32_close_to_unfused_runs(norm):
    """float32, SGD with momentum: fused and unfused convolutions and norms sum in different orders, so
    the runs part by rounding and then drift apart as two unfused runs in different memory layouts do
    (measured on this CPU: losses 4e-6 apart at step 2, 6e-5 at step 3 and 3e-2 at step 5 at lr 0.02 with
    BN; weights 2e-3 after 3 steps). Checked: the first 2 steps' losses within 1e-5, the 3rd's within
    1e-3, weights after 3 steps within 1e-2. (Adam in float32 amplifies the rounding where a gradient is
    zero in exact arithmetic -- a convolution bias before a BatchNorm -- into steps of about lr.)"""
    members = [m for m in MEMBERS if "optimizer=sgd_momentum" in m]
    runs, fused = unfused_and_fused(norm, torch.float32, steps=3, members=members)
    for run, twin in zip(runs, fused):
        apart = [abs(a - b) for a, b in zip(run.trainer.sink.losses, twin.trainer.sink.losses)]
        assert len(apart) == 3 and max(apart[:2]) < 1e-5 and apart[2] < 1e-3
        assert max_difference(run.model.state_dict(), twin.model.state_dict()) < 1e-2


@needs_fashion_mnist
def test_a_diverging_run_stops_alone():
    members = [
        ["seed=0", "optimizer=sgd", "optimizer.lr=0.01"],
        ["seed=1", "optimizer=sgd", "optimizer.lr=1e6"],
        ["seed=2", "optimizer=sgd", "optimizer.lr=0.02"],
    ]
    epochs = ["trainer.epochs=2", "norm=none"]
    runs = [make_run([*epochs, *m]) for m in members]
    fused = [make_run([*epochs, *m]) for m in members]
    alone = [run.trainer.run(LoopState()) for run in runs]
    together = FusedTrainer([run.trainer for run in fused]).run([None] * 3)
    assert [s.status for s in alone] == [Status.COMPLETED, Status.DIVERGED, Status.COMPLETED]
    assert [s.status for s in together] == [s.status for s in alone]
    assert together[1].diverged_epoch == alone[1].diverged_epoch == 1
    assert together[1].step == alone[1].step < 5  # it stopped at the logging point that saw it
    assert [s.step for s in together] == [s.step for s in alone] and together[0].step == 10
    for i in (0, 2):  # the others went on as if alone (float32: within rounding)
        assert (
            max(abs(a - b) for a, b in zip(runs[i].trainer.sink.losses, fused[i].trainer.sink.losses)) < 1e-5
        )
        assert max_difference(runs[i].model.state_dict(), fused[i].model.state_dict()) < 1e-4
        assert [r["epoch"] for r in fused[i].trainer.sink.epochs] == [1, 2]
        assert (
            abs(fused[i].trainer.sink.epochs[-1]["val/loss"] - runs[i].trainer.sink.epochs[-1]["val/loss"])
            < 1e-4
        )
    assert not any(math.isfinite(v) for v in fused[1].trainer.sink.losses[-1:])


@needs_fashion_mnist
def test_an_early_stopped_run_stops_alone():
    """Early stopping ends its own run of a fused group; the other trains on to its last epoch, as each does
    alone. Measured unfused: validation accuracy 0.078, 0.062, 0.031 (no improvement for 2 epochs: stops after
    epoch 3) for the run that barely moves, 0.234, 0.156, 0.312, 0.406 for the other. (Their float32 weights
    drift apart from the unfused runs' over 80 steps: test_fused_float32_close_to_unfused_runs.)"""
    members = [["seed=0", "optimizer=sgd", "optimizer.lr=1e-12"],
               ["seed=1", "optimizer=sgd_momentum", "optimizer.lr=0.02"]]
    shared = ["norm=bn", "trainer.epochs=4", "trainer.max_steps_per_epoch=20",
              "trainer.early_stopping.patience=2"]
    runs = [make_run([*shared, *m]) for m in members]
    fused = [make_run([*shared, *m]) for m in members]
    alone = [run.trainer.run(LoopState()) for run in runs]
    together = FusedTrainer([run.trainer for run in fused]).run([None] * 2)
    ends = [(s.status, s.stop_reason, s.epochs_done) for s in alone]
    assert ends == [(Status.COMPLETED, "early_stopping", 3), (Status.COMPLETED, None, 4)]
    assert [(s.status, s.stop_reason, s.epochs_done) for s in together] == ends
    assert [r["epoch"] for r in fused[1].trainer.sink.epochs] == [1, 2, 3, 4]


@needs_fashion_mnist
def test_fused_model_keeps_the_unfused_layout():
    """The models' parameters and buffers are views of the fused ones while fused (their state_dicts
    read and load the fused values) and their own storage after unfuse."""
    runs = [make_run([f"seed={i}", "norm=bn"]) for i in range(3)]
    models = [run.model for run in runs]
    names = [list(m.state_dict()) for m in models]
    fused = FusedModel(models)
    assert [list(m.state_dict()) for m in models] == names
    conv = fused.features[0]
    assert conv.groups == 3 and conv.weight.shape[0] == 3 * models[0].features[0].weight.shape[0]
    first_conv = models[1].features[0].weight
    assert first_conv.data_ptr() == conv.weight[first_conv.shape[0] :].data_ptr()
    with torch.no_grad():
        models[1].load_state_dict(
            {
                k: torch.full_like(v, 0.5) if v.is_floating_point() else v
                for k, v in models[1].state_dict().items()
            }
        )
    assert (conv.weight[first_conv.shape[0] : 2 * first_conv.shape[0]] == 0.5).all()
    assert (conv.weight[: first_conv.shape[0]] != 0.5).any()
    fused.unfuse()
    with torch.no_grad():
        conv.weight.fill_(0.0)
    assert (first_conv == 0.5).all() and first_conv.grad is None


@needs_fashion_mnist
def test_what_cannot_fuse_says_why():
    lrn = make_run(["norm=lrn", "model=alexnet_cifar"])
    assert "LocalResponseNorm" in unfusable_reason(lrn.model)
    assert "not a built-in" in unfusable_reason(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="cannot fuse: norm layer LocalResponseNorm"):
        FusedModel([lrn.model, lrn.model])


def test_perf_section_fused_measures_every_k(tmp_path):
    """bench/perf.py's section at tiny sizes: fused and sequential rates per K, concurrent processes, and
    the target read from the K=8 row."""
    from normbench.perf.common import PerfPaths, PerfSettings
    from normbench.perf.fused import bench_fused
    from normbench.perf.targets import evaluate_targets

    s = PerfSettings(
        threads=1,
        fused_widths=(0.125,),
        fused_ks=(1, 2),
        fused_concurrent_ks=(2,),
        fused_steps=2,
        fused_rounds=1,
    )
    result = bench_fused(s, PerfPaths(conf_dir=CONF), torch.device("cpu"), tmp_path)
    assert [(r["k"], r["width"], r["batch"]) for r in result["rows"]] == [(1, 0.125, 8), (2, 0.125, 8)]
    assert all(
        r["fused_steps_s"] > 0 and r["sequential_steps_s"] > 0 and r["speedup"] > 0 for r in result["rows"]
    )
    assert result["rows"][1]["concurrent_steps_s"] > 0 and result["rows"][0]["concurrent_steps_s"] is None
    row = {**result["rows"][1], "k": 8, "speedup": 1.4}
    [verdict] = [t for t in evaluate_targets({"fused": {"rows": [row]}}) if t["name"].startswith("fused")]
    assert verdict["result"] == "FAIL" and verdict["target"] == ">= 1.5"


def test_gpu_check_fused_is_selectable_and_skips_without_cuda(tmp_path):
    import json
    import subprocess
    import sys

    from normbench.perf.gpu import verdicts

    script = CONF.parent / "bench" / "gpu_check.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--cpu-dry-run", "--checks", "fused", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((tmp_path / "gpu_check.json").read_text())
    assert "needs CUDA" in results["fused"]["skipped"]
    assert results["verdicts"]["fused K=8 vs the best concurrent processes (b8)"] == "skipped"
    rows = [{"k": 8, "fused_steps_s": 300.0}]
    assert (
        verdicts({"fused": {"rows": rows, "concurrent_steps_s": {"1.0": {1: 100.0, 4: 200.0}}}})[
            "fused K=8 vs the best concurrent processes (b8)"
        ]
        == "fused faster (1.50x)"
    )


@needs_fashion_mnist
def test_runs_with_other_dropouts_fuse():
    """Dropout 0, 0.3 and 0.5 (the first has no dropout layer at all) fuse: in eval mode the fused logits
    are each model's own; in training the run without dropout is computed exactly as alone, and about
    half of the p=0.5 run's hidden units are dropped."""
    runs = [
        make_run([f"seed={i}", "norm=gn", f"model.dropout={p}"], torch.float64)
        for i, p in enumerate((0.0, 0.3, 0.5))
    ]
    models = [run.model for run in runs]
    x, _ = next(iter(runs[0].trainer.stream))
    fused = FusedModel(models)
    batches = [x, x.flip(0), x.flip(3)]
    for model in (fused, *models):
        model.eval()
    logits = fused(fused.stack_inputs(batches))
    for model, batch, own in zip(models, batches, logits):
        assert (model(batch) - own).abs().max() < 1e-10
    fused.train()
    assert type(fused.classifier[0]).__name__ == "FusedDropout"
    models[0].train()
    assert (fused(fused.stack_inputs(batches))[0] - models[0](batches[0])).abs().max() < 1e-10
    kept = fused.classifier[0](torch.ones(3, 1000, 64, dtype=torch.float64))
    assert (kept[0] == 1).all()
    assert 0.25 < (kept[1] == 0).double().mean() < 0.35 and 0.45 < (kept[2] == 0).double().mean() < 0.55
    assert kept[2].sum().item() == pytest.approx(kept[2].numel(), rel=0.05)  # scaled by 1 / (1 - p)
