"""Correctness of the fast path (not its speed): memory formats, fp32 norms under autocast, the loop's
bookkeeping at its logging points, the first-step time read from the run record, fused-optimizer selection
and compile reuse.
The CUDA-only checks (no host sync in the step loop, bf16 norms on the GPU) skip without a GPU."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from normbench.activations import activation_factory
from normbench.data import BatchStream, load_data
from normbench.device import NORM_TYPES, compile_model, keep_norms_fp32, resolve_channels_last
from normbench.losses import build_criterion
from normbench.models import build_model
from normbench.norms import NormSpec
from normbench.optim import build_optimizer, build_scheduler, fast_optimizer_kwargs
from normbench.trainer import LoopSettings, LoopState, Trainer

torch.set_num_threads(1)

NORMS = ("none", "bn", "ln", "gn", "lrn")
SGD = {"_target_": "torch.optim.SGD", "_partial_": True, "lr": 0.02, "momentum": 0.9}
CONSTANT = {"name": "constant", "fn": {"_target_": "torch.optim.lr_scheduler.ConstantLR", "_partial_": True,
                                       "factor": 1.0, "total_iters": 0}}
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class ListSink:
    def __init__(self):
        self.steps, self.epochs, self.probes, self.step_calls = [], [], [], 0

    def log_steps(self, rows):
        self.step_calls += 1
        self.steps.extend(dict(r) for r in rows)

    def log_epoch(self, row):
        self.epochs.append(row)

    def log_probe(self, row):
        self.probes.append(row)

    def log_images(self, images):
        pass

    def log_summary(self, summary):
        pass


@pytest.fixture(scope="module")
def data():
    cfg = OmegaConf.create({"_target_": "normbench.datasets.synthetic", "val_size": 32, "split_seed": 0,
                            "num_train": 160, "num_test": 32, "image_size": 32, "num_classes": 10,
                            "channels": 3,
                            "mean": None, "std": None, "generator_seed": 0, "noise": 0.25})
    return load_data(cfg, torch.device("cpu"))


def make_model(name="vgg_a", norm="bn", width=0.125, seed=0):
    torch.manual_seed(seed)
    cfg = OmegaConf.create({"_target_": f"normbench.models.{name}", "width": width, "dropout": 0.0,
                            "input_size": 32})
    return build_model(cfg, num_classes=10, in_channels=3, image_size=32,
                       norm=NormSpec(name=norm, groups=4).make,
                       activation=activation_factory("relu"))


def make_trainer(model, data, *, channels_last=False, batch=8, log_every=25, amp=None, seed=0, criterion=None,
                 device=None, lr=None):
    device = device or torch.device("cpu")
    generator = torch.Generator().manual_seed(seed)
    stream = BatchStream(data.train, batch, data.mean, data.std, channels_last=channels_last,
                         generator=generator)
    optimizer = build_optimizer(OmegaConf.create({**SGD, "lr": lr or SGD["lr"]}), model)
    scheduler = build_scheduler(OmegaConf.create(CONSTANT), optimizer, len(stream), len(stream))
    settings = LoopSettings(epochs=1, eval_batch_size=16, log_every_steps=log_every, amp_dtype=amp,
                            channels_last=channels_last, progress=False)
    sink = ListSink()
    trainer = Trainer(model, criterion or build_criterion(OmegaConf.create({"name": "ce"})), optimizer,
                      scheduler,
                      data, stream, settings, sink, device=device)
    return trainer, sink


# ------------------------------------------------------------------------------------------ memory format


@pytest.mark.parametrize("model_name,norm", [("vgg_a", n) for n in NORMS] + [("alexnet_cifar", "bn"),
                                                                               ("alexnet_cifar", "ln")])
def test_channels_last_and_contiguous_give_the_same_loss(data, model_name, norm):
    """Same init, same batches. At the same weights the loss agrees to float rounding and the gradient to
    1e-3 (max-pooling may route the gradient of tied maxima, e.g. in zero-padded crops, to a different
    position in each layout: both are valid subgradients, and at a large learning rate the trajectories
    drift apart within steps); the losses of three small SGD steps and the evaluation after them agree to
    2%."""
    base = make_model(model_name, norm)
    losses, grads = {}, {}
    for channels_last in (False, True):
        model = copy.deepcopy(base)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        trainer, sink = make_trainer(model, data, channels_last=channels_last, lr=1e-3)
        x, y = next(iter(trainer.stream))
        assert x.is_contiguous(memory_format=torch.channels_last) == channels_last
        loss = trainer.criterion(model(x), y)
        loss.backward()
        grads[channels_last] = torch.cat([p.grad.flatten() for p in model.parameters()])
        model.zero_grad(set_to_none=True)
        with torch.no_grad():  # undo the BatchNorm running-statistics update of that extra forward
            for mine, ref in zip(model.buffers(), base.buffers()):
                mine.copy_(ref)
        totals = trainer.train_steps(1, LoopState(), 3)
        assert totals.finite and totals.steps == 3
        eval_loss, _ = trainer.evaluate(data.val)
        losses[channels_last] = torch.tensor([loss.item()] + [r["train/loss"] for r in sink.steps]
                                             + [eval_loss])
    torch.testing.assert_close(losses[True][0], losses[False][0], rtol=1e-5, atol=1e-6)
    a, b = grads[True], grads[False]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.999
    assert (a - b).norm() <= 1e-3 * b.norm()
    torch.testing.assert_close(losses[True], losses[False], rtol=2e-2, atol=1e-3)


def test_channels_last_auto_policy():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert not resolve_channels_last("auto", cpu, "bn")
    assert resolve_channels_last("auto", gpu, "bn") and resolve_channels_last("auto", gpu, "none")
    assert not any(resolve_channels_last("auto", gpu, n) for n in ("gn", "ln", "lrn"))
    assert resolve_channels_last(True, cpu, "gn") and not resolve_channels_last(False, gpu, "bn")


# ------------------------------------------------------------------------------------------ fp32 norms


NORM_LAYERS = [nn.BatchNorm2d(8), nn.GroupNorm(2, 8), nn.GroupNorm(1, 8), nn.LayerNorm([8, 6, 6]),
               nn.LocalResponseNorm(5)]


@pytest.mark.parametrize("layer", NORM_LAYERS, ids=lambda m: type(m).__name__)
def test_norms_compute_in_fp32_under_bf16_autocast(layer):
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3, padding=1)
    x = torch.randn(4, 3, 6, 6)
    hooked = copy.deepcopy(layer)
    assert keep_norms_fp32(hooked) == 1 and keep_norms_fp32(hooked) == 0  # idempotent
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        out = hooked(h)
    assert out.dtype == torch.float32
    reference = copy.deepcopy(layer)(h.float())  # fp32 math on the same (bf16-rounded) input, no autocast
    torch.testing.assert_close(out, reference)
    if isinstance(layer, nn.BatchNorm2d):  # running statistics were updated in fp32 by both
        assert hooked.running_mean.dtype == torch.float32


def test_trainer_hooks_norms_only_with_autocast(data):
    model = make_model(norm="bn")
    make_trainer(model, data)
    assert not any(getattr(m, "_normbench_fp32", False) for m in model.modules())
    make_trainer(model, data, amp=torch.bfloat16)
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    assert norms and all(m._normbench_fp32 for m in norms)


def test_bf16_training_on_cpu_tracks_fp32(data):
    """The autocast path of the loop runs and stays close to fp32 over a few steps."""
    base = make_model(norm="gn")
    results = {}
    for amp in (None, torch.bfloat16):
        trainer, sink = make_trainer(copy.deepcopy(base), data, amp=amp)
        trainer.train_steps(1, LoopState(), 3)
        results[amp] = torch.tensor([row["train/loss"] for row in sink.steps])
    torch.testing.assert_close(results[torch.bfloat16], results[None], rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------ the loop


def test_losses_and_accuracy_are_read_at_logging_points(data):
    trainer, sink = make_trainer(make_model(), data, log_every=4)
    state = LoopState()
    totals = trainer.train_steps(1, state, 10)
    assert sink.step_calls == 3                       # after steps 4, 8 and the last partial interval
    assert [row["step"] for row in sink.steps] == list(range(1, 11)) and state.step == 10
    assert totals.seen == 80 and totals.steps == 10
    mean = sum(row["train/loss"] for row in sink.steps) / 10
    assert totals.loss == pytest.approx(mean, rel=1e-6)
    assert 0 <= totals.correct <= 80 and totals.acc == totals.correct / 80


def test_accuracy_counts_hits(data):
    """An oracle model (logits = one-hot labels) gets every sample right, through the loop's bookkeeping."""

    class Oracle(nn.Module):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(10))
            self.labels = None

        def forward(self, x):
            return nn.functional.one_hot(self.labels, 10).float() * 10 + self.bias

    oracle = Oracle()
    trainer, _ = make_trainer(oracle, data, log_every=3)
    stream = trainer.stream

    class Tap:
        def __len__(self):
            return len(stream)

        def __iter__(self):
            for x, y in stream:
                oracle.labels = y
                yield x, y

    trainer.stream = Tap()
    totals = trainer.train_steps(1, LoopState(), 5)
    assert totals.correct == totals.seen == 40


def test_non_finite_loss_stops_at_the_logging_point(data):
    ce = build_criterion(OmegaConf.create({"name": "ce"}))
    calls = {"n": 0}

    def criterion(logits, y, model=None):
        calls["n"] += 1
        loss = ce(logits, y)
        return loss * float("nan") if calls["n"] >= 3 else loss

    trainer, sink = make_trainer(make_model(), data, log_every=2, criterion=criterion)
    totals = trainer.train_steps(1, LoopState(), 10)
    assert not totals.finite and totals.steps == 4 and len(sink.steps) == 4  # stopped at the flush after 4
    state = trainer.run(LoopState())
    assert state.status == "diverged" and state.diverged_epoch == 1 and not sink.epochs


def test_epoch_row_and_evaluation(data):
    trainer, sink = make_trainer(make_model(), data)
    state = trainer.run(LoopState())
    assert state.status == "completed" and len(sink.epochs) == 1
    row = sink.epochs[0]
    assert row["step"] == len(trainer.stream) == 16 and 0 <= row["val/acc"] <= 1
    assert row["throughput/img_s"] > 0 and row["time/epoch_s"] >= 0


def test_first_step_marker(data, tmp_path):
    """bench/perf.py's start-up figure comes from the run record, not from a hook in the loop: with one
    step per epoch and a logging point after every step (the TINY settings), steps.jsonl is written
    exactly once, right after the first step, and its modification time is that moment."""
    import time

    from normbench.perf.startup import TINY, first_step_time
    from normbench.record import STEPS, RecordSink

    assert {"trainer.max_steps_per_epoch=1", "trainer.log_every_steps=1"} <= set(TINY)
    started = time.time()
    trainer, _ = make_trainer(make_model(), data, log_every=1)
    trainer.settings.max_steps_per_epoch = 1

    writes: list[str] = []

    class CountingSink(RecordSink):
        def _write(self, name, rows):
            writes.append(name)
            super()._write(name, rows)

    trainer.sink = CountingSink(tmp_path)
    state = trainer.run(LoopState())
    finished = time.time()
    assert state.status == "completed" and state.step == 1
    assert writes.count(STEPS) == 1                                # recorded exactly once per run
    stamp = first_step_time(tmp_path)
    assert started - 0.05 <= stamp <= finished + 0.05              # after process/run start, before it ended
    assert stamp <= (tmp_path / "metrics.jsonl").stat().st_mtime   # before the epoch's evaluation row
    (tmp_path / STEPS).write_text('{"step": 1}\n{"step": 2}\n')
    with pytest.raises(RuntimeError, match="exactly"):
        first_step_time(tmp_path)                                  # a second write is refused, not misread


# ------------------------------------------------------------------------------------------ optimizers


class FakeCudaParam:
    is_cuda = True

    @staticmethod
    def is_floating_point():
        return True


def test_fused_optimizers_on_cuda_only():
    cpu_params = [torch.zeros(2, requires_grad=True)]
    gpu_params = [FakeCudaParam()]
    assert fast_optimizer_kwargs(torch.optim.SGD, cpu_params) == {}
    for cls in (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW):
        assert fast_optimizer_kwargs(cls, gpu_params) == {"fused": True}
    assert fast_optimizer_kwargs(torch.optim.RMSprop, gpu_params) == {"foreach": True}
    # fused Adagrad: CPU only
    assert fast_optimizer_kwargs(torch.optim.Adagrad, gpu_params) == {"foreach": True}
    assert fast_optimizer_kwargs(torch.optim.SGD, gpu_params, given={"foreach"}) == {}
    assert fast_optimizer_kwargs(torch.optim.Adam, gpu_params, given={"fused"}) == {}


def test_build_optimizer_keeps_config_and_cpu_defaults():
    model = make_model()
    opt = build_optimizer(OmegaConf.create({**SGD, "foreach": False}), model)
    group = opt.param_groups[0]
    assert group["lr"] == 0.02 and group["momentum"] == 0.9 and group["foreach"] is False
    assert not group.get("fused")
    assert len(group["params"]) == len(list(model.parameters()))


@cuda
def test_build_optimizer_fuses_on_cuda():
    model = make_model().cuda()
    opt = build_optimizer(OmegaConf.create(SGD), model)
    assert opt.param_groups[0]["fused"] is True


# ------------------------------------------------------------------------------------------ compile


@pytest.mark.slow
def test_compiled_code_is_reused_by_a_new_model_of_the_same_shape():
    """Dynamo guards on structure, not identity: a second instance (a second run in the same process) does
    not trace again. backend=eager checks dynamo's cache without paying for inductor here."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 3, 32, 32)
    for seed in (0, 1):
        compiled = compile_model(make_model("alexnet_cifar", seed=seed), backend="eager")
        compiled(x).sum().backward()
        assert counters["stats"]["unique_graphs"] == 1
    compile_model(make_model("alexnet_cifar", norm="none"), backend="eager")(x).sum().backward()
    assert counters["stats"]["unique_graphs"] == 2   # another structure: compiled once more
    torch._dynamo.reset()


# ------------------------------------------------------------------------------------------ CUDA only


@cuda
def test_no_host_sync_inside_the_step_loop(data, monkeypatch):
    """With CUDA sync debugging set to error, only the logging points (_flush) may synchronise."""
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    gpu_data = copy.copy(data)
    gpu_data.train, gpu_data.val = data.train.to(device), data.val.to(device)
    model = make_model().to(device, memory_format=torch.channels_last)
    trainer, _ = make_trainer(model, gpu_data, channels_last=True, amp=torch.bfloat16, log_every=5,
                                 device=device)
    trainer.stream.generator = torch.Generator(device=device).manual_seed(0)
    trainer.train_steps(1, LoopState(), 6)   # warm-up: cuDNN autotuning, allocator
    flush = trainer._flush

    def flush_allowed(*args, **kwargs):
        torch.cuda.set_sync_debug_mode(0)
        try:
            return flush(*args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode(2)

    monkeypatch.setattr(trainer, "_flush", flush_allowed)
    torch.cuda.set_sync_debug_mode(2)
    try:
        totals = trainer.train_steps(1, LoopState(), 12)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert totals.steps == 12 and totals.finite


@cuda
@pytest.mark.parametrize("layer", NORM_LAYERS, ids=lambda m: type(m).__name__)
def test_norms_compute_in_fp32_under_cuda_bf16_autocast(layer):
    layer = copy.deepcopy(layer).cuda()
    keep_norms_fp32(layer)
    conv = nn.Conv2d(3, 8, 3, padding=1).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        h = conv(torch.randn(4, 3, 6, 6, device="cuda"))
        out = layer(h)
    assert h.dtype == torch.bfloat16 and out.dtype == torch.float32
