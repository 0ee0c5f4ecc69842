"""A real preset sweep with probes, then the report over its run records: the whole data flow."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY, run_train


@pytest.mark.slow
def test_preset_sweep_with_probes_then_report(tmp_path):
    run_train(["-m", "+experiment=vgg_lr_robustness", "optimizer.lr=0.001,0.005", "model=vgg_a_light",
               *TINY, "trainer.epochs=2", "probe.interval=2", "logger=none"], tmp_path, timeout=900)
    sweep = tmp_path / "multirun" / "vgg_lr_robustness"
    summaries = [json.loads(p.read_text()) for p in sweep.rglob("summary.json")]
    assert len(summaries) == 4 and all(s["status"] == "completed" for s in summaries)
    probe_rows = [json.loads(line) for p in sweep.rglob("probes.jsonl") for line in p.read_text().splitlines()]
    assert any("probe/beta" in r for r in probe_rows) and any("probe/grad_cos" in r for r in probe_rows)
    assert any("probe/lipschitz" in r for r in probe_rows) and any("probe/grad_var" in r for r in probe_rows)

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 4 and {r["status"] for r in rows} == {"completed"}
    table = (out / "tables" / "vgg_lr_robustness.csv").read_text()
    assert "0.001" in table and "0.005" in table
    for figure in ("vgg_lr_robustness_landscape.png", "vgg_lr_robustness_probes.png",
                   "vgg_lr_robustness_curves.png"):
        assert (out / "fig" / figure).stat().st_size > 0, figure
    md = (out / "report.md").read_text()  # the mechanism table: a line per norm and lr, then per norm
    for norm in ("plain", "BN"):
        assert f"| {norm} | 0.001 |" in md and f"| {norm} | 0.005 |" in md and f"| {norm} | all 2 |" in md
    html = (out / "index.html").read_text()
    assert "vgg_lr_robustness" in html and "<img" in html
