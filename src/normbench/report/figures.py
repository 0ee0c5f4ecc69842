"""The report's figures per table: each kind adds (caption, path) to ``table.figures`` when the runs have
its data (normbench.report.plots draws). The jsonl files are read here, for the few runs each shows."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Sequence
from operator import itemgetter

import numpy as np
import pandas as pd

from normbench.record import FILTERS, METRICS, PROBES
from normbench.report import plots
from normbench.report.mechanism import LOSS_RANGE_WARMUP_EPOCHS, NormLine, lr_of
from normbench.report.records import RunRecord, group_by, num, used
from normbench.report.reference import NORM_LABEL
from normbench.report.tables import COLUMNS, MIN_CI_N, Row, Table, ci_for_display, slug

MAX_BARS = 40
MAX_CURVE_CELLS = 12
MAX_RUNS_PER_CELL = 5  # runs read per cell for curves
MAX_PROBE_RUNS = 40
MAX_FILTERS = 24  # per table
CURVE_KEYS = ("step", "train/acc", "val/acc", "train/loss", "val/loss")
PROBE_KEYS = ("probe/grad_pred", "probe/beta", "probe/grad_cos", "probe/lipschitz", "probe/grad_var_rel")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def add_figures(tables: Sequence[Table], out: str) -> list[str]:
    """Every figure of the tables into <out>/fig/; returns the warnings (filters.png files not shown)."""
    warnings: list[str] = []
    copied: dict[str, str] = {}  # run path -> its filters copy, shared by the tables
    for table in tables:
        fig_dir = os.path.join(out, "fig")
        os.makedirs(fig_dir, exist_ok=True)
        for draw in (summary_bars, clustered_bars, training_curves, loss_landscape, probe_panels):
            draw(table, fig_dir)
        copy_filters(table, out, warnings, copied)
    return warnings


def _epoch_means(runs: Sequence[RunRecord]) -> pd.DataFrame:
    """The runs' CURVE_KEYS per epoch end, mean of the finite values (empty: no epochs)."""
    frame = pd.DataFrame([[e, *(num(row.get(k)) for k in CURVE_KEYS)] for run in runs for row in run.epochs
                          if isinstance(e := row.get("epoch"), int) and not isinstance(e, bool)],
                         columns=["epoch", *CURVE_KEYS], dtype=float)
    return frame.groupby("epoch").mean()


def _per_step(runs_rows: Sequence[list[dict]], key: str):
    """Per-step min, max and mean of key over several runs' jsonl rows (finite values only)."""
    frame = pd.DataFrame([(num(r.get("step")), num(r.get(key))) for rows in runs_rows for r in rows],
                         columns=["step", "value"], dtype=float)
    agg = frame[np.isfinite(frame).all(axis=1)].groupby("step")["value"].agg(["min", "max", "mean"])
    return None if agg.empty else (agg.index.to_numpy(), *(agg[k].to_numpy() for k in ("min", "max", "mean")))


def _figure_path(table: Table, fig_dir: str, kind: str, caption: str) -> str:
    """Where the table's figure of this kind is drawn; listed in ``table.figures`` with its caption."""
    table.figures.append((caption, f"fig/{table.name}_{kind}.png"))
    return os.path.join(fig_dir, f"{table.name}_{kind}.png")


def summary_bars(table: Table, fig_dir: str) -> None:
    """Ours (mean, 95% CI) of the primary metric next to the study's number, per row."""
    col = next(c for c in COLUMNS if c.metric == table.primary)
    bar_rows = []
    for row in table.rows[:MAX_BARS]:
        if row.cell is None:
            continue
        st = row.cell.stat(table.primary)
        label = row.label + (f"\n{row.extra}" if row.extra and table.kind == "study" else "")
        study = row.ref.ref.get(table.primary) if row.ref else None
        ci = ci_for_display(st)
        points = [v * col.scale for v in row.cell.values(table.primary)] if st.n < MIN_CI_N else []
        bar_rows.append(plots.BarRow(label, None if st.mean is None else st.mean * col.scale,
                                     None if ci is None else ci * col.scale, st.n, study, points))
    if not any(b.ours is not None for b in bar_rows):
        return
    title = f"{table.title}{': ours vs study' if table.kind == 'study' else ''} — {used(table.cells)}"
    caption = (f"{col.title}: ours (mean ± 95% CI from {MIN_CI_N} seeds; dots: the runs of a cell with "
               "fewer) and the study")
    plots.summary_bars(bar_rows, _figure_path(table, fig_dir, "bars", caption), title, col.title)


def clustered_bars(table: Table, fig_dir: str) -> None:
    """Study 002: test accuracy by norm x batch size, ours as bars, the study's as marks."""
    if table.study is None or not {"norm", "batch_size"} <= {k for r in table.study.rows for k in r.settings}:
        return
    ours, study = {}, {}
    for row in table.rows:
        key = (NORM_LABEL[row.ref.settings["norm"]], str(row.ref.settings["batch_size"]))
        study[key] = row.ref.ref.get("test/acc")
        st = row.cell.stat("test/acc") if row.cell is not None and key not in ours else None
        if st is not None and st.mean is not None:
            ci = ci_for_display(st)
            ours[key] = (st.mean * 100, None if ci is None else ci * 100)
    if not ours:
        return
    path = _figure_path(table, fig_dir, "clustered", "test accuracy by norm × batch size (study 002)")
    plots.clustered_bars(ours, study, path,
                         "Test accuracy by norm and batch size (bars: ours; black marks: study)",
                         "test accuracy %")


def training_curves(table: Table, fig_dir: str) -> None:
    """Train/validation accuracy and loss per epoch of up to MAX_CURVE_CELLS cells on shared axes."""
    curve_rows = [r for r in table.rows if r.cell is not None
                  and any(METRICS in run.files for run in r.cell.runs + r.cell.diverged)]
    note = ""
    if len(curve_rows) > MAX_CURVE_CELLS:
        curve_rows.sort(key=lambda r: math.inf if (m := r.cell.stat("test/err").mean) is None else m)
        note = f" (best {MAX_CURVE_CELLS} of {len(curve_rows)} by test error)"
        curve_rows = curve_rows[:MAX_CURVE_CELLS]
    series = []
    for row in curve_rows:
        runs = [r for r in row.cell.runs + row.cell.diverged if METRICS in r.files][:MAX_RUNS_PER_CELL]
        if not (means := _epoch_means(runs)).empty:
            series.append((row.label + (f" {row.extra}" if row.extra else ""), means))
    if not series:
        return
    caption = f"train/validation accuracy and loss against optimizer steps{note}"
    plots.curves(series, _figure_path(table, fig_dir, "curves", caption),
                 f"{table.title}{note}: mean over seeds — {used(table.cells)}")


def loss_landscape(table: Table, fig_dir: str) -> None:
    """The per-step min-max of the training loss over each norm's lr sweep, beside the study's range."""
    bands = []
    for line in table.mechanism:
        if isinstance(line, NormLine) and (agg := _per_step([r.steps() for r in line.records], "train/loss")):
            bands.append((plots.Band(line.norm, *agg[:3]), line.study.get("loss_range")))
    if not bands:
        return
    lrs = sorted({lr for c in table.cells if (lr := lr_of(c)) is not None})
    dashed = " (dashed: the study's reported range)" if any(r for _, r in bands) else ""
    caption = (f"training loss per step: min–max over all learning rates and seeds{dashed}; the table's "
               f"range leaves out the first {LOSS_RANGE_WARMUP_EPOCHS} epoch(s)")
    plots.band_plot([b for b, _ in bands], _figure_path(table, fig_dir, "landscape", caption),
                    "Training loss per step, min–max over learning rates " + ", ".join(f"{v:g}" for v in lrs),
                    "training loss", ref_ranges=[r for _, r in bands])


def probe_panels(table: Table, fig_dir: str) -> None:
    """The probes per group of runs: by norm when it varies, and by lr when it varies (β grows ~1/η, so
    pooling lrs would let the smallest dominate)."""
    panels: dict[str, list] = {}
    for gname, runs in _probe_groups(table).items():
        if runs := [r for r in runs if PROBES in r.files]:
            _probe_bands(gname, [run.probes() for run in runs], panels)
    if not panels:
        return
    caption = ("gradient predictiveness, β-smoothness, gradient cosine, Lipschitz estimate along the path, "
               "relative gradient variance and loss range along the gradient, per probe step and learning "
               "rate")
    plots.probe_panels(panels, _figure_path(table, fig_dir, "probes", caption),
                       f"{table.title}: optimisation probes (line: mean, band: min–max over runs)")


def copy_filters(table: Table, out: str, warnings: list[str], copied: dict[str, str]) -> None:
    """The first-layer filter grid of one run per row, copied to fig/filters/<identity>.png."""
    for row in table.rows:
        runs = row.cell.runs + row.cell.diverged if row.cell else []
        run = next((r for r in runs if r.filters_png), None)
        if run is None or len(table.filters) >= MAX_FILTERS:
            continue
        if run.path not in copied:
            copied[run.path] = _copy_filters_png(run, out, warnings)
        if copied[run.path]:
            label = row.label + (f" {row.extra}" if row.extra else "") + f" (seed {run.seed})"
            table.filters.append((label, copied[run.path]))


def _probe_groups(table: Table) -> dict[str, list[RunRecord]]:
    """The table's runs (at most MAX_PROBE_RUNS) grouped by norm (the studies' contrast) when norm varies
    and by learning rate when it varies, else by row."""
    rows = sorted((r for r in table.rows if r.cell is not None),
                  key=lambda r: (str(r.cell.choices.get("norm")), lr_of(r.cell) or 0.0))
    by_lr = len({lr_of(r.cell) for r in rows}) > 1
    if not by_lr:
        rows = [r for r in table.rows if r.cell is not None]
    by_norm = len({r.cell.choices.get("norm") for r in rows}) > 1

    def name(row: Row) -> str:
        norm = str(row.cell.choices.get("norm"))
        lr = [f"lr {lr_of(row.cell):g}"] if by_lr else []
        parts = ([NORM_LABEL.get(norm, norm)] if by_norm else []) + lr
        return " · ".join(parts) or row.label + (f" ({row.extra})" if row.extra else "")

    runs = [(group, run) for group, same in group_by(rows, name).items() for row in same
            for run in row.cell.runs + row.cell.diverged][:MAX_PROBE_RUNS]
    return {group: [run for _, run in same] for group, same in group_by(runs, itemgetter(0)).items()}


def _probe_bands(gname: str, rows: list[list[dict]], panels: dict[str, list]) -> None:
    """One group's band per probe key (and for the loss range along the gradient) into panels."""
    for key in PROBE_KEYS:
        agg = _per_step(rows, key)
        if agg is not None:
            panels.setdefault(key, []).append(plots.Band(gname, *agg))
    lo, hi = _per_step(rows, "probe/loss_min"), _per_step(rows, "probe/loss_max")
    if lo is not None and hi is not None:
        common, ia, ib = np.intersect1d(lo[0], hi[0], return_indices=True)
        if common.size:
            panels.setdefault("probe/loss_min – probe/loss_max", []).append(
                plots.Band(gname, common, lo[1][ia], hi[2][ib], None))


def _copy_filters_png(run: RunRecord, out: str, warnings: list[str]) -> str:
    """The copy's path relative to out, or "" when the run's filters.png is not a PNG."""
    try:
        with open(run.filters_png, "rb") as f:
            is_png = f.read(len(PNG_MAGIC)) == PNG_MAGIC
    except OSError:
        is_png = False
    if not is_png:
        warnings.append(f"{run.path}: {FILTERS} is not a PNG file, not shown")
        return ""
    os.makedirs(os.path.join(out, "fig", "filters"), exist_ok=True)
    dest = f"fig/filters/{slug(run.identity)}.png"
    shutil.copyfile(run.filters_png, os.path.join(out, dest))
    return dest

