"""The comparison report (normbench.report: records, stats, reference, tables, figures, plots, render, cli)
on synthetic run records.

The records are written exactly as docs/ARCHITECTURE.md describes a job's output dir.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from scipy import stats as scipy_stats

from normbench import record
from normbench.filters import filter_grid
from normbench.identity import seedless_identity
from normbench.report import cli as report
from normbench.report import mechanism as records_mechanism
from normbench.report import records, reference, render, stats
from normbench.report import tables as report_tables

ROOT = Path(__file__).resolve().parents[1]
# published two-sided 95% Student t quantiles (t_{0.975, df})
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 10: 2.228, 30: 2.042}

# ------------------------------------------------------------------------------------------------
# synthetic run records

_counter = [0]


def write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def write_jsonl(path: Path, rows) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def config_for(choices: dict, dropout: float, lr: float, experiment: str, device: str = "cpu") -> dict:
    return {
        "experiment_name": experiment,
        "batch_size": choices.get("batch_size", 128),
        "seed": choices.get("seed", 0),
        "data": {"name": choices.get("data", "cifar10"), "num_classes": 10, "root": "data", "download": False,
                 "val_size": 5000,
                 "split_seed": 0, "augment": True, "crop_padding": 4, "flip": True, "synthetic": {}},
        "model": {"name": choices["model"], "width": 1.0,
                  "input_size": 32 if choices["model"] == "vgg_a" else 224,
                  "dropout": dropout},
        "norm": {"name": choices["norm"], "groups": 4, "eps": 1e-5, "affine": True},
        "activation": {"name": choices.get("activation", "relu")},
        "loss": {"name": choices.get("loss", "ce"), "l1": 0.0, "l2": 0.0, "smoothing": 0.1, "gamma": 2.0},
        "optimizer": {"_target_": "torch.optim.SGD", "_partial_": True, "lr": lr, "momentum": 0.9},
        "scheduler": {"name": choices.get("scheduler", "constant")},
        "trainer": {"epochs": 3, "device": device, "precision": "32", "channels_last": False,
                    "compile": False,
                    "threads": 1, "max_steps_per_epoch": None, "max_eval_batches": None,
                    "log_every_steps": 10,
                    "eval_batch_size": 500, "checkpoint": False},
        "logger": {"name": "none", "project": "normbench", "entity": None, "mode": "offline", "tags": []},
        "probe": {"name": "none"},
    }


def write_run(sweep: Path, *, experiment: str, choices: dict, test_acc: float | None,
              status: str = "completed",
              overrides: list[str] | None = None, dropout: float = 0.0, lr: float = 0.001,
              val_best: float | None = None,
              params: int = 9_756_426, memory: float = 1000.0, epochs: int = 3,
              steps: list[float] | None = None,
              probes: list[dict] | None = None, filters: bool = False, bad_metrics_line: bool = False,
              identity: str | None = None, device: str = "cpu", legacy: bool = False,
              config: bool = True) -> Path:
    """A run dir as the job writes it; legacy: a record made by hand, without seedless_identity in
    summary.json; config=False: without config.yaml."""
    _counter[0] += 1
    run_dir = sweep / str(sum(1 for _ in sweep.iterdir()) if sweep.exists() else 0)
    run_dir.mkdir(parents=True)
    choices = {"data": "cifar10", "activation": "relu", "loss": "ce", "optimizer": "sgd",
               "scheduler": "constant",
               "batch_size": 128, "seed": 0, **choices}
    cfg = config_for(choices, dropout, lr, experiment, device)
    if config:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    val_best = val_best if val_best is not None else (None if test_acc is None else test_acc + 0.005)
    rows = []
    for e in range(1, epochs + 1):
        frac = e / epochs
        rows.append({"epoch": e, "step": 10 * e, "train/loss": 2.0 - frac, "train/acc": 0.3 + 0.6 * frac,
                     "val/loss": 2.1 - frac, "val/acc": 0.25 + 0.6 * frac, "lr": lr, "time/epoch_s": 1.5,
                     "throughput/img_s": 1000.0})
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if bad_metrics_line:
        text += '{"epoch": 4, "step": 4'  # a half-written line
    (run_dir / "metrics.jsonl").write_text(text)
    if steps is not None:
        write_jsonl(run_dir / "steps.jsonl",
                    [{"step": i, "epoch": 1 + i // 10, "train/loss": v, "lr": lr}
                     for i, v in enumerate(steps)])
    if probes is not None:
        write_jsonl(run_dir / "probes.jsonl", probes)
    if filters:
        torch.manual_seed(_counter[0])
        Image.fromarray(filter_grid(torch.randn(64, 3, 3, 3))).save(run_dir / "filters.png")
    metrics = {
        "test/loss": 0.5, "test/acc": test_acc, "val/best_acc": val_best, "val/acc": val_best,
        "val/loss": 0.5, "train/loss": 0.3, "train/acc": 0.95, "convergence/epoch": 2, "model/params": params,
        "memory/peak_mb": memory, "time/total_s": 12.0, "throughput/img_s": 1000.0,
    }
    summary = {
        "status": status,
        "identity": identity or f"{_counter[0]:012x}",
        "experiment": experiment,
        "choices": choices,
        "overrides": overrides if overrides is not None else [],
        "metrics": metrics,
        "objective": None if val_best is None else 1 - val_best,
        "epochs_done": epochs, "diverged_epoch": 2 if status == "diverged" else None, "error": None,
        "device": "cpu", "started_at": "2025-01-01T00:00:00", "finished_at": "2025-01-01T00:01:00",
        "versions": {"normbench": "0.1.0", "torch": "2", "python": "3", "hydra": "1.4", "wandb": "0.31"},
    }
    if not legacy:
        summary[record.SEEDLESS_IDENTITY] = seedless_identity(cfg)
    write_json(run_dir / "summary.json", summary)
    return run_dir


# hand-chosen test accuracies
FOCAL = [0.8772, 0.8790, 0.8750]
CE = [0.8765, 0.8780, 0.8741]
PLAIN_CE = [0.7342, 0.7310]
BN_ALEX_8 = [0.7749, 0.7700]
NONE_ALEX_8 = [0.3914, 0.4100]


def probe_rows(seed: int, bn: bool, lr: float = 1e-3) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(0, 50, 10):
        base = 0.6 if bn else 0.2
        rows.append({"step": step, "epoch": 1 + step // 30, "probe/grad_pred": float(rng.uniform(0.1, 1)),
                     # β grows ~1/η: pooled over lrs, the smallest lr would dominate
                     "probe/beta": float(rng.uniform(5, 7) if bn else rng.uniform(14, 17)) * 1e-3 / lr,
                     "probe/lipschitz": float(rng.uniform(1, 2)) * 1e-3 / lr,
                     "probe/grad_cos": base + 0.01 * step / 10, "probe/loss_min": 0.5, "probe/loss_max": 1.5})
    return rows


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("multirun")
    info: dict = {"root": root, "skipped": {}}
    # --- vgg_losses: BN focal/ce with 3 seeds, BN ce_l2 with 1 seed, plain ce with 2 seeds -----------
    losses = root / "vgg_losses"
    for seed, acc in enumerate(FOCAL):
        write_run(losses, experiment="vgg_losses",
                  choices={"model": "vgg_a", "norm": "bn", "loss": "focal", "seed": seed}, test_acc=acc,
                  overrides=["+experiment=vgg_losses", "loss=focal", f"seed={seed}"],
                  filters=(seed == 0))
    for seed, acc in enumerate(CE):
        write_run(losses, experiment="vgg_losses", choices={"model": "vgg_a", "norm": "bn", "loss": "ce",
                  "seed": seed}, test_acc=acc, overrides=["+experiment=vgg_losses", f"seed={seed}"],
                  bad_metrics_line=(seed == 2))
    write_run(losses, experiment="vgg_losses", choices={"model": "vgg_a", "norm": "bn", "loss": "ce_l2"},
              test_acc=0.8733)
    for seed, acc in enumerate(PLAIN_CE):
        write_run(losses, experiment="vgg_losses", choices={"model": "vgg_a", "norm": "none", "loss": "ce",
                  "seed": seed}, test_acc=acc, params=9_750_922, memory=900.0)
    # a run whose dropout (0.5, from config.yaml) keeps it out of every table that assumes no dropout
    write_run(losses, experiment="vgg_losses",
              choices={"model": "vgg_a", "norm": "bn", "loss": "label_smoothing"},
              test_acc=0.86, dropout=0.5)
    # --- skipped records ----------------------------------------------------------------------------
    d = write_run(losses, experiment="vgg_losses", choices={"model": "vgg_a", "norm": "bn", "loss": "ce_l1"},
                  test_acc=None, status="running")
    info["skipped"]["running"] = str(d)
    d = losses / "90"
    d.mkdir()
    (d / "config.yaml").write_text("model: {name: vgg_a}\n")
    info["skipped"]["no_summary"] = str(d)
    d = losses / "91"
    d.mkdir()
    (d / "summary.json").write_text('{"status": "completed", "identity": ')
    info["skipped"]["bad_json"] = str(d)
    d = losses / "92"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"status": "completed", "identity": "x", "experiment": "e"}))
    info["skipped"]["missing_keys"] = str(d)
    # hydra's own files and a wandb dir inside the sweep are not runs
    (losses / "multirun.yaml").write_text("hydra: {}\n")
    (losses / "0" / ".hydra").mkdir()
    (losses / "0" / ".hydra" / "config.yaml").write_text("a: 1\n")

    # --- vgg_lr_robustness: plain/BN x lr 1e-3, 5e-3 with steps and probes; one diverged run ---------
    lrs = root / "vgg_lr_robustness"
    info["steps"] = {"none": [], "bn": []}
    for norm in ("none", "bn"):
        for lr in (1e-3, 5e-3):
            for seed in (0, 1):
                rng = np.random.default_rng(int(lr * 1e4) + seed + (100 if norm == "bn" else 0))
                scale = 1.0 if norm == "bn" else 1.8
                steps = list(np.round(scale * (0.5 + rng.uniform(0, 1, 30)), 4))
                status, acc = "completed", (0.85 if norm == "bn" else 0.70) + 0.01 * seed
                if norm == "none" and lr == 5e-3 and seed == 1:
                    status, acc = "diverged", None
                    steps = steps[:20] + [float("nan")] * 0  # stops early; no NaN written (JSON has none)
                info["steps"][norm] += [float(v) for v in steps]
                info.setdefault("steps_by", {}).setdefault((norm, lr), []).extend(float(v) for v in steps)
                write_run(lrs, experiment="vgg_lr_robustness",
                          choices={"model": "vgg_a", "norm": norm, "seed": seed, "lr": lr, "dropout": 0.0},
                          test_acc=acc, status=status, lr=lr,
                          overrides=[f"norm={norm}", f"optimizer.lr={lr}"],
                          steps=[float(v) for v in steps], probes=probe_rows(seed, norm == "bn", lr),
                          filters=(seed == 0), params=9_756_426 if norm == "bn" else 9_750_922)

    # --- alexnet_norm_batch (lr 0.005): none/bn at bs 8 and none at bs 64 -----------------------------
    alex = root / "alexnet_norm_batch"
    for norm, accs in (("bn", BN_ALEX_8), ("none", NONE_ALEX_8)):
        for seed, acc in enumerate(accs):
            write_run(alex, experiment="alexnet_norm_batch",
                      choices={"model": "alexnet", "norm": norm, "batch_size": 8, "seed": seed}, test_acc=acc,
                      lr=0.005, params=57_000_000)
    write_run(alex, experiment="alexnet_norm_batch",
              choices={"model": "alexnet", "norm": "gn", "batch_size": 64, "seed": 0}, test_acc=0.82,
              lr=0.005)
    # a duplicate identity (the same run copied) is skipped, not pooled as another seed
    dup = write_run(alex, experiment="alexnet_norm_batch",
                    choices={"model": "alexnet", "norm": "none", "batch_size": 64, "seed": 0}, test_acc=0.805,
                    lr=0.005, identity="dup0identity")
    shutil.copytree(dup, alex / "copy_of_dup")
    info["skipped"]["duplicate"] = str(alex / "copy_of_dup")

    # --- default experiment: a manual sweep of norm at batch 32 on synthetic data --------------------
    manual = root / "manual"
    for norm in ("bn", "gn"):
        for seed in (0, 1):
            write_run(manual, experiment="default",
                      choices={"model": "alexnet", "norm": norm, "batch_size": 32, "seed": seed,
                               "data": "synthetic"},
                      test_acc=0.5 + (0.1 if norm == "gn" else 0) + 0.01 * seed,
                      overrides=[f"norm={norm}", f"seed={seed}", "batch_size=32", "trainer.device=cpu"],
                      lr=0.02)
    return info


@pytest.fixture(scope="module")
def built(sweep, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "rep"
    root = sweep["root"]
    rep = report.build([str(root / "vgg_losses"), str(root / "vgg_lr_robustness"),
                        str(root / "alexnet_norm_batch"),
                        str(root / "manual")], str(out))
    return rep


def _table(rep, name):
    return next(t for t in rep.tables if t.name == name)


def _read_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------------
# statistics


def test_t_quantile_matches_published_table():
    for df, q in T975.items():
        assert stats.t_quantile(0.975, df) == pytest.approx(q, abs=6e-4)


def _t_sf2_numeric(t: float, df: float) -> float:
    """Two-sided tail of Student t by direct numerical integration of its density (independent check)."""
    x = np.linspace(abs(t), abs(t) + 400.0, 2_000_001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    return float(2 * np.trapezoid(pdf, x))


def test_welch_against_hand_computation():
    a, b = [1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0]
    va, vb = statistics.variance(a) / 3, statistics.variance(b) / 4
    t = (statistics.mean(a) - statistics.mean(b)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3)
    c = stats.welch(a, b)
    assert c.df == pytest.approx(df)
    assert c.diff == pytest.approx(-3.5)
    assert c.p == pytest.approx(_t_sf2_numeric(t, df), rel=1e-4)
    assert c.verdict == "differs"
    assert stats.welch([1.0, 1.2, 0.9], [1.05, 1.1, 1.0]).verdict == "not resolved"
    # the difference's 95% interval: Welch-Satterthwaite df, t quantile, both from scipy
    half = scipy_stats.t.ppf(0.975, df) * math.sqrt(va + vb)
    assert c.interval == pytest.approx((-3.5 - half, -3.5 + half), rel=1e-12)
    assert scipy_stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95) == pytest.approx(c.interval)
    one = stats.welch([1.0], [2.0, 2.1])
    assert one.verdict == "cannot tell" and "n=1, cannot tell" in one.text


def test_mean_ci():
    s = stats.mean_ci([1.0, 2.0, 4.0])
    assert s.mean == pytest.approx(7 / 3)
    assert s.ci == pytest.approx(4.302652729911275 * statistics.stdev([1, 2, 4]) / math.sqrt(3))
    assert stats.mean_ci([3.0]).ci is None and stats.mean_ci([]).mean is None


def test_reference_numbers_follow_design_digest():
    t = reference.TABLES_BY_NAME
    assert {x.name for x in reference.STUDY_TABLES} == {
        "vgg_bn_baseline", "vgg_losses", "vgg_activations", "vgg_optimizers", "vgg_dropout", "vgg_schedulers",
        "vgg_lr_robustness", "vgg_best", "alexnet_norm_batch", "alexnet_lr"}
    focal = next(r for r in t["vgg_losses"].rows if r.settings == {"norm": "bn", "loss": "focal"})
    assert focal.ref["test/err"] == 12.28
    assert t["vgg_activations"].row("BN · LeakyReLU").ref["test/err"] == 12.64
    gn16 = next(r for r in t["alexnet_norm_batch"].rows if r.settings == {"norm": "gn", "batch_size": 16})
    assert gn16.ref["test/acc"] == 81.31
    assert t["alexnet_lr"].row("plain · lr 0.001").ref["test/acc"] == 62.44
    assert t["vgg_best"].row("best").ref["test/err"] == 10.95
    assert t["vgg_lr_robustness"].mechanism["bn"] == {
        "loss_range": (0.3, 1.8), "grad_cos": 0.67, "lipschitz": 6.3}
    n_numbers = sum(len(r.ref) for x in reference.STUDY_TABLES for r in x.rows)
    assert n_numbers >= 2 * 5 + 2 * 6 * 2 + 6 + 4 + 8 + 6 + 16 + 3


def test_reference_settings_are_config_options():
    """Every setting a study row names is a config group's option (conf/<group>/<option>.yaml) or, for the
    numeric keys, a number; every `vs` and pair names a row of its table."""
    for table in reference.STUDY_TABLES:
        labels = {r.label for r in table.rows}
        assert len(labels) == len(table.rows), table.name
        for a, b in table.pairs:
            assert a in labels and b in labels, (table.name, a, b)
        for row in table.rows:
            assert row.vs is None or row.vs in labels, (table.name, row.vs)
            for key, value in {**table.context, **row.settings}.items():
                if key in ("batch_size", "dropout", "lr"):
                    assert isinstance(value, (int, float)), (table.name, key, value)
                else:
                    assert (ROOT / "conf" / key / f"{value}.yaml").is_file(), (table.name, key, value)


# ------------------------------------------------------------------------------------------------
# loading


def test_scan_skips_and_reports(sweep, built):
    skipped = {s.path: s for s in built.result.skipped}
    paths = {k: os.path.realpath(v) for k, v in sweep["skipped"].items()}
    assert skipped[paths["running"]].kind == "in progress" and "running" in skipped[paths["running"]].reason
    assert skipped[paths["no_summary"]].reason == "no summary.json"
    assert skipped[paths["bad_json"]].kind == "malformed"
    assert "not valid JSON" in skipped[paths["bad_json"]].reason
    assert "misses key(s) choices, overrides, metrics" in skipped[paths["missing_keys"]].reason
    assert skipped[paths["duplicate"]].kind == "duplicate"
    assert len(built.result.skipped) == 5
    assert not any(".hydra" in s.path for s in built.result.skipped)
    assert "skipped 5 (1 duplicate, 2 in progress, 2 malformed)" in built.result.summary_line()


def test_validate_summary_is_strict():
    good = {"status": "completed", "identity": "a", "experiment": "e", "choices": {}, "overrides": [],
            "metrics": dict.fromkeys(record.FINAL_METRICS, 0.5)}
    record.validate_summary(good)
    for bad, msg in [({**good, "status": "done"}, "status 'done'"),
                     ({**good, "metrics": {**good["metrics"], "test/acc": "0.9"}}, "not a number"),
                     ({**good, "metrics": {"test/acc": 0.9}}, "miss"),
                     ({**good, "overrides": "norm=bn"}, "'overrides' is str"),
                     ([good], "not an object")]:
        with pytest.raises(record.MalformedRecord, match=msg):
            record.validate_summary(bad)


# ------------------------------------------------------------------------------------------------
# tables


def _row(table, label, extra=None):
    rows = [r for r in table.rows if r.label == label and (extra is None or extra in r.extra)]
    assert len(rows) == 1, (label, [(r.label, r.extra) for r in table.rows])
    return rows[0]


def test_expected_tables(built):
    names = [t.name for t in built.tables]
    # one table per study table a preset ran -- not a near-duplicate per study table whose settings its
    # runs also match (vgg_losses' CE rows are the baseline's settings: still only the losses table)
    assert sorted(names) == sorted(["vgg_losses", "vgg_lr_robustness", "alexnet_norm_batch",
                                    "vgg_losses_other",  # the dropout-0.5 run matches no vgg_losses row
                                    "default"])  # the manual sweep


def test_seed_cells_mean_ci_and_reference(built):
    t = _table(built, "vgg_losses")
    focal = _row(t, "BN · focal")
    errs = [100 * (1 - a) for a in FOCAL]
    mean = statistics.mean(errs)
    ci = 4.302652729911275 * statistics.stdev(errs) / math.sqrt(3)
    st = focal.cell.stat("test/err")
    assert st.n == 3
    assert 100 * st.mean == pytest.approx(mean)
    assert 100 * st.ci == pytest.approx(ci)
    assert focal.ref.ref["test/err"] == 12.28
    header, rows = render.display(t)
    line = rows[t.rows.index(focal)]
    assert line[header.index("test error %")] == f"{mean:.2f} ± {ci:.2f}"
    assert line[header.index("study")] == "12.28"
    assert line[header.index("ours − study")] == f"{mean - 12.28:+.2f}"
    assert line[header.index("n")] == "3"
    # focal vs CE: Welch on the per-seed errors, and the study's difference
    ce_errs = [100 * (1 - a) for a in CE]
    va, vb = statistics.variance(errs) / 3, statistics.variance(ce_errs) / 3
    tval = (mean - statistics.mean(ce_errs)) / math.sqrt(va + vb)
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert focal.comparison.p == pytest.approx(_t_sf2_numeric(tval, df), rel=1e-4)
    assert focal.comparison.verdict == "not resolved"
    assert focal.study_diff == pytest.approx(12.28 - 12.35)
    comp = line[header.index("comparison")]
    assert comp.startswith("vs BN · CE: ") and "not resolved at n = 3: [" in comp and "Welch p=" in comp
    assert "study -0.07 pp" in comp
    # one seed: cannot tell
    l2 = _row(t, "BN · CE+L2")
    assert l2.cell.n == 1 and l2.comparison.verdict == "cannot tell"
    assert "n=1, cannot tell" in rows[t.rows.index(l2)][header.index("comparison")]
    # study rows no run covers are listed as not run
    assert _row(t, "plain · focal").cell is None
    assert rows[t.rows.index(_row(t, "plain · focal"))][header.index("n")] == "not run"
    # the CSV of the table has the numbers
    csv_rows = {r["row"]: r for r in _read_csv(Path(built.out) / "tables" / "vgg_losses.csv")}
    assert float(csv_rows["BN · focal"]["test_err_mean"]) == pytest.approx(mean)
    assert float(csv_rows["BN · focal"]["test_err_ci95"]) == pytest.approx(ci)
    assert float(csv_rows["BN · focal"]["test_err_study"]) == 12.28
    assert csv_rows["BN · focal"]["vs_verdict"] == "not resolved"
    # the difference's 95% interval (Welch), as scipy gives it, in the CSV and on the page
    low, high = scipy_stats.ttest_ind(errs, ce_errs, equal_var=False).confidence_interval(0.95)
    assert float(csv_rows["BN · focal"]["vs_ci95_low"]) == pytest.approx(low, rel=1e-9)
    assert float(csv_rows["BN · focal"]["vs_ci95_high"]) == pytest.approx(high, rel=1e-9)
    assert f"not resolved at n = 3: [{low:+.2f}, {high:+.2f}] pp" in comp


def test_matching_by_settings_not_by_name(built, tmp_path):
    # runs of an experiment that is no preset land by their settings in the ONE study table matching
    # most of them: the baseline's settings (lr 0.001) -> vgg_bn_baseline, not also losses/dropout/...
    mine = tmp_path / "mine"
    for norm, acc in (("none", 0.73), ("bn", 0.87)):
        for seed in (0, 1):
            write_run(mine, experiment="mine", choices={"model": "vgg_a", "norm": norm, "seed": seed},
                      test_acc=acc + 0.001 * seed, params=9_750_922 if norm == "none" else 9_756_426)
    # the study's "SGD (lr=0.01, momentum=0.9)" is its own row, not the baseline: lr 0.01 -> optimizers
    write_run(mine, experiment="mine2", choices={"model": "vgg_a", "norm": "bn"}, test_acc=0.88, lr=0.01)
    rep = report.build([str(mine)], str(tmp_path / "out"))
    assert sorted(t.name for t in rep.tables) == ["vgg_bn_baseline", "vgg_optimizers"]
    base = _table(rep, "vgg_bn_baseline")
    assert [r.cell.n for r in base.rows] == [2, 2]
    assert any("BN adds parameters" in n and "study +0.067%" in n for n in base.notes)
    sgd = _table(rep, "vgg_optimizers")
    assert [r.label for r in sgd.rows if r.cell is not None] == ["BN · SGD (lr 0.01, momentum 0.9)"]
    # lr from choices (lr sweep) and from config.yaml (alexnet) both match
    lr_t = _table(built, "vgg_lr_robustness")
    r = _row(lr_t, "BN · lr 0.005")
    assert r.cell.n == 2 and r.comparison is not None
    diverged = _row(lr_t, "plain · lr 0.005")
    assert diverged.cell.n == 1 and len(diverged.cell.diverged) == 1
    header, rows = render.display(lr_t)
    assert rows[lr_t.rows.index(diverged)][header.index("n")] == "1 (+1 diverged)"
    alex = _table(built, "alexnet_norm_batch")
    assert _row(alex, "plain · bs 64").cell.n == 1  # the copied duplicate is not a second seed


def test_alexnet_table_uses_accuracy(built):
    t = _table(built, "alexnet_norm_batch")
    assert t.primary == "test/acc"
    bn8 = _row(t, "BN · bs 8")
    header, rows = render.display(t)
    line = rows[t.rows.index(bn8)]
    accs = [100 * a for a in BN_ALEX_8]
    # two seeds: the mean and both points, not a t-interval (t_{0.975,1} = 12.7 makes it meaningless)
    assert line[header.index("test acc %")] == f"{statistics.mean(accs):.2f} ({accs[0]:.2f}, {accs[1]:.2f})"
    assert "±" not in line[header.index("test acc %")]
    assert line[header.index("study")] == "77.49"
    assert bn8.comparison.verdict in {"differs", "not resolved"}
    assert "vs plain · bs 8" in line[header.index("comparison")]


def test_generic_table_for_default_runs(built):
    t = _table(built, "default")
    assert t.setting_columns == ["norm"]
    assert [r.cell.n for r in t.rows] == [2, 2]
    assert [r.label for r in t.rows] == ["norm=bn", "norm=gn"]
    bn = t.rows[0]
    assert bn.vs == "best" and bn.comparison.diff == pytest.approx(0.1)
    header, rows = render.display(t)
    assert header[0] == "norm" and rows[0][0] == "bn"
    other = _table(built, "vgg_losses_other")
    assert [r.cell.choices["loss"] for r in other.rows] == ["label_smoothing"]


def test_mechanism_numbers_per_learning_rate(built, sweep):
    """One row per (norm, lr) and one per norm over its lrs: β and the Lipschitz estimate per lr (pooled,
    the smallest lr's would dominate), the training-loss range after the first epoch (steps 10..29 here;
    every network starts near 2.3), the effective lr range (plain's seed 1 diverged at lr 5e-3)."""
    t = _table(built, "vgg_lr_robustness")
    rows = {(m.norm, getattr(m, "lr", None)): m for m in t.mechanism}  # a NormLine: the norm over all lrs
    assert list(rows) == [("plain", 1e-3), ("plain", 5e-3), ("plain", None), ("BN", 1e-3), ("BN", 5e-3),
                          ("BN", None)]
    for norm, label in (("none", "plain"), ("bn", "BN")):
        after_warmup = []
        for lr in (1e-3, 5e-3):
            values = sweep["steps_by"][(norm, lr)]
            runs = [values[i:i + 30] for i in range(0, len(values), 30)] \
                if not (norm == "none" and lr == 5e-3) else [values[:30], values[30:]]
            window = [v for run in runs for v in run[10:]]
            assert rows[(label, lr)].loss_range == pytest.approx((min(window), max(window)))
            after_warmup += window
        assert rows[(label, None)].loss_range == pytest.approx((min(after_warmup), max(after_warmup)))
        assert rows[(label, None)].runs == 4 and rows[(label, 1e-3)].runs == 2
    # probes are read once a run has left chance: its first epoch ends at step 10 above chance
    bn_rows = {lr: [r for s in (0, 1) for r in probe_rows(s, True, lr) if r["step"] >= 10]
               for lr in (1e-3, 5e-3)}
    for lr, probe in bn_rows.items():
        assert rows[("BN", lr)].beta_mean == pytest.approx(statistics.mean(r["probe/beta"] for r in probe))
        assert rows[("BN", lr)].lipschitz_max == pytest.approx(max(r["probe/lipschitz"] for r in probe))
        assert rows[("BN", lr)].grad_cos == pytest.approx(statistics.mean(r["probe/grad_cos"] for r in probe))
    assert rows[("BN", 1e-3)].beta_mean == pytest.approx(5 * rows[("BN", 5e-3)].beta_mean)
    assert rows[("BN", None)].effective_lrs == [1e-3, 5e-3]
    assert rows[("plain", None)].effective_lrs == [1e-3]  # (0.70 + chance) / 2 < 90% of 0.705
    assert rows[("plain", 5e-3)].trains is False
    assert rows[("BN", None)].study["lipschitz"] == 6.3
    header, lines = render.mechanism_rows(t)
    assert [line[:2] for line in lines] == [["plain", "0.001"], ["plain", "0.005"], ["plain", "all 2"],
                                            ["BN", "0.001"], ["BN", "0.005"], ["BN", "all 2"]]
    assert lines[-1][header.index("trains / effective lrs")] == "0.001–0.005 (×5), 2 of 2 lrs"
    assert lines[-1][header.index("study")] == "[0.3, 1.8]"
    # β and Lipschitz: ours and their direction against plain at the same lr; the study's magnitudes
    # (15.7 / 6.3, at its own lr and weights) stand nowhere beside ours, its direction does
    direction = header.index("β, Lipschitz vs plain")
    assert lines[3][direction].startswith("β lower, Lipschitz ")
    assert lines[-1][direction] == "study: Lipschitz lower"
    assert not any(v in {"15.7", "6.3"} for line in lines for v in line)
    assert "magnitudes do not compare" in (Path(built.out) / "index.html").read_text()
    md = (Path(built.out) / "report.md").read_text()
    assert "| BN | 0.005 |" in md


# ------------------------------------------------------------------------------------------------
# files and figures


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        arr = np.asarray(im.convert("RGB"))
        assert arr.std() > 0, f"{path} is blank"
        return im.size


def test_figures(built):
    out = Path(built.out)
    expected = ["vgg_losses_bars.png", "vgg_losses_curves.png", "vgg_lr_robustness_landscape.png",
                "vgg_lr_robustness_probes.png", "vgg_lr_robustness_curves.png",
                "alexnet_norm_batch_clustered.png",
                "alexnet_norm_batch_bars.png", "default_bars.png"]
    for name in expected:
        w, h = _png_size(out / "fig" / name)
        assert w > 300 and h > 200
    # probes only where runs have probes.jsonl; landscape only for the lr sweep
    assert not (out / "fig" / "vgg_losses_probes.png").exists()
    assert not (out / "fig" / "alexnet_norm_batch_landscape.png").exists()
    lr_t = _table(built, "vgg_lr_robustness")
    assert {p for _, p in lr_t.figures} >= {"fig/vgg_lr_robustness_landscape.png",
                                            "fig/vgg_lr_robustness_probes.png"}
    # first-layer filters: copied from the runs that wrote filters.png
    losses = _table(built, "vgg_losses")
    assert [c for c, _ in losses.filters] == ["BN · focal (seed 0)"]
    assert len(lr_t.filters) == 4
    for _, rel in losses.filters + lr_t.filters:
        _png_size(out / rel)
    assert any("metrics.jsonl has 1 malformed line" in w for w in built.warnings)


def test_runs_csv_and_markdown(built, sweep):
    out = Path(built.out)
    rows = _read_csv(out / "runs.csv")
    assert len(rows) == built.result.n_records == len(built.result.runs) + 5
    focal = [r for r in rows if r.get("choice/loss") == "focal"]
    assert len(focal) == 3 and {r["status"] for r in focal} == {"completed"}
    assert float(focal[0]["metric/test/acc"]) in FOCAL
    assert "+experiment=vgg_losses" in focal[0]["overrides"]
    skipped = {r["path"]: r for r in rows if r["skipped"]}
    assert skipped[os.path.realpath(sweep["skipped"]["bad_json"])]["skipped"] == "malformed"
    md = (out / "report.md").read_text()
    assert "## vgg_losses — VGG-A: five losses, plain and BN (study 000)" in md
    assert "| BN · focal |" in md and "![" in md
    assert "## Skipped run records" in md


def test_html_self_contained(built):
    page = (Path(built.out) / "index.html").read_text()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", page)
    assert "<script" not in page and "<link" not in page
    for table in built.tables:
        assert f'data-table="{table.name}"' in page
        for _, rel in table.figures + table.filters:
            assert f'src="{rel}"' in page and (Path(built.out) / rel).is_file()
    assert 'id="skipped"' in page and "not valid JSON" in page and "status running" in page


@pytest.mark.slow
def test_cli_console_line_and_error(sweep, tmp_path):
    out = tmp_path / "cli"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(sweep["root"] / "vgg_losses"),
                        "--out", str(out), "--profile"], capture_output=True, text=True, check=False, env=env,
                        timeout=300)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert lines[0].startswith("read 14 run records") and "skipped 4 (2 in progress, 2 malformed)" in lines[0]
    assert lines[0].endswith(str(out / "index.html")) and lines[1].startswith("profile: scan")
    assert (out / "index.html").is_file()
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(tmp_path / "nope")],
                       capture_output=True, text=True, check=False, env=env, timeout=120)
    assert p.returncode == 2
    expected = (f"error: bad value sweep_dir={str(tmp_path / 'nope')!r}: "
                "pass existing sweep directories, e.g. multirun/vgg_losses")
    assert p.stderr.strip().splitlines() == [expected]


def test_read_speed(tmp_path):
    """Summary records are read at thousands per second (docs/report.md states the 20,000-record figure)."""
    n = 3000
    make_synthetic_records(tmp_path, n)
    res = records.scan([tmp_path])
    assert len(res.runs) == n
    rate = n / res.seconds
    print(f"read {n} records in {res.seconds:.2f}s: {rate:,.0f} records/s")
    assert rate > 1000
    t0 = time.perf_counter()
    cells = records.cells_of(res.runs)
    tables = [report_tables.study_table(st, cells) for st in reference.STUDY_TABLES]
    assert any(tables)
    assert time.perf_counter() - t0 < 10


def make_synthetic_records(root: Path, n: int) -> None:
    """n summary-only run records over a few sweeps (fast to write: summary.json + empty config)."""
    norms, losses = ("none", "bn", "ln", "gn"), ("ce", "focal", "ce_l2", "label_smoothing", "ce_l1")
    for i in range(n):
        d = root / f"sweep{i % 7}" / str(i)
        d.mkdir(parents=True)
        choices = {"model": "vgg_a", "norm": norms[i % 4], "activation": "relu", "loss": losses[(i // 4) % 5],
                   "optimizer": "sgd", "scheduler": "constant", "data": "cifar10", "batch_size": 128,
                   "seed": i // 20, "dropout": 0.0, "lr": 0.01}
        metrics = dict.fromkeys(record.FINAL_METRICS, 1.0)
        metrics.update({"test/acc": 0.8 + (i % 13) / 100, "val/best_acc": 0.85})
        (d / "summary.json").write_text(json.dumps({
            "status": "completed", "identity": f"{i:012x}", "experiment": "vgg_losses", "choices": choices,
            "overrides": [f"seed={i // 20}"], "metrics": metrics, "objective": 0.15, "epochs_done": 30,
            record.SEEDLESS_IDENTITY: seedless_identity(choices)}))  # the choices without the seed


# ------------------------------------------------------------------------------------------------
# browser: the page renders from disk with its tables and images, no console errors

CHECK_SCRIPT = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; });
  var rows = document.querySelectorAll('table.results tr').length;
  var d = document.createElement('div');
  d.id = 'render-check';
  d.textContent = 'images=' + imgs.length + ' broken=' + broken.length + ' tables=' +
    document.querySelectorAll('table.results').length + ' rows=' + rows;
  document.body.appendChild(d);
});
</script>
"""


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_html_renders_in_headless_chromium(built, tmp_path):
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (install Debian's chromium: apt-get install -y chromium)")
    out = Path(built.out)
    page = (out / "index.html").read_text()
    check = out / "_render_check.html"  # same dir, so relative image paths resolve as in index.html
    check.write_text(page.replace("</body>", CHECK_SCRIPT + "</body>"))
    args = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0",
            "--virtual-time-budget=5000"]
    try:
        p = subprocess.run(args + ["--dump-dom", check.as_uri()], capture_output=True, text=True, check=False,
                           timeout=180)
    finally:
        check.unlink()
    assert p.returncode == 0, p.stderr[-2000:]
    m = re.search(r'id="render-check">images=(\d+) broken=(\d+) tables=(\d+) rows=(\d+)<', p.stdout)
    assert m, p.stdout[-2000:]
    images, broken, tables, rows = map(int, m.groups())
    n_images = sum(len(t.figures) + len(t.filters) for t in built.tables)
    n_images += bool(render.headlines(built.tables))  # the answer's figure, at the top of the page
    assert images == n_images > 10
    assert broken == 0
    assert tables == len(built.tables)
    assert rows == sum(min(len(t.rows), render.MAX_HTML_ROWS) + 1 for t in built.tables)
    console = [line for line in p.stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]
    assert not console, console
    # the page as shipped, screenshotted: not blank
    shot = tmp_path / "shot.png"
    p = subprocess.run(args + [f"--screenshot={shot}", "--window-size=1200,1600",
                               (out / "index.html").as_uri()],
                       capture_output=True, text=True, check=False, timeout=180)
    assert p.returncode == 0 and shot.is_file(), p.stderr[-2000:]
    with Image.open(shot) as im:
        assert np.asarray(im.convert("L")).std() > 5


# ------------------------------------------------------------------------------------------------
# W&B (offline), read back with `wandb leet inspect`


def test_wandb_offline_report(sweep, tmp_path, monkeypatch):
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_CONFIG_DIR", "cfg"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / sub))
    out = tmp_path / "wb"
    rep = report.build([str(sweep["root"] / "vgg_losses")], str(out), wandb=True,
                       wandb_project="normbench-test")
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    wandb_bin = Path(sys.executable).with_name("wandb")
    p = subprocess.run([str(wandb_bin), "leet", "inspect", "--summary", "--json", str(runs[0])],
                       capture_output=True, text=True, check=False, timeout=120)
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    assert info["state"] == "finished" and info["project"] == "normbench-test"
    summary = info["summary"]
    assert summary["report/runs"] == len(rep.result.runs) and summary["report/skipped"] == 4
    losses = _table(rep, "vgg_losses")
    table = summary["table/vgg_losses"]
    assert table["_type"] == "table-file" and table["nrows"] == len(losses.rows)
    # the logged table file holds the numbers of the CSV
    data = json.loads((runs[0] / "files" / table["path"]).read_text())
    header = data["columns"]
    focal = next(r for r in data["data"] if r[0] == "BN · focal")
    errs = [100 * (1 - a) for a in FOCAL]
    assert focal[header.index("test_err_mean")] == pytest.approx(statistics.mean(errs))
    for _, rel in losses.figures:
        key = "figure/" + Path(rel).stem
        assert summary[key]["_type"] == "image-file" and summary[key]["width"] > 300


def test_model_variant_fills_study_table_with_note(tmp_path):
    sweep = tmp_path / "light"
    for seed in (0, 1):
        write_run(sweep, experiment="vgg_bn_baseline",
                  choices={"model": "vgg_a_light", "norm": "bn", "seed": seed, "data": "synthetic",
                           "lr": 0.001, "dropout": 0.0},
                  test_acc=0.5 + 0.01 * seed,
                  params=611_434)
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    base = _table(rep, "vgg_bn_baseline")
    assert _row(base, "BN").cell.n == 2
    assert any("model=vgg_a_light, a smaller variant" in n for n in base.notes)
    assert any("data=synthetic" in n for n in base.notes)
    assert [t.name for t in rep.tables] == ["vgg_bn_baseline"]


def test_norm_by_batch_sweep_of_any_model_gets_study_002s_comparisons(tmp_path):
    """norm x batch size on a model and data of no study table: each norm's smallest vs largest batch and
    GN vs BN at each batch, with Welch intervals, and the page leads with them."""
    sweep = tmp_path / "norm_batch"
    error = {("bn", 2): 0.60, ("bn", 64): 0.40, ("gn", 2): 0.45, ("gn", 64): 0.46}
    for (norm, batch), err in error.items():
        for seed in (0, 1, 2):
            choices = {"model": "vgg_a", "data": "fashion_mnist", "norm": norm, "batch_size": batch,
                       "seed": seed}
            write_run(sweep, experiment="nb", choices=choices, test_acc=1 - err - 0.01 * seed)
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    (table,) = rep.tables
    pairs = {(p.row, p.base): p.comparison for p in table.pairs}
    assert list(pairs) == [("batch_size=2 norm=bn", "batch_size=64 norm=bn"),
                           ("batch_size=2 norm=gn", "batch_size=64 norm=gn"),
                           ("batch_size=2 norm=gn", "batch_size=2 norm=bn"),
                           ("batch_size=64 norm=gn", "batch_size=64 norm=bn")]
    bn = pairs[("batch_size=2 norm=bn", "batch_size=64 norm=bn")]
    assert bn.diff == pytest.approx(0.20) and bn.interval[0] > 0 and bn.verdict == "differs"
    lines = [text for text, _ in render.headlines(rep.tables)]
    assert any(line.startswith("batch_size=2 norm=gn vs batch_size=2 norm=bn: test error -15.00 pp [95% CI ")
               and "n = 3 / 3" in line for line in lines), lines


def test_any_probed_sweep_gets_the_mechanism_table_without_study_numbers(tmp_path):
    """lrs no study row has (0.01, 0.02), on Fashion-MNIST: a generic table, and still a mechanism line per
    norm and lr, with no study number and no study range in the figure's caption."""
    sweep = tmp_path / "lrs"
    for norm in ("none", "bn"):
        for lr in (0.01, 0.02):
            for seed in (0, 1):
                choices = {"model": "vgg_a_light", "data": "fashion_mnist", "norm": norm, "seed": seed,
                           "lr": lr}
                write_run(sweep, experiment="my_lrs", lr=lr, test_acc=0.8, choices=choices,
                          probes=probe_rows(seed, norm == "bn", lr))
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    (table,) = rep.tables
    assert table.kind == "generic"
    lines = {(m.norm, getattr(m, "lr", None)): m for m in table.mechanism}
    assert list(lines) == [("plain", 0.01), ("plain", 0.02), ("plain", None), ("BN", 0.01), ("BN", 0.02),
                           ("BN", None)]
    assert lines[("BN", 0.02)].grad_cos == pytest.approx(statistics.mean(
        r["probe/grad_cos"] for s in (0, 1) for r in probe_rows(s, True, 0.02) if r["step"] >= 10))
    assert all(line.study == {} for line in lines.values() if isinstance(line, records_mechanism.NormLine))
    md = (tmp_path / "out" / "report.md").read_text()
    assert "| BN | 0.02 |" in md and "probes are read only after a run has left chance" in md
    assert "dashed" not in md


# ------------------------------------------------------------------------------------------------
# seed pooling by the seedless identity


def _cells_by_seeds(root: Path) -> tuple[records.ScanResult, list]:
    res = records.scan([root])
    return res, sorted(records.cells_of(res.runs), key=lambda c: sorted(str(r.seed) for r in c.all_runs))


def test_record_without_seedless_identity_is_a_cell_of_its_own(tmp_path):
    """Every run writes its seedless identity; a record made without one (and without config.yaml) is
    pooled with no other seed."""
    choices = {"model": "vgg_a", "norm": "bn"}
    for seed in (0, 1):
        write_run(tmp_path, experiment="vgg_losses", choices={**choices, "seed": seed},
                  test_acc=0.87 + seed / 100)
    bare = write_run(tmp_path, experiment="vgg_losses", choices={**choices, "seed": 2}, test_acc=0.86,
                     legacy=True,
                     config=False)
    assert record.SEEDLESS_IDENTITY not in json.loads((bare / "summary.json").read_text())
    _, cells = _cells_by_seeds(tmp_path)
    assert sorted(c.n for c in cells) == [1, 2]
    alone = next(c for c in cells if c.n == 1)
    assert alone.runs[0].path == os.path.realpath(bare)
    assert alone.key == ("vgg_losses", alone.runs[0].identity)
    rep = report.build([str(tmp_path)], str(tmp_path / "out"))
    assert _row(_table(rep, "vgg_losses"), "BN · CE").cell.n == 2
    # without config.yaml its dropout is unknown: it matches no study row
    assert [r.cell.n for r in _table(rep, "vgg_losses_other").rows] == [1]


def test_pooling_ignores_seed_and_not_identity_keys_only(tmp_path):
    base = {"model": "alexnet", "norm": "bn", "batch_size": 32}
    # the same setting on two devices and two seeds: one cell
    write_run(tmp_path, experiment="default", choices={**base, "seed": 0}, test_acc=0.50,
              overrides=["norm=bn", "seed=0", "trainer.device=cpu"])
    write_run(tmp_path, experiment="default", choices={**base, "seed": 1}, test_acc=0.52, device="cuda",
              overrides=["norm=bn", "seed=1", "trainer.device=cuda"])
    # another learning rate: a training setting, its own cell (with or without the override recorded)
    write_run(tmp_path, experiment="default", choices={**base, "seed": 2}, test_acc=0.60, lr=0.02,
              overrides=["norm=bn", "seed=2", "optimizer.lr=0.02"])
    write_run(tmp_path, experiment="default", choices={**base, "seed": 3}, test_acc=0.61, lr=0.05)
    _, cells = _cells_by_seeds(tmp_path)
    assert [sorted(r.seed for r in c.all_runs) for c in cells] == [[0, 1], [2], [3]]
    pooled, lr_02, lr_05 = cells
    assert pooled.n == 2 and pooled.value_overrides == ()  # seed and trainer.* are not shown as settings
    assert lr_02.value_overrides == ("optimizer.lr=0.02",) and lr_05.value_overrides == ()
    assert {c.setting("lr") for c in cells} == {0.001, 0.02, 0.05}
    rep = report.build([str(tmp_path)], str(tmp_path / "out"))
    default = _table(rep, "default")
    assert sorted(r.cell.n for r in default.rows) == [1, 1, 2]


def test_report_does_not_import_torch(sweep, tmp_path):
    code = ("import sys; import normbench.report.cli as cli; assert 'torch' not in sys.modules; "
            f"cli.main([{str(sweep['root'] / 'vgg_losses')!r}, '--out', {str(tmp_path / 'out')!r}]); "
            "import normbench.report.figures; assert 'torch' not in sys.modules, 'torch imported'")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "out" / "index.html").is_file()
