"""bench/perf.py: the quick mode end to end (every section in the JSON, positive ratios, one table), and the
measurement helpers, target checks and table rendering on fabricated results (incl. the CUDA section,
which cannot run without a GPU)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from normbench.perf.common import SECTIONS, PerfSettings, Sample, alternate, paired_ratio
from normbench.perf.cuda import peak_tflops
from normbench.perf.phases import job_phases, timeline
from normbench.perf.table import print_table, table_rows
from normbench.perf.targets import evaluate_targets

ROOT = Path(__file__).resolve().parents[1]


def _positive(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value > 0)


@pytest.mark.slow
def test_quick_benchmark_runs_and_writes_every_section(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "perf.py"), "--quick", "--out", str(out)],
                          check=False, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "perf.json").read_text())
    for section in (*SECTIONS, "machine", "settings", "targets"):
        assert section in results, section
    assert results["settings"]["quick"] is True

    loop = results["loop"]["rows"]
    assert {(r["model"], r["batch"]) for r in loop} == {(m, b) for m in ("vgg_a", "alexnet_cifar")
                                                        for b in (8, 128)}
    for row in loop:
        for key in ("normbench_img_s", "raw_img_s", "ratio", "data_share", "step_ms", "data_ms_per_batch"):
            assert _positive(row[key]), (key, row)
    data = results["data"]
    assert (_positive(data["ratio"]) and _positive(data["normbench_img_s"])
            and _positive(data["torchvision_img_s"]))
    fixed = results["fixed_cost"]
    for key in ("bare_import_torch_s", "minimal_torch_step_s", "first_step_s", "ratio", "ratio_vs_minimal"):
        assert _positive(fixed[key]), key
    jobs = results["jobs"]
    assert _positive(jobs["job_s"]) and len(jobs["runs"][0]["outside_per_job"]) == 3
    assert 0 < jobs["outside"] < 1 and _positive(jobs["phases"]["training steps"])
    assert [r["phase"] for r in fixed["breakdown"]][-1] == "training steps"
    probes = {r["probe"]: r for r in results["probes"]["rows"]}
    assert set(probes) == {"none", "landscape", "grad_similarity", "all"}
    assert all(_positive(r["ratio_vs_none"]) for r in probes.values())
    layout = results["layout"]["rows"]
    assert {(r["model"], r["norm"]) for r in layout} == {(m, n) for m in ("vgg_a", "alexnet_cifar")
                                                         for n in ("none", "bn", "gn", "ln", "lrn")}
    assert all(_positive(r["ratio"]) and r["auto"] in ("channels_last", "nchw") for r in layout)
    cuda = results["cuda"]
    assert "skipped" in cuda or cuda["epochs"]
    fused = results["fused"]["rows"]
    assert [r["k"] for r in fused] == [1, 8] and all(_positive(r["speedup"]) for r in fused)
    names = {t["name"] for t in results["targets"]}
    assert {"loop/raw vgg_a b128", "loop/raw alexnet_cifar b8", "data pipeline / torchvision",
            "first step / bare import torch", "channels_last=auto picks the faster layout",
            "sweep job: share outside training steps",
            "fused / sequential K=8 w0.125 b8"} <= names
    assert all(t["result"] in ("PASS", "FAIL", "skipped") for t in results["targets"])
    # one table on stdout
    assert proc.stdout.count("normbench perf (quick)") == 1
    assert "section" in proc.stdout and "written:" in proc.stdout


def test_alternate_reverses_order_and_sums_chunks():
    calls = []

    def cand(name):
        def run():
            calls.append(name)
            return Sample(1, 0.5, 0.25)
        return run

    res = alternate({"a": cand("a"), "b": cand("b")}, rounds=2, warmup=1, chunks=2)
    assert calls == ["a", "b"] + ["a", "b", "b", "a"] + ["a", "b", "b", "a"]
    assert res["a"] == [Sample(2, 1.0, 0.5)] * 2 and res["a"][0].rate == 2.0 and res["a"][0].cpu_rate == 4.0
    assert paired_ratio([2.0, 3.0, 10.0], [1.0, 3.0, 5.0]) == 2.0


def test_peak_table(monkeypatch):
    monkeypatch.delenv("NORMBENCH_PEAK_TFLOPS", raising=False)
    assert peak_tflops("NVIDIA H100 80GB HBM3", True) == 989.4
    assert peak_tflops("NVIDIA H100 PCIe", True) == 756.0
    assert peak_tflops("NVIDIA L40S", True) == 362.0 and peak_tflops("NVIDIA L4", True) == 121.0
    assert peak_tflops("NVIDIA A100-SXM4-80GB", False) == 19.5
    assert peak_tflops("Some GPU", True) is None
    monkeypatch.setenv("NORMBENCH_PEAK_TFLOPS", "100")
    assert peak_tflops("Some GPU", True) == 100.0


def fabricated(cuda: bool) -> dict:
    loop_row = {"model": "vgg_a", "batch": 128, "width": 1.0, "precision": "bf16" if cuda else "fp32",
                "normbench_img_s": 99.0, "raw_img_s": 100.0, "ratio": 0.99, "cpu_time_ratio": 0.995,
                "data_share": 0.01, "step_ms": 100.0, "data_ms_per_batch": 1.0}
    results = {
        "settings": {"quick": False},
        "machine": {"cpu": "Test CPU", "cores": 2, "torch": "x", "device": "cuda:0" if cuda else "cpu",
                    "torch_threads": 2, **({"gpu": "NVIDIA H100 80GB HBM3"} if cuda else {})},
        "loop": {"rows": [loop_row, {**loop_row, "batch": 8, "ratio": 0.9, "data_share": 0.2}]},
        "data": {"ratio": 12.0, "normbench_img_s": 60000.0, "torchvision_img_s": 5000.0, "batch_size": 128,
                 "data": "fake-cifar10", "num_workers": 2},
        "fixed_cost": {"ratio": 1.6, "first_step_s": 4.0, "bare_import_torch_s": 2.5,
                       "minimal_torch_step_s": 4.2,
                       "ratio_vs_minimal": 0.95, "tiny_run_total_s": 6.0},
        "jobs": job_phases(SWEEP_EVENTS, 2) | {"outside_later_job": 0.25},
        "probes": {"rows": [{"probe": "none", "img_s": 100.0, "ratio_vs_none": 1.0, "overhead": 0.0},
                            {"probe": "landscape", "img_s": 85.0, "ratio_vs_none": 0.85, "overhead": 0.176}],
                   "width": 0.25, "batch": 32},
        "layout": {"rows": [
            {"model": "vgg_a", "norm": "bn", "batch": 64, "width": 1.0, "channels_last_img_s": 212.0,
             "nchw_img_s": 162.0, "ratio": 1.31, "auto": "channels_last", "auto_ok": True},
            {"model": "vgg_a", "norm": "gn", "batch": 64, "width": 1.0, "channels_last_img_s": 150.0,
             "nchw_img_s": 100.0, "ratio": 1.5, "auto": "nchw", "auto_ok": False}], "tie": 0.03},
        "cuda": {"skipped": "no CUDA device"},
    }
    if cuda:
        results["cuda"] = {
            "gpu": "NVIDIA H100 80GB HBM3", "peak_tflops": 989.4, "precision": "bfloat16",
            "epochs": [{"model": "vgg_a", "batch": 128, "epoch_s": 5.0, "achieved_tflops": 120.0,
                        "mfu": 0.12}],
            "concurrency": {"steps_per_job": 3000, "levels": [
                {"concurrent": 1, "runs_per_hour": 100.0, "speedup": 1.0, "train_img_s_total": 2000.0,
                 "train_speedup": 1.0},
                {"concurrent": 4, "runs_per_hour": 250.0, "speedup": 2.5, "train_img_s_total": 5200.0,
                 "train_speedup": 2.6}]},
        }
    return results


@pytest.mark.parametrize("cuda", [False, True])
def test_targets_and_table_from_fabricated_results(cuda, capsys):
    results = fabricated(cuda)
    results["targets"] = evaluate_targets(results)
    verdict = {t["name"]: t["result"] for t in results["targets"]}
    assert verdict["loop/raw vgg_a b128"] == "PASS" and verdict["loop/raw vgg_a b8"] == "FAIL"
    assert verdict["data time / step time (worst)"] == "FAIL"       # 0.2 > 0.1
    assert verdict["data pipeline / torchvision"] == "PASS"
    assert verdict["first step / bare import torch"] == "FAIL"
    assert verdict["sweep job: share outside training steps"] == "FAIL"   # 0.35 > 0.2
    assert verdict["runs/hour, concurrent / single (b8)"] == ("PASS" if cuda else "skipped")
    assert verdict["channels_last=auto picks the faster layout"] == "FAIL"      # vgg_a/gn picked the slower
    rows = table_rows(results)
    assert all(len(r) == 7 for r in rows)
    assert sum(r[0] == "6 cuda" for r in rows) == (4 if cuda else 2)
    assert sum(r[0] == "5 layout" for r in rows) == 3                          # 2 pairs + the verdict
    jobs = [r for r in rows if r[0] == "3 jobs"]
    assert jobs[0][1].strip().startswith("training steps") and jobs[-1][4:] == ("0.350", "<= 0.2", "FAIL")
    print_table(results)
    out = capsys.readouterr().out
    assert "Test CPU" in out and ("H100" in out) == cuda


def test_quick_settings_are_small():
    quick, full = PerfSettings.make(True), PerfSettings.make(False, rounds=7)
    assert quick.threads == 1 and quick.width < full.width and full.rounds == 7
    assert set(quick.sections) == set(SECTIONS)


# A traced multirun of two jobs (normbench.perf.phases): [phase, start, end, exclusive seconds], times from
# process start. The master composition and the imports come before the sweep's window (2.0 -> 6.0 s).
SWEEP_EVENTS = [
    ["import torch", 0.0, 1.0, 1.0], ["imports", 1.0, 1.5, 0.5],
    ["compose the run's config (Hydra)", 1.6, 1.9, 0.3],
    ["compose the config (Hydra)", 2.0, 2.1, 0.1], ["compose the config (Hydra)", 2.1, 2.2, 0.1],
    ["compose the config (Hydra)", 2.2, 2.3, 0.1],
    ["validate", 2.4, 2.5, 0.1], ["training steps", 2.5, 3.8, 1.3], ["validation", 3.8, 3.9, 0.1],
    ["Hydra job set-up (dirs, logging)", 2.3, 4.0, 0.1],
    ["compose the config (Hydra)", 4.0, 4.1, 0.1],
    ["validate", 4.2, 4.3, 0.1], ["training steps", 4.3, 5.6, 1.3], ["validation", 5.6, 5.8, 0.2],
    ["Hydra job set-up (dirs, logging)", 4.1, 6.0, 0.2],
    ["exit", 6.5, 6.5, 0.0],
]


def test_job_phases_split_a_sweep_into_per_job_phases():
    out = job_phases(SWEEP_EVENTS, 2)
    assert out["job_s"] == pytest.approx(2.0) and out["start_s"] == pytest.approx(2.0)
    assert out["end_s"] == pytest.approx(0.5)
    assert out["outside"] == pytest.approx(1 - 2.6 / 4.0)          # validation is outside the steps
    assert out["outside_per_job"] == pytest.approx([1 - 1.3 / 2.0, 1 - 1.3 / 2.0])
    phases = out["phases"]
    assert phases["compose the config (Hydra)"] == pytest.approx(0.2)   # 4 compositions, 2 jobs
    assert phases["validation"] == pytest.approx(0.15)
    assert "imports" not in phases and "compose the run's config (Hydra)" not in phases
    assert sum(phases.values()) == pytest.approx(out["job_s"])          # "other" is the rest
    assert phases["other (launcher, between jobs)"] == pytest.approx((4.0 - 3.8) / 2)
    with pytest.raises(RuntimeError, match="ran 2 jobs, expected 3"):
        job_phases(SWEEP_EVENTS, 3)


def test_timeline_ends_with_the_first_training_steps():
    rows = timeline(SWEEP_EVENTS)
    assert [r["phase"] for r in rows][:2] == ["import torch", "imports"]
    assert rows[-1] == {"phase": "training steps", "at_s": 3.8, "phase_s": 1.3}
    assert all(a["at_s"] <= b["at_s"] for a, b in itertools.pairwise(rows))
