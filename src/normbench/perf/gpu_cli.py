"""bench/gpu_check.py: the checks of ``normbench.perf.gpu`` under one deadline, gpu_check.json, one table."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import rich
import torch
from rich.table import Table

from normbench.perf.common import PerfPaths, machine_info
from normbench.perf.gpu import CHECKS, GpuCheckSettings, run_checks, verdicts
from normbench.record import atomic_write_json


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/gpu_check.py", description="GPU readiness: every CUDA path of "
                                "normbench checked in one run (docs/PERFORMANCE.md).")
    p.add_argument("--out", type=Path, default=Path("gpu-check"), help="directory for gpu_check.json")
    p.add_argument("--device", default="cuda", help="cuda | cuda:N")
    p.add_argument("--budget", type=float, default=None, help="seconds for all checks (default 450)")
    p.add_argument("--checks", default=",".join(CHECKS), help=f"comma-separated subset of {tuple(CHECKS)}")
    p.add_argument("--cpu-dry-run", action="store_true",
                   help="run every check at tiny sizes on the CPU (tests the script without a GPU)")
    return p


def table(results: dict) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for r in results.get("epochs", {}).get("rows", []):
        mfu = f", {r['mfu']:.0%} of peak" if r.get("mfu") else ""
        mem = "" if r.get("peak_mb") is None else f", peak {r['peak_mb']:.0f} MB + data {r['data_mb']:.0f} MB"
        rows.append((f"epoch {r['model']} {r['precision']} b{r['batch']}", (
            f"{r['epoch_s']:.1f} s, {r['train_img_s']:,.0f} img/s, "
            f"{r['achieved_tflops']:.1f} TFLOP/s{mfu}{mem}")))
    for r in results.get("layouts", {}).get("rows", []):
        rows.append((f"channels_last {r['model']} {r['norm']}", (
            f"{r['ratio']:.2f}x NCHW ({r['channels_last_img_s']:,.0f} vs {r['nchw_img_s']:,.0f} img/s), "
            f"auto={r['auto']}")))
    for r in results.get("compile", {}).get("runs", []):
        rows.append((f"compile run {r['run']}", (
            f"first step {r['first_step_s']:.1f} s, {r['train_img_s']:,.0f} img/s, "
            f"new graphs {r['new_graphs']}")))
    for level in results.get("concurrency", {}).get("levels", []):
        rows.append((f"b8 jobs x{level['concurrent']}", (f"{level['runs_per_hour']:.0f} runs/h "
                     f"({level['speedup']:.2f}x)")))
    fused = results.get("fused", {})
    for r in fused.get("rows", []):
        rows.append((f"fused K={r['k']} b{r['batch']}",
                     f"{r['fused_steps_s']:,.0f} model-steps/s ({r['speedup']:.2f}x sequential)"))
    for by_k in fused.get("concurrent_steps_s", {}).values():
        rows += [(f"b8 processes x{k}", f"{rate:,.0f} model-steps/s") for k, rate in by_k.items()]
    p = results.get("probes", {})
    if "relative_difference" in p:
        rows.append(("probes bf16 vs fp32",
                     ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in p["relative_difference"].items())))
    t = results.get("cuda_tests", {})
    if "tests" in t:
        rows.append(("CUDA-only tests",
                     f"{t['passed']} passed, {t['failures'] + t['errors']} failed, {t['skipped']} skipped"))
    rows += [(claim, verdict) for claim, verdict in results.get("verdicts", {}).items()]
    return rows


def main(argv: list[str] | None = None, *, train_script: Path | None = None,
         conf_dir: Path | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.cpu_dry_run:
        device, settings = torch.device("cpu"), GpuCheckSettings.tiny()
    elif not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device on this machine (torch {torch.__version__}); nothing to check.")
        return 0
    else:
        device, settings = torch.device(args.device), GpuCheckSettings()
        torch.backends.cudnn.benchmark = True
    names = [n.strip() for n in args.checks.split(",") if n.strip()]
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        _parser().error(f"unknown check(s) {unknown}; choose from {tuple(CHECKS)}")
    work = args.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    paths = PerfPaths(train_script=train_script, conf_dir=conf_dir)
    if args.budget is not None:
        settings = replace(settings, budget_s=args.budget)
    results = run_checks(settings, paths, device, work, names,
                         log=lambda msg: print(msg, file=sys.stderr, flush=True))
    results.update(machine=machine_info(device), dry_run=bool(args.cpu_dry_run))
    results["verdicts"] = verdicts(results)
    path = args.out / "gpu_check.json"
    atomic_write_json(path, results)
    machine = results["machine"]
    shown = Table("check", "result", title=f"gpu_check on {machine.get('gpu') or machine['device']}")
    for row in table(results):
        shown.add_row(*row)
    rich.print(shown)
    print(f"written: {path}")
    return 0
