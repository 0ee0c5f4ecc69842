"""The driver behind ``bench/perf.py`` (docs/PERFORMANCE.md): runs the selected sections (each a key of
the JSON result), checks the targets, writes the JSON and prints one table."""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from normbench.device import resolve_device
from normbench.perf.common import SECTIONS, PerfPaths, PerfSettings, machine_info
from normbench.perf.cuda import bench_cuda
from normbench.perf.data import bench_data
from normbench.perf.fused import bench_fused
from normbench.perf.layout import bench_layout
from normbench.perf.loop import bench_loop
from normbench.perf.phases import bench_jobs
from normbench.perf.probes import bench_probes
from normbench.perf.startup import bench_fixed_cost
from normbench.perf.table import print_table
from normbench.perf.targets import evaluate_targets
from normbench.record import atomic_write_json

# section -> its function of (settings, paths, device, work dir), in SECTIONS' order
SECTION_RUNS = {"loop": bench_loop, "data": bench_data, "fixed_cost": bench_fixed_cost, "jobs": bench_jobs,
                "probes": bench_probes, "layout": bench_layout, "cuda": bench_cuda, "fused": bench_fused}


def run_all(s: PerfSettings, paths: PerfPaths | None = None, workdir: Path | None = None, log=print) -> dict:
    paths = paths or PerfPaths()
    device = resolve_device(s.device)
    if s.threads:
        torch.set_num_threads(s.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    results: dict = {"settings": {**asdict(s), "steps": {str(k): v for k, v in s.steps.items()}},
                     "machine": machine_info(device)}
    with tempfile.TemporaryDirectory(prefix="normbench-perf-") as tmp:
        work = Path(workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        for name, bench in SECTION_RUNS.items():
            if name not in s.sections:
                results[name] = {"skipped": "not selected (--sections)"}
                continue
            started = time.perf_counter()
            log(f"perf: {name} ...")
            torch.manual_seed(0)
            results[name] = bench(s, paths, device, work)
            results[name]["section_s"] = time.perf_counter() - started
            log(f"perf: {name} done in {results[name]['section_s']:.1f} s")
    results["targets"] = evaluate_targets(results)
    return results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bench/perf.py", description="normbench performance benchmarks "
                                "(docs/PERFORMANCE.md). Prints one table and writes it as JSON.")
    p.add_argument("--quick", action="store_true", help="tiny widths, few steps (CI; about a minute on CPU)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (0: torch's default; default: 1 with --quick, else 0)")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp16", "fp32"])
    p.add_argument("--compile", action="store_true", help="torch.compile the model in both loops")
    p.add_argument("--rounds", type=int, default=None, help="timed rounds per comparison")
    p.add_argument("--width", type=float, default=None, help="model width for the loop section")
    p.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    p.add_argument("--out", type=Path, default=None, help="directory for perf.json")
    p.add_argument("--json", type=Path, default=None, help="JSON path (default: perf.json in --out or cwd)")
    return p


def main(argv: list[str] | None = None, *, train_script: Path | None = None,
         conf_dir: Path | None = None) -> int:
    p = _parser()
    args = p.parse_args(argv)
    sections = tuple(x.strip() for x in args.sections.split(",") if x.strip())
    unknown = [x for x in sections if x not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; choose from {SECTIONS}")
    settings = PerfSettings.make(args.quick, device=args.device, threads=args.threads,
                                 precision=args.precision, compile=args.compile, rounds=args.rounds,
                                 width=args.width, sections=sections)
    paths = PerfPaths(train_script=train_script, conf_dir=conf_dir)
    results = run_all(settings, paths, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    path = args.json or (args.out or Path.cwd()) / "perf.json"
    atomic_write_json(path, results)
    print_table(results)
    print(f"written: {path}")
    return 0
