"""bench/gpu_check.py: without CUDA it says so in one line and exits 0; its CPU dry run goes through every
check at tiny sizes and writes the JSON and the table, so the script is known to work before a GPU is lent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from normbench.perf.gpu import CHECKS, verdicts

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.py"


def _run(args, tmp_path, timeout=900):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: the real check applies")
def test_without_cuda_one_line_and_exit_0(tmp_path):
    proc = _run(["--out", str(tmp_path / "out")], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().count("\n") == 0 and "no CUDA device" in proc.stdout
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_cpu_dry_run_goes_through_every_check(tmp_path):
    out = tmp_path / "out"
    checks = [c for c in CHECKS if c != "cuda_tests"]   # pytest inside pytest: covered by its own verdict test
    proc = _run(["--cpu-dry-run", "--out", str(out), "--checks", ",".join(checks)], tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "gpu_check.json").read_text())
    errors = {name: results[name]["error"] for name in checks if "error" in results[name]}
    assert not errors, errors
    assert {(r["model"], r["precision"]) for r in results["epochs"]["rows"]} == {
        (m, p) for m in ("vgg_a", "alexnet") for p in ("bf16", "fp32")}
    assert all(r["train_img_s"] > 0 and r["flops_per_image"] > 0 for r in results["epochs"]["rows"])
    assert {(r["model"], r["norm"]) for r in results["layouts"]["rows"]} == {
        (m, n) for m in ("vgg_a", "alexnet") for n in ("bn", "gn")}              # the tiny settings' subset
    assert results["compile"]["reused"] is True and results["compile"]["runs"][0]["new_graphs"] >= 1
    assert [level["concurrent"] for level in results["concurrency"]["levels"]] == [1, 2]
    assert set(results["probes"]["relative_difference"]) >= {"probe/beta", "probe/grad_pred"}
    assert "gpu_check on cpu" in proc.stdout and "probes under bf16 = fp32" in proc.stdout


def test_verdicts_from_results():
    results = {
        "cuda_tests": {"tests": 9, "passed": 8, "failures": 1, "errors": 0, "skipped": 0, "failed": ["t::x"]},
        "layouts": {"rows": [], "auto_wrong": ["alexnet/gn"]},
        "compile": {"runs": [], "reused": True},
        "concurrency": {"levels": [{"speedup": 1.0}, {"speedup": 2.4}]},
        "probes": {"skipped": "out of time"},
        "epochs": {"error": "RuntimeError: CUDA out of memory"},
    }
    v = verdicts(results)
    assert v["CUDA-only tests pass"] == "FAIL"
    assert v["channels_last=auto picks the faster layout"] == "FAIL: alexnet/gn"
    assert v["torch.compile reused by a second run"] == "PASS"
    assert v[">= 2x runs/hour from concurrent jobs (b8)"] == "PASS"
    assert v["probes under bf16 = fp32"] == "skipped"
    assert v["epochs ran"].startswith("ERROR: RuntimeError")
