"""The report as a researcher reads it: one table per study table on a real preset sweep, a
page of reasonable height in a real browser, the report's convergence epoch (null for a run that does not
learn), study 002's central comparisons with Welch verdicts, the studies' inconsistencies flagged."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, run_train
from scipy import stats as scipy_stats
from test_report import find_chromium, write_run

from normbench.datasets.idx import DEBIAN_FASHION_MNIST
from normbench.report import cli as report
from normbench.report.reference import TABLES_BY_NAME

ALEXNET_NORM_BATCH = TABLES_BY_NAME["alexnet_norm_batch"]

HEIGHT_SCRIPT = "'height=' + document.documentElement.scrollHeight"
# where the first headline and the figure beside it lie on the page (CSS px from the top)
ANSWER_SCRIPT = ("'headline=' + document.querySelector('.headline').getBoundingClientRect().bottom + "
                 "' figure=' + document.querySelector('figure.answer').getBoundingClientRect().top")


def after_load(browser: str, out: Path, profile: Path, expression: str, size: str = "1400,900") -> str:
    """`expression` evaluated in headless Chromium once index.html has loaded (images included) in a
    window of `size`, read back from the dumped DOM."""
    script = ("<script>window.addEventListener('load', () => { const d = document.createElement('div'); "
              f"d.id = 'browser-check'; d.textContent = {expression}; "
              "document.body.appendChild(d); });</script>")
    check = out / "_browser_check.html"  # beside index.html: its relative image paths resolve the same
    check.write_text((out / "index.html").read_text().replace("</body>", script + "</body>"))
    try:
        p = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            "--no-first-run", f"--user-data-dir={profile}", f"--window-size={size}",
                            "--hide-scrollbars", "--virtual-time-budget=5000", "--dump-dom", check.as_uri()],
                           capture_output=True, text=True, timeout=180, check=False)
    finally:
        check.unlink()
    m = re.search(r'id="browser-check">([^<]*)<', p.stdout)
    assert m, p.stderr[-2000:]
    return m.group(1)


def page_height(browser: str, out: Path, profile: Path) -> int:
    return int(after_load(browser, out, profile, HEIGHT_SCRIPT).removeprefix("height="))


@pytest.mark.slow
def test_a_two_run_preset_makes_one_table(tmp_path):
    # a real sweep of the 2-run preset: its runs belong in one table, not in every study table whose
    # settings the baseline matches (7-8 near-duplicates, a page of 12,000-15,000 px)
    run_train(["-m", "+experiment=vgg_bn_baseline", *TINY, "trainer.epochs=2", "logger=none"], cwd=tmp_path)
    out = tmp_path / "rep"
    rep = report.build([str(tmp_path / "multirun" / "vgg_bn_baseline")], str(out))
    assert [t.name for t in rep.tables] == ["vgg_bn_baseline"]
    table = rep.tables[0]
    assert [r.label for r in table.rows] == ["plain", "BN"] and all(r.cell is not None for r in table.rows)
    # the TINY overrides are the same in both rows: said once above the table, not in every row
    assert not any(r.extra for r in table.rows)
    assert any(n.startswith("Every row also: ") and "data.num_train=512" in n for n in table.notes)
    # a real run's record gives its number of classes: every run is checked for learning
    assert "steps to threshold" in table.convergence_note and "num_classes" not in table.convergence_note
    page = (out / "index.html").read_text()
    assert page.count('class="results"') == 1
    assert "other settings" not in page
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    assert page_height(browser, out, tmp_path / "profile") < 4000


def _flat_curve(run_dir: Path, acc: float, epochs: int = 3) -> None:
    rows = [{"epoch": e, "step": 10 * e, "train/loss": 2.3, "train/acc": acc, "val/loss": 2.3, "val/acc": acc,
             "lr": 0.001, "time/epoch_s": 1.0, "throughput/img_s": 1000.0} for e in range(1, epochs + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_convergence_epoch_is_null_for_a_run_that_does_not_learn(tmp_path):
    sweep = tmp_path / "vgg_bn_baseline"
    for seed in (0, 1):
        write_run(sweep, experiment="vgg_bn_baseline", choices={"model": "vgg_a", "norm": "bn", "seed": seed},
                  test_acc=0.85)
    # plain VGG-A at chance level (10 classes): the run records convergence/epoch 2 in its summary,
    # but it never learns
    stuck = write_run(sweep, experiment="vgg_bn_baseline", choices={"model": "vgg_a", "norm": "none"},
                      test_acc=0.10, val_best=0.10, params=9_750_922)
    _flat_curve(stuck, 0.10)
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    table = rep.tables[0]
    plain, bn = (next(r for r in table.rows if r.label == label) for label in ("plain", "BN"))
    assert plain.convergence == [None]
    # the learning runs (val/acc 0.25 -> 0.85 over 3 epochs of 10 steps; table best 0.855): the speed
    # measure is steps, epoch 3 (step 30) reaches 99%
    assert bn.convergence == [30.0, 30.0]
    md = (tmp_path / "out" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| plain |"))
    # the study's convergence epoch (45) counts epochs of its own budget: not beside our steps
    assert "never (1 of 1)" in line and "still improving" not in line and "(study 45)" not in line
    assert "99% of this table's best" in md
    csv_text = (tmp_path / "out" / "tables" / "vgg_bn_baseline.csv").read_text()
    assert "convergence_steps_mean" in csv_text


def test_a_run_cut_while_improving_is_labelled_so_and_every_row_states_its_steps(tmp_path):
    sweep = tmp_path / "vgg_bn_baseline"
    for seed in (0, 1):
        write_run(sweep, experiment="vgg_bn_baseline", choices={"model": "vgg_a", "norm": "bn", "seed": seed},
                  test_acc=0.85)
    # plain leaves chance late: 10% -> 20% -> 40% validation accuracy in 3 epochs of 10 steps, still rising
    # when its budget ends, far below the table's threshold (99% of 85.5%)
    rising = write_run(sweep, experiment="vgg_bn_baseline", choices={"model": "vgg_a", "norm": "none"},
                       test_acc=0.40, val_best=0.40)
    rows = [{"epoch": e, "step": 10 * e, "train/loss": 2.3 - 0.3 * e, "train/acc": acc, "val/loss": 2.0,
             "val/acc": acc, "lr": 0.001} for e, acc in ((1, 0.10), (2, 0.20), (3, 0.40))]
    (rising / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # a run that records its budget in summary.json: that number, not one derived from metrics.jsonl
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    summary["metrics"].update({"train/steps": 31, "train/images": 3968})
    (sweep / "0" / "summary.json").write_text(json.dumps(summary))
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    plain = next(r for r in rep.tables[0].rows if r.label == "plain")
    assert plain.convergence == [None] and plain.cut == [30.0]
    assert [run.budget for run in next(r for r in rep.tables[0].rows if r.label == "BN").cell.runs] == [
        (31.0, 3968.0), (30.0, 30.0 * 128)]
    md = (tmp_path / "out" / "report.md").read_text()
    line = next(x for x in md.splitlines() if x.startswith("| plain |"))
    assert "cut at 30 steps, still improving (1 of 1)" in line and "never" not in line
    header = next(x for x in md.splitlines() if x.startswith("| row |")).split(" | ")
    assert "steps" in header and "images" in header
    assert line.split(" | ")[header.index("steps")] == "30"
    assert line.split(" | ")[header.index("images")] == "3,840"


def test_study_002_comparisons_with_welch_verdicts_and_flags(tmp_path):
    sweep = tmp_path / "alexnet_norm_batch"
    accs = {("none", 8): [0.39, 0.40, 0.41], ("none", 64): [0.80, 0.81, 0.80],
            ("bn", 8): [0.775, 0.770, 0.772], ("bn", 64): [0.813, 0.811, 0.815],
            ("ln", 64): [0.812, 0.816, 0.810], ("gn", 8): [0.786, 0.781, 0.790]}
    for (norm, bs), values in accs.items():
        for seed, acc in enumerate(values):
            write_run(sweep, experiment="alexnet_norm_batch",
                      choices={"model": "alexnet", "norm": norm, "batch_size": bs, "seed": seed},
                      test_acc=acc,
                      lr=0.005, params=58_000_000)
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    table = next(t for t in rep.tables if t.name == "alexnet_norm_batch")
    pairs = {(p.row, p.base): p for p in table.pairs}
    assert list(pairs) == list(ALEXNET_NORM_BATCH.pairs)
    assert pairs[("plain · bs 8", "plain · bs 64")].comparison.verdict == "differs"
    assert pairs[("BN · bs 8", "BN · bs 64")].comparison.verdict == "differs"
    assert pairs[("LN · bs 64", "BN · bs 64")].comparison.verdict == "not resolved"
    assert pairs[("GN (4 groups) · bs 8", "BN · bs 8")].comparison.verdict == "differs"
    assert pairs[("LN · bs 8", "LN · bs 64")].comparison is None  # LN at bs 8 not run
    assert pairs[("LN · bs 64", "BN · bs 64")].study_diff == pytest.approx(82.66 - 81.31)
    page = (tmp_path / "out" / "index.html").read_text()
    assert 'data-table="alexnet_norm_batch_pairs"' in page
    assert "GN (4 groups) · bs 8 vs BN · bs 8" in page and "Welch p=" in page
    # the study's own inconsistencies, beside its numbers
    assert page.count('class="flag"') == len(ALEXNET_NORM_BATCH.flags) == 2
    assert "copied from the bs-32 log" in page


def test_study_000_inconsistencies_are_flagged_beside_their_tables():
    flags = {name: " ".join(TABLES_BY_NAME[name].flags) for name in TABLES_BY_NAME}
    assert "0.067%" in flags["vgg_bn_baseline"] and "25" in flags["vgg_bn_baseline"]
    assert "30" in flags["vgg_bn_baseline"]
    assert "L2" in flags["vgg_losses"] and "12.67" in flags["vgg_losses"]
    assert "7.21" in flags["vgg_activations"] and "8.49" in flags["vgg_activations"]
    # the numbers the flags quote are the study's own
    bn = {r.label: r.ref["test/err"] for r in TABLES_BY_NAME["vgg_activations"].rows}
    bn_errs = [v for k, v in bn.items() if k.startswith("BN")]
    assert round(max(bn_errs) - min(bn_errs), 2) == 8.49
    assert round(bn["BN · ReLU"] - bn["BN · LeakyReLU"], 2) == 7.21
    from torch import nn

    from normbench.models import count_parameters, vgg_a
    from normbench.norms import NormSpec

    counts = {n: count_parameters(vgg_a(num_classes=10, in_channels=3, image_size=32, norm=NormSpec(n).make,
                                        activation=nn.ReLU)) for n in ("none", "bn")}
    added = 100 * (counts["bn"] / counts["none"] - 1)
    assert f"+{added:.4f}%" in flags["vgg_bn_baseline"]  # 0.0564%: not the study's 0.067%


DEBIAN = Path(DEBIAN_FASHION_MNIST)
# the README's quick comparison, shrunk: 3 seeds x plain/BN, 2 epochs of 4 steps of 16 real images
FMNIST_TINY = ["-m", "experiment=fmnist_quick", "seed=0,1,2", "+debug=quick", "trainer.epochs=2",
               "logger=none"]
NUMBER = r"([+-]\d+\.\d\d)"
HEADLINE = re.compile(rf"BN vs plain: test error {NUMBER} pp \[95% CI {NUMBER}, {NUMBER}\] "
                      r"\((differs|not resolved)\), n = 3 / 3, (\d+) steps each — fashion_mnist, vgg_a_light")


@pytest.mark.slow
@pytest.mark.skipif(not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not in {DEBIAN} (apt-get install dataset-fashion-mnist)")
def test_the_answer_comes_first_on_a_real_fashion_mnist_sweep(tmp_path):
    run_train(FMNIST_TINY, cwd=tmp_path)
    sweep = tmp_path / "multirun" / "fmnist_quick"
    out = tmp_path / "rep"
    rep = report.build([str(sweep)], str(out))
    assert [t.name for t in rep.tables] == ["vgg_bn_baseline"]  # one sweep, one table
    page, md = (out / "index.html").read_text(), (out / "report.md").read_text()
    # the headline: the difference, its Welch interval (scipy's), n and the steps, before any note or table
    m = HEADLINE.search(page)
    assert m, page[:3000]
    assert m.start() < page.index("class=note") and m.start() < page.index("<table")
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/summary.json"))]
    err = {norm: [1 - s["metrics"]["test/acc"] for s in summaries if s["choices"]["norm"] == norm]
           for norm in ("bn", "none")}
    welch = scipy_stats.ttest_ind(err["bn"], err["none"], equal_var=False)
    low, high = welch.confidence_interval(0.95)
    diff = sum(err["bn"]) / 3 - sum(err["none"]) / 3
    expected = [100 * diff, 100 * low, 100 * high]
    assert [float(v) for v in m.group(1, 2, 3)] == pytest.approx(expected, abs=0.006)
    assert m.group(4) == ("differs" if welch.pvalue < 0.05 else "not resolved")
    # steps: 2 epochs capped at 4 steps (+debug=quick), as the runs recorded them in metrics.jsonl
    steps = {json.loads(p.read_text().splitlines()[-1])["step"] for p in sweep.glob("*/metrics.jsonl")}
    assert steps == {8} and m.group(5) == "8"
    header = next(x for x in md.splitlines() if x.startswith("| row |")).split(" | ")
    rows = [x.split(" | ") for x in md.splitlines() if x.startswith(("| plain |", "| BN |"))]
    assert len(rows) == 2 and all(r[header.index("steps")] == "8" for r in rows)
    assert "Budget: trainer.max_steps_per_epoch=4" in md
    # no study number (CIFAR-10, the study's VGG-A) beside a Fashion-MNIST row or summary line
    st = TABLES_BY_NAME["vgg_bn_baseline"]
    numbers = {f"{v:g}" for r in st.rows for v in r.ref.values()} | {f"{c.percent:g}" for c in st.contrasts}
    lines = [x for x in md.splitlines() if x.startswith(("| plain |", "| BN |", "> ", "**"))]
    for number in numbers:
        assert not any(re.search(rf"(?<![\d.]){re.escape(number)}(?!\d)", x) for x in lines), number
    assert "ours +" not in md and "study +" not in md
    # headings name the data and model run, not the study's CIFAR-10
    headings = re.findall(r"<h[123][^>]*>(.*?)</h[123]>", page)
    assert all("CIFAR" not in h for h in headings)
    assert any("fashion_mnist, vgg_a_light" in h for h in headings)
    browser = find_chromium()
    if browser is None:
        pytest.skip("chromium not found (apt-get install -y chromium)")
    # on a 1366x768 screen the answer is on the first screen: the headline, and the figure starts there
    where = after_load(browser, out, tmp_path / "profile", ANSWER_SCRIPT, size="1366,768")
    bottom, figure = (float(v.split("=")[1]) for v in where.split())
    assert 0 < bottom <= 768 and figure < 768, where


@pytest.mark.slow
def test_a_search_report_has_a_trial_column_sorted_by_objective(tmp_path):
    run_train(["-m", "search=optuna_random", "hydra.sweeper.sampler.seed=0", "hydra.sweeper.n_trials=4",
               *TINY, "model=vgg_a_light", "logger=none"], cwd=tmp_path)
    sweep = tmp_path / "multirun" / "default"
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    (table,) = rep.tables  # one search, one table
    assert table.setting_columns[0] == "trial"
    objectives = {int(p.parent.name[len("trial-"):].split(",")[0]): json.loads(p.read_text())["objective"]
                  for p in sweep.glob("trial-*/summary.json")}
    assert len(objectives) == 4
    shown = [int(r.cell.trials) for r in table.rows]
    assert sorted(shown) == sorted(objectives)
    assert [objectives[t] for t in shown] == sorted(objectives.values())  # best first
    assert [r.label.split(":")[0] for r in table.rows] == [f"trial {t}" for t in shown]
    assert all(r.vs == "best" for r in table.rows[1:]) and table.rows[0].vs is None
    md = (tmp_path / "out" / "report.md").read_text()
    header = next(x for x in md.splitlines() if x.startswith("| trial |")).split(" | ")
    assert header[0] == "| trial" and "steps" in header
    assert f"best of 4 trials: trial {shown[0]}, best validation accuracy" in md.splitlines()[2]


def test_one_spiking_run_does_not_flatten_the_other_curves():
    from matplotlib.figure import Figure

    from normbench.report import plots

    curves = [np.linspace(2.3, 0.5, 20) + 0.01 * i for i in range(5)]
    spiking = np.linspace(2.3, 0.5, 20)
    spiking[7] = 1e13
    ax = Figure().subplots()
    assert plots._clip_to_quantiles(ax, [*curves, spiking])
    low, high = ax.get_ylim()
    assert 0 < low < 0.5 and 2.3 < high < 3  # the robust range, with a margin
    assert not plots._clip_to_quantiles(Figure().subplots(), curves)  # nothing to clip: matplotlib's range


def test_one_sweep_makes_one_table(tmp_path):
    # a 2x2 lr x norm sweep of which only lr 0.001 matches study rows: one table of its four cells, not
    # the matching half in a study table and the rest in a second one
    sweep = tmp_path / "manual"
    for norm in ("none", "bn"):
        for lr in (0.001, 0.01):
            for seed in (0, 1):
                write_run(sweep, experiment="manual", choices={"model": "vgg_a", "norm": norm, "seed": seed},
                          test_acc=0.8 + 0.05 * (norm == "bn"), lr=lr)
    rep = report.build([str(sweep)], str(tmp_path / "out"))
    assert [t.name for t in rep.tables] == ["manual"] and len(rep.tables[0].rows) == 4
    # the same sweep at the study's lrs only fills the study table, whole
    for run in sweep.glob("*/config.yaml"):
        if "lr: 0.01" in run.read_text():
            shutil.rmtree(run.parent)
    rep = report.build([str(sweep)], str(tmp_path / "out2"))
    assert len(rep.tables) == 1 and rep.tables[0].kind == "study" and len(rep.tables[0].cells) == 2
