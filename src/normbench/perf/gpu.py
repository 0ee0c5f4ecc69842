"""GPU readiness (``bench/gpu_check.py``, docs/PERFORMANCE.md): everything the CPU tests cannot show, in one
run that fits the few minutes a GPU is lent for. Each check is a function of ``(settings, paths, device,
workdir)`` that returns a dict; ``run_checks`` runs them under one deadline and skips (with the reason) what
no longer fits, so a slow machine still writes every result it got. ``GpuCheckSettings.tiny`` is how the
script is tested on a CPU before a GPU is ever lent."""

from __future__ import annotations

import math
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, child_env, train_window
from normbench.perf.cuda import _concurrency, epoch_row
from normbench.perf.layout import NORMS, layout_rows

MODELS = {"vgg_a": 32, "alexnet": 224}   # model -> its input size


@dataclass(frozen=True)
class GpuCheckSettings:
    budget_s: float = 450.0          # the whole script; checks that would start after it are skipped
    epoch_images: int = 50_000       # 45k train + 5k val, as CIFAR-10's split
    width: float = 1.0
    batch: int = 128
    layout_steps: int = 30           # steps per timed window of the channels_last comparison
    layout_rounds: int = 3
    compile_steps: int = 20
    compile_backend: str = "inductor"
    concurrency_steps: int = 1500
    probe_lr: float = 1e-4
    probe_rtol: float = 0.05         # |β_bf16 / β_fp32 - 1|
    run_tests: bool = True
    norms: tuple[str, ...] = NORMS
    concurrency_levels: tuple[int, ...] = (1, 2, 4)

    @classmethod
    def tiny(cls) -> GpuCheckSettings:
        """Sizes for a CPU dry run of the script (every code path, minutes -> seconds)."""
        return cls(budget_s=600.0, epoch_images=320, width=0.125, batch=32, layout_steps=2, layout_rounds=1,
                   compile_steps=2, compile_backend="eager", concurrency_steps=20, run_tests=False,
                   norms=("bn", "gn"), concurrency_levels=(1, 2))


def _perf_settings(g: GpuCheckSettings, precision: str) -> PerfSettings:
    return PerfSettings(precision=precision, width=g.width, cuda_epoch_images=g.epoch_images,
                        cuda_concurrency_steps=g.concurrency_steps, layout_batch=g.batch,
                        layout_steps=g.layout_steps, layout_rounds=2 * g.layout_rounds)


def check_cuda_tests(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """The tests marked ``cuda`` (every test that skips without a GPU), run by pytest on this machine."""
    if not g.run_tests:
        return {"skipped": "not selected"}
    root = Path(paths.conf_dir).parent
    xml = work / "cuda-tests.xml"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider",
                           f"--junitxml={xml}", "tests"], check=False, cwd=root, env=child_env(),
                          capture_output=True, text=True, timeout=max(60, g.budget_s))
    counts, failed = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0), []
    if xml.exists():
        report = ET.parse(xml).getroot()
        for suite in report.iter("testsuite"):
            counts = {key: n + int(suite.get(key, 0)) for key, n in counts.items()}
        failed = [f"{case.get('classname')}::{case.get('name')}" for case in report.iter("testcase")
                  if case.find("failure") is not None or case.find("error") is not None]
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "returncode": proc.returncode, "tail": proc.stdout[-1500:]}


def check_epochs(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """One CIFAR-sized epoch (+ validation) per model in bf16 and fp32, norm=bn, channels_last auto."""
    return {"rows": [epoch_row(_perf_settings(g, p), paths, device, m, g.batch, warmup_steps=3)
                     for m in MODELS for p in ("bf16", "fp32")]}


def check_layouts(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """channels_last against NCHW images/s (bf16, batch `g.batch`) per model and norm, and what auto picks."""
    rows = layout_rows(_perf_settings(g, "bf16"), paths, device, MODELS, g.norms)
    return {"rows": rows, "auto_wrong": [f"{r['model']}/{r['norm']}" for r in rows if not r["auto_ok"]]}


def check_compile(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """torch.compile: the first run of vgg_a compiles, a second run (new model, same shapes) in the same
    process reuses the compiled code (dynamo's unique-graph count does not grow)."""
    from torch._dynamo.utils import counters

    from normbench.device import compile_model

    out = []
    for i in range(2):
        # trainer.compile=true does what this does with the default (inductor) backend
        run = parts.run_parts(_perf_settings(g, "bf16"), paths.conf_dir, device,
                              [*parts.model_overrides("vgg_a", g.width), f"batch_size={g.batch}"],
                              num_train=g.batch * (g.compile_steps + 1))
        run.trainer.model = compile_model(run.model, backend=g.compile_backend)
        graphs_before = counters["stats"]["unique_graphs"]
        first = train_window(run.trainer, 1, device)().wall_s
        rate = train_window(run.trainer, g.compile_steps, device)().rate
        out.append({"run": i + 1, "first_step_s": first, "train_img_s": rate,
                    "new_graphs": counters["stats"]["unique_graphs"] - graphs_before})
    return {"backend": g.compile_backend, "runs": out, "reused": out[1]["new_graphs"] == 0}


def check_concurrency(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """runs/hour at batch 8 with 1, 2 and 4 concurrent bench/train.py jobs on this device."""
    if paths.train_script is None:
        return {"skipped": "no training script given"}
    return _concurrency(_perf_settings(g, "auto"), Path(paths.train_script), device, work,
                        g.concurrency_levels)


def check_probes(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """The landscape probe (β, gradient predictiveness, loss range) at lr `g.probe_lr` as the trainer runs
    it after a bf16 autocast step against after an fp32 step, same model, weights and batch: probes must
    measure in fp32 whatever the training precision."""
    from normbench.probes import LandscapeProbe, probe_batch

    run = parts.run_parts(_perf_settings(g, "fp32"), paths.conf_dir, device,
                          [*parts.model_overrides("vgg_a", g.width), f"batch_size={g.batch}"],
                          num_train=g.batch * 4)
    x, y = next(iter(run.stream))
    values = {precision: probe_batch([LandscapeProbe(interval=1)], 1, run.model, run.trainer.criterion, x, y,
                                     g.probe_lr, dtype)
              for precision, dtype in (("fp32", None), ("bf16", torch.bfloat16))}
    rel = {k: abs(values["bf16"][k] / values["fp32"][k] - 1) for k in values["fp32"]
           if values["fp32"][k] and math.isfinite(values["fp32"][k])}
    return {"lr": g.probe_lr, "fp32": values["fp32"], "bf16": values["bf16"], "relative_difference": rel,
            "within_tolerance": all(v <= g.probe_rtol for k, v in rel.items() if "beta" in k
                                    or "grad_pred" in k)}


def check_fused(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path) -> dict:
    """bench/perf.py's section ``fused`` at ``fused.gpu_settings``' sizes. CUDA only."""
    if device.type != "cuda":
        return {"skipped": "needs CUDA (on the CPU: bench/perf.py --sections fused)"}
    from normbench.perf.fused import bench_fused, gpu_settings

    return bench_fused(gpu_settings(), paths, device, work)


CHECKS: dict[str, Callable[..., dict]] = {
    "cuda_tests": check_cuda_tests, "epochs": check_epochs, "layouts": check_layouts,
    "compile": check_compile, "concurrency": check_concurrency, "probes": check_probes, "fused": check_fused,
}
# Rough share of the budget each check needs on an H100-class GPU, to decide whether it still fits.
EXPECTED_S = {"cuda_tests": 90, "epochs": 60, "layouts": 60, "compile": 90, "concurrency": 60, "probes": 10,
              "fused": 90}


def run_checks(g: GpuCheckSettings, paths: PerfPaths, device: torch.device, work: Path, names=tuple(CHECKS),
               log=print) -> dict:
    started = time.perf_counter()
    results: dict = {}
    for name in names:
        left = g.budget_s - (time.perf_counter() - started)
        if device.type == "cuda" and left < EXPECTED_S[name]:
            results[name] = {"skipped": f"out of time ({left:.0f} s left of {g.budget_s:.0f}, "
                                        f"needs ~{EXPECTED_S[name]})"}
            continue
        log(f"gpu_check: {name} ...")
        t = time.perf_counter()
        try:
            torch.manual_seed(0)
            results[name] = CHECKS[name](g, paths, device, work)
        except Exception as exc:  # noqa: BLE001 - one failing check must not cost the others' results
            results[name] = {"error": f"{type(exc).__name__}: {exc}"[:2000]}
        results[name]["check_s"] = time.perf_counter() - t
        log(f"gpu_check: {name} done in {results[name]['check_s']:.1f} s")
    results["total_s"] = time.perf_counter() - started
    return results


def _fused_verdict(fused: dict) -> str:
    """Which is faster at batch 8, full width: K = 8 fused or the best of the concurrent processes."""
    rows = {row["k"]: row for row in fused["rows"]}
    best = max((rate for by_k in fused["concurrent_steps_s"].values() for rate in by_k.values()), default=0.0)
    if 8 not in rows or not best:
        return "skipped"
    ratio = rows[8]["fused_steps_s"] / best
    return f"{'fused' if ratio >= 1 else 'concurrent'} faster ({ratio:.2f}x)"


# claim -> (the check whose result decides it, its verdict from that result)
CLAIMS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "CUDA-only tests pass": ("cuda_tests", lambda t: "PASS" if t["passed"] and not t["failed"] else "FAIL"),
    "channels_last=auto picks the faster layout": (
        "layouts", lambda r: "FAIL: " + ", ".join(r["auto_wrong"]) if r["auto_wrong"] else "PASS"),
    "torch.compile reused by a second run": ("compile", lambda c: "PASS" if c["reused"] else "FAIL"),
    ">= 2x runs/hour from concurrent jobs (b8)": ("concurrency", lambda c: "PASS" if (
        best := max(level["speedup"] for level in c["levels"])) >= 2 else f"FAIL ({best:.2f}x)"),
    "fused K=8 vs the best concurrent processes (b8)": ("fused", _fused_verdict),
    "probes under bf16 = fp32": ("probes", lambda p: "PASS" if p["within_tolerance"] else "FAIL"),
}


def verdicts(results: dict) -> dict[str, str]:
    """PASS / FAIL / skipped per claim, from the results."""
    out = {}
    for claim, (name, judge) in CLAIMS.items():
        r = results.get(name) or {}
        # a check that did not run has a reason string under "skipped" or "error" (cuda_tests counts its
        # skipped tests under "skipped": a number)
        ran = r and not isinstance(r.get("skipped"), str) and "error" not in r
        out[claim] = judge(r) if ran else "skipped"
    for name, r in results.items():
        if isinstance(r, dict) and "error" in r:
            out[f"{name} ran"] = "ERROR: " + r["error"][:200]
    return out
