"""Comparison report over sweep directories: seed tables against the studies, figures, HTML page.

    python bench/report.py multirun/vgg_losses [more dirs] [--out DIR] [--wandb]

Reads run records only (see normbench.report.records). Writes into the output dir:
``index.html`` (self-contained: inline CSS, images by relative path, no script, no network),
``report.md``, ``runs.csv`` (every run record, skipped ones included), ``tables/<name>.csv`` and
``fig/*.png``.
"""

from __future__ import annotations

import argparse
import csv
import html
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normbench.errors import ConfigError, NormbenchError
from normbench.report.records import Cell, Comparison, RunRecord, ScanResult, Stat, cells_of, scan, welch
from normbench.report.reference import (
    MODEL_VARIANTS,
    NORM_LABEL,
    STUDY_TABLES,
    STUDY_TITLES,
    TABLES_BY_NAME,
    RefRow,
    StudyTable,
    model_family,
)

ALPHA = 0.05
MAX_HTML_ROWS = 200  # per table; the table's CSV has all rows
MAX_CURVE_CELLS = 12
MAX_RUNS_PER_CELL = 5  # runs read per cell for curves
MAX_PROBE_RUNS = 40
MAX_BAND_RUNS = 200
MAX_FILTERS = 24  # per table
MAX_SKIPPED_LISTED = 1000
MAX_NEAREST = 50  # comparison partner searched among at most this many cells when no exact counterpart
PROBE_KEYS = ("probe/grad_pred", "probe/beta", "probe/grad_cos")


@dataclass(frozen=True)
class Column:
    metric: str
    title: str
    scale: float
    digits: int


COLUMNS = (
    Column("test/err", "test error %", 100.0, 2),
    Column("test/acc", "test acc %", 100.0, 2),
    Column("val/best_acc", "best val acc %", 100.0, 2),
    Column("convergence/epoch", "conv. epoch", 1.0, 1),
    Column("model/params", "params", 1.0, 0),
    Column("memory/peak_mb", "peak memory MB", 1.0, 0),
    Column("time/total_s", "time s", 1.0, 1),
)
PERCENT = {"test/err", "test/acc", "val/best_acc"}


# ------------------------------------------------------------------------------------------------
# tables

@dataclass
class Row:
    label: str
    cell: Cell | None  # None: a study row no run covers
    ref: RefRow | None = None
    extra: str = ""  # settings that vary between the table's cells and the row does not fix
    vs: str | None = None
    comparison: Comparison | None = None
    study_diff: float | None = None  # study: ref(row) - ref(vs), in the primary metric's percent


@dataclass
class Table:
    name: str
    title: str
    kind: str  # "study" | "generic"
    primary: str  # "test/err" | "test/acc"
    rows: list[Row]
    study: StudyTable | None = None
    notes: list[str] = field(default_factory=list)
    setting_columns: list[str] = field(default_factory=list)  # generic tables: one column per varying key
    show_experiment: bool = False
    mechanism: list[dict[str, Any]] = field(default_factory=list)
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to out dir)
    filters: list[tuple[str, str]] = field(default_factory=list)
    truncated: int = 0  # rows left out of HTML/Markdown (they are in the CSV)

    @property
    def cells(self) -> list[Cell]:
        return [r.cell for r in self.rows if r.cell is not None]

    @property
    def columns(self) -> list[Column]:
        return [c for c in COLUMNS if c.metric != "test/acc" or self.primary == "test/acc"]


def _same(value: Any, wanted: Any) -> bool:
    if value is None:
        return False
    if isinstance(wanted, (bool, str)):
        return str(value) == str(wanted)
    if isinstance(value, bool):
        return False
    try:
        return math.isclose(float(value), float(wanted), rel_tol=1e-9, abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def matches(cell: Cell, settings: dict[str, Any]) -> bool:
    # string settings first: numeric ones may need the run's config.yaml
    for key in sorted(settings, key=lambda k: not isinstance(settings[k], str)):
        value = cell.setting(key)
        if key == "model":
            value = model_family(value)
        if not _same(value, settings[key]):
            return False
    return True


def _describe(settings: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in settings.items())


def _varying(cells: Sequence[Cell], skip: set[str]) -> tuple[list[str], bool]:
    """Choice keys whose value differs between cells, and whether the value overrides differ."""
    keys: list[str] = []
    all_keys: list[str] = []
    for cell in cells:
        for k in cell.choices:
            if k not in all_keys:
                all_keys.append(k)
    for k in all_keys:
        if k in skip:
            continue
        if len({repr(_value(c, k)) for c in cells}) > 1:
            keys.append(k)
    return keys, len({c.value_overrides for c in cells}) > 1


def _value(cell: Cell, key: str) -> Any:
    """A choice; a numeric setting (lr, dropout) a cell's choices lack comes from its config.yaml."""
    return cell.choices[key] if key in cell.choices else cell.setting(key)


def _extra_label(cell: Cell, keys: Sequence[str], overrides: bool) -> str:
    parts = [f"{k}={v}" for k in keys if (v := _value(cell, k)) is not None]
    if overrides:
        parts.extend(cell.value_overrides)
    return " ".join(parts)


def _counterpart_key(cell: Cell, defining: set[str]) -> tuple:
    return (cell.experiment, tuple(sorted((k, repr(v)) for k, v in cell.choices.items() if k not in defining)),
            cell.value_overrides)


def _closest(cell: Cell, candidates: Sequence[Cell], index: dict[tuple, Cell] | None = None,
             defining: set[str] | None = None) -> Cell | None:
    """The candidate sharing most settings with cell (same experiment preferred): first the exact
    counterpart (same everything but the defining settings), else the nearest one when there are at
    most MAX_NEAREST candidates (a large search has no meaningful nearest: None)."""
    if not candidates:
        return None
    if index is not None and defining is not None:
        exact = index.get(_counterpart_key(cell, defining))
        if exact is not None:
            return exact
    if len(candidates) > MAX_NEAREST:
        return None

    def distance(other: Cell) -> tuple[int, int]:
        keys = set(cell.choices) | set(other.choices)
        d = sum(1 for k in keys if cell.choices.get(k) != other.choices.get(k))
        d += len(set(cell.value_overrides) ^ set(other.value_overrides))
        return (d, 0 if other.experiment == cell.experiment else 1)

    return min(candidates, key=distance)


def _compare(a: Cell, b: Cell, metric: str) -> Comparison:
    return welch(a.values(metric), b.values(metric), alpha=ALPHA)


def study_table(st: StudyTable, cells: Sequence[Cell]) -> Table | None:
    ctx_cells = [c for c in cells if matches(c, st.context)]
    assigned: dict[str, list[Cell]] = {}
    for cell in ctx_cells:
        for ref in st.rows:
            if matches(cell, ref.settings):
                assigned.setdefault(ref.label, []).append(cell)
                break
    if not assigned:
        return None
    for label, group in assigned.items():
        own = [c for c in group if c.experiment == st.name]
        if own:
            assigned[label] = own
    covered = [c for group in assigned.values() for c in group]
    fixed = set(st.context) | {k for r in st.rows for k in r.settings} | {"seed"}
    extra_keys, extra_overrides = _varying(covered, fixed)
    table = Table(st.name, st.title, "study", st.primary, [], study=st)
    table.show_experiment = len({c.experiment for c in covered}) > 1
    for ref in st.rows:
        group = assigned.get(ref.label, [])
        if not group:
            table.rows.append(Row(ref.label, None, ref, vs=ref.vs))
        for cell in sorted(group, key=lambda c: _extra_label(c, extra_keys, extra_overrides)):
            table.rows.append(Row(ref.label, cell, ref, _extra_label(cell, extra_keys, extra_overrides), ref.vs))
    by_label: dict[str, list[Cell]] = {}
    for row in table.rows:
        if row.cell is not None:
            by_label.setdefault(row.label, []).append(row.cell)
    indexes: dict[str, tuple[set[str], dict[tuple, Cell]]] = {}
    for row in table.rows:
        if row.vs is None:
            continue
        vs_ref = st.row(row.vs)
        if st.primary in row.ref.ref and st.primary in vs_ref.ref:
            row.study_diff = row.ref.ref[st.primary] - vs_ref.ref[st.primary]
        if row.cell is not None:
            if row.label not in indexes:
                defining = set(row.ref.settings) | set(vs_ref.settings) | {"seed"}
                index = {}
                for c in by_label.get(row.vs, []):
                    index.setdefault(_counterpart_key(c, defining), c)
                indexes[row.label] = (defining, index)
            defining, index = indexes[row.label]
            other = _closest(row.cell, by_label.get(row.vs, []), index, defining)
            if other is not None:
                row.comparison = _compare(row.cell, other, st.primary)
            elif by_label.get(row.vs):
                row.comparison = Comparison(None, None, None, "cannot tell", "no run with the same other settings")
    data = {str(c.choices.get("data")) for c in covered if c.choices.get("data") is not None}
    if data - {"cifar10"}:
        table.notes.append(f"These runs used data={', '.join(sorted(data))}; the study's numbers are CIFAR-10.")
    variants = sorted({str(c.choices.get("model")) for c in covered} & set(MODEL_VARIANTS))
    if variants:
        table.notes.append(f"These runs used model={', '.join(variants)}, a smaller variant; the study's numbers "
                           f"are for {st.context.get('model', 'the full model')}.")
    if st.note:
        table.notes.append(st.note)
    table.notes.extend(_contrasts(st, table))
    return table


def _contrasts(st: StudyTable, table: Table) -> list[str]:
    out = []
    for con in st.contrasts:
        a = next((r.cell for r in table.rows if r.label == con.row and r.cell is not None), None)
        b = next((r.cell for r in table.rows if r.label == con.base and r.cell is not None), None)
        ours = "not measured"
        if a is not None and b is not None:
            ma, mb = a.stat(con.metric).mean, b.stat(con.metric).mean
            if ma is not None and mb:
                ours = f"{(ma / mb - 1.0) * 100.0:+.3g}%"
        out.append(f"{con.text} ({con.row} vs {con.base}, {con.metric}): ours {ours}, study +{con.percent:g}%.")
    return out


def generic_tables(cells: Sequence[Cell], shown: set[int]) -> list[Table]:
    by_exp: dict[str, list[Cell]] = {}
    for cell in cells:
        by_exp.setdefault(cell.experiment, []).append(cell)
    tables = []
    for exp in sorted(by_exp):
        group = by_exp[exp]
        if exp in TABLES_BY_NAME:
            group = [c for c in group if id(c) not in shown]
            if not group:
                continue
            name, title = f"{exp}_other", f"{exp}: runs that match no row of the study table"
        else:
            name, title = exp, f"experiment {exp}: runs grouped by their varying choices"
        keys, overrides = _varying(group, {"seed"})
        group = sorted(group, key=lambda c: tuple(_sort_key(_value(c, k)) for k in keys) + c.value_overrides)
        table = Table(_slug(name), title, "generic", "test/err", [])
        table.setting_columns = keys + (["overrides"] if overrides else [])
        if not keys and not overrides and group:
            shared = {k: v for k, v in group[0].choices.items() if k != "seed"}
            table.notes.append("All runs share the settings " + _describe(shared)
                               + (" " + " ".join(group[0].value_overrides) if group[0].value_overrides else ""))
        best = min((c for c in group if c.stat("test/err").mean is not None),
                   key=lambda c: c.stat("test/err").mean, default=None)
        for cell in group:
            row = Row(_extra_label(cell, keys, overrides) or exp, cell)
            if best is not None and cell is not best:
                row.vs = "best"
                row.comparison = _compare(cell, best, "test/err")
            table.rows.append(row)
        if best is not None and len(group) > 1:
            table.notes.append(f"'vs best' compares each row with the lowest mean test error "
                               f"({_extra_label(best, keys, overrides)}).")
        tables.append(table)
    return tables


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "table"


# ------------------------------------------------------------------------------------------------
# per-run series (read on demand)

def _num(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _epoch_curve(label: str, runs: Sequence[RunRecord], warnings: list[str]):
    from normbench.report.plots import Curve

    per_epoch: dict[int, list[list[float]]] = {}
    for run in runs:
        rows, bad = run.epochs()
        if bad:
            warnings.append(f"{run.path}: metrics.jsonl has {bad} malformed line(s), ignored")
        for row in rows:
            epoch = row.get("epoch")
            if not isinstance(epoch, int) or isinstance(epoch, bool):
                continue
            values = [_num(row.get(k)) for k in ("train/acc", "val/acc", "train/loss", "val/loss")]
            per_epoch.setdefault(epoch, []).append(values)
    if not per_epoch:
        return None
    epochs = sorted(per_epoch)
    with np.errstate(all="ignore"):
        import warnings as _w

        with _w.catch_warnings():
            _w.simplefilter("ignore", RuntimeWarning)
            mean = np.array([np.nanmean(np.array(per_epoch[e], dtype=float), axis=0) for e in epochs])
    return Curve(label, np.array(epochs), mean[:, 0] * 100, mean[:, 1] * 100, mean[:, 2], mean[:, 3])


def _per_step(pairs: list[tuple[np.ndarray, np.ndarray]]):
    """Per-step min, max and mean over several runs' (step, value) series (finite values only)."""
    steps = np.concatenate([p[0] for p in pairs])
    values = np.concatenate([p[1] for p in pairs])
    keep = np.isfinite(steps) & np.isfinite(values)
    steps, values = steps[keep], values[keep]
    if steps.size == 0:
        return None
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    uniq, start, counts = np.unique(steps, return_index=True, return_counts=True)
    low = np.minimum.reduceat(values, start)
    high = np.maximum.reduceat(values, start)
    mean = np.add.reduceat(values, start) / counts
    return uniq, low, high, mean


def _series(rows: list[dict], key: str) -> tuple[np.ndarray, np.ndarray]:
    steps = np.array([_num(r.get("step")) for r in rows], dtype=float)
    values = np.array([_num(r.get(key)) for r in rows], dtype=float)
    return steps, values


def _group_runs(table: Table, cap: int) -> dict[str, list[RunRecord]]:
    """Runs of the table's cells grouped by norm (the studies' contrast) when norm varies, else by row."""
    cells = [(r, r.cell) for r in table.rows if r.cell is not None]
    norms = {c.choices.get("norm") for _, c in cells}
    groups: dict[str, list[RunRecord]] = {}
    for row, cell in cells:
        if len(norms) > 1:
            name = NORM_LABEL.get(str(cell.choices.get("norm")), str(cell.choices.get("norm")))
        else:
            name = row.label + (f" ({row.extra})" if row.extra else "")
        groups.setdefault(name, []).extend(cell.runs + cell.diverged)
    total = 0
    capped: dict[str, list[RunRecord]] = {}
    for name, runs in groups.items():
        if total < cap:
            capped[name] = runs[: cap - total]
            total += len(capped[name])
    return capped


# ------------------------------------------------------------------------------------------------
# figures

def _figures(table: Table, out: str, warnings: list[str], copied: dict[str, str]) -> None:
    from normbench.report import plots

    fig_dir = os.path.join(out, "fig")
    os.makedirs(fig_dir, exist_ok=True)
    ref_metric = table.primary
    col = next(c for c in COLUMNS if c.metric == ref_metric)

    # summary bars: ours (mean, 95% CI) next to the study
    bar_rows = []
    for row in table.rows[:40]:
        if row.cell is None:
            continue
        st = row.cell.stat(ref_metric)
        label = row.label + (f"\n{row.extra}" if row.extra and table.kind == "study" else "")
        study = row.ref.ref.get(ref_metric) if row.ref else None
        bar_rows.append(plots.BarRow(label, None if st.mean is None else st.mean * col.scale,
                                     None if st.ci is None else st.ci * col.scale, st.n, study))
    if any(b.ours is not None for b in bar_rows):
        name = f"{table.name}_bars.png"
        title = f"{table.title}: ours vs study" if table.kind == "study" else table.title
        plots.summary_bars(bar_rows, os.path.join(fig_dir, name), title, col.title)
        table.figures.append((f"{col.title}: ours (mean ± 95% CI) and the study", f"fig/{name}"))

    # study 002: clustered bars, test accuracy by norm x batch size
    if table.study is not None and {"norm", "batch_size"} <= {k for r in table.study.rows for k in r.settings}:
        ours, study = {}, {}
        groups, clusters = [], []
        for row in table.rows:
            norm = NORM_LABEL[row.ref.settings["norm"]]
            bs = str(row.ref.settings["batch_size"])
            groups += [norm] if norm not in groups else []
            clusters += [bs] if bs not in clusters else []
            study[(norm, bs)] = row.ref.ref.get("test/acc")
            if row.cell is not None and (norm, bs) not in ours:
                st = row.cell.stat("test/acc")
                if st.mean is not None:
                    ours[(norm, bs)] = (st.mean * 100, None if st.ci is None else st.ci * 100)
        if ours:
            name = f"{table.name}_clustered.png"
            plots.clustered_bars(groups, clusters, ours, study, os.path.join(fig_dir, name),
                                 "Test accuracy by norm and batch size (bars: ours; black marks: study)",
                                 "test accuracy %")
            table.figures.append(("test accuracy by norm × batch size (study 002)", f"fig/{name}"))

    # training curves of several runs on shared axes
    curve_rows = [r for r in table.rows if r.cell is not None
                  and any("metrics.jsonl" in run.files for run in r.cell.runs + r.cell.diverged)]
    if curve_rows:
        note = ""
        if len(curve_rows) > MAX_CURVE_CELLS:
            curve_rows.sort(key=lambda r: _key_or_inf(r.cell.stat("test/err").mean))
            note = f" (best {MAX_CURVE_CELLS} of {len(curve_rows)} by test error)"
            curve_rows = curve_rows[:MAX_CURVE_CELLS]
        series = []
        for row in curve_rows:
            runs = [r for r in row.cell.runs + row.cell.diverged if "metrics.jsonl" in r.files][:MAX_RUNS_PER_CELL]
            label = row.label + (f" {row.extra}" if row.extra else "")
            curve = _epoch_curve(label, runs, warnings)
            if curve is not None:
                series.append(curve)
        if series:
            name = f"{table.name}_curves.png"
            plots.curves(series, os.path.join(fig_dir, name), f"{table.title}{note}: mean over seeds")
            table.figures.append((f"train/validation accuracy and loss per epoch{note}", f"fig/{name}"))

    # loss landscape across learning rates: per-step min-max of training loss, plain vs BN
    if table.study is not None and table.study.mechanism:
        _mechanism(table, fig_dir, warnings)
        if os.path.exists(os.path.join(fig_dir, f"{table.name}_landscape.png")):
            caption = ("training loss per step: min–max over all learning rates and seeds "
                       "(dashed: the study's reported range)")
            table.figures.append((caption, f"fig/{table.name}_landscape.png"))

    # probes: gradient predictiveness, beta-smoothness, gradient cosine, loss range along the gradient
    groups = _group_runs(table, MAX_PROBE_RUNS)
    probe_groups = {k: [r for r in v if "probes.jsonl" in r.files] for k, v in groups.items()}
    probe_groups = {k: v for k, v in probe_groups.items() if v}
    if probe_groups:
        panels: dict[str, list] = {}
        for gname, runs in probe_groups.items():
            rows = []
            for run in runs:
                data, bad = run.probes()
                if bad:
                    warnings.append(f"{run.path}: probes.jsonl has {bad} malformed line(s), ignored")
                rows.append(data)
            for key in PROBE_KEYS:
                agg = _per_step([_series(r, key) for r in rows]) if rows else None
                if agg is not None:
                    panels.setdefault(key, []).append(plots.Band(gname, agg[0], agg[1], agg[2], agg[3]))
            lo = _per_step([_series(r, "probe/loss_min") for r in rows]) if rows else None
            hi = _per_step([_series(r, "probe/loss_max") for r in rows]) if rows else None
            if lo is not None and hi is not None:
                common, ia, ib = np.intersect1d(lo[0], hi[0], return_indices=True)
                if common.size:
                    panels.setdefault("probe/loss_min – probe/loss_max", []).append(
                        plots.Band(gname, common, lo[1][ia], hi[2][ib], None))
        if panels:
            name = f"{table.name}_probes.png"
            plots.probe_panels(panels, os.path.join(fig_dir, name),
                               f"{table.title}: optimisation probes (line: mean, band: min–max over runs)")
            caption = ("gradient predictiveness, β-smoothness, gradient cosine and loss range "
                       "along the gradient, per probe step")
            table.figures.append((caption, f"fig/{name}"))

    # first-layer filters, one run per row
    filt_dir = os.path.join(fig_dir, "filters")
    for row in table.rows:
        if len(table.filters) >= MAX_FILTERS:
            break
        if row.cell is None:
            continue
        run = next((r for r in row.cell.runs + row.cell.diverged if r.filters_png), None)
        if run is None:
            continue
        dest = copied.get(run.path)
        if dest is None:
            if not _is_png(run.filters_png):
                warnings.append(f"{run.path}: filters.png is not a PNG file, not shown")
                copied[run.path] = ""
                continue
            os.makedirs(filt_dir, exist_ok=True)
            dest = f"fig/filters/{_slug(run.identity)}.png"
            shutil.copyfile(run.filters_png, os.path.join(out, dest))
            copied[run.path] = dest
        if dest:
            label = row.label + (f" {row.extra}" if row.extra else "") + f" (seed {run.seed})"
            table.filters.append((label, dest))


def _key_or_inf(value: float | None) -> float:
    return math.inf if value is None else value


def _is_png(path: str) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _mechanism(table: Table, fig_dir: str, warnings: list[str]) -> None:
    """Study 000 section 9: loss range over the lr sweep, gradient cosine, beta (Lipschitz), per norm."""
    from normbench.report import plots

    st = table.study
    by_norm: dict[str, list[RunRecord]] = {}
    for cell in table.cells:
        by_norm.setdefault(str(cell.choices.get("norm")), []).extend(cell.runs + cell.diverged)
    bands, ref_ranges = [], []
    for norm in sorted(by_norm, key=lambda n: list(NORM_LABEL).index(n) if n in NORM_LABEL else 99):
        runs = by_norm[norm][:MAX_BAND_RUNS]
        ref = st.mechanism.get(norm, {})
        entry: dict[str, Any] = {"norm": NORM_LABEL.get(norm, norm), "runs": len(runs)}
        step_pairs = []
        for run in runs:
            rows, bad = run.steps()
            if bad:
                warnings.append(f"{run.path}: steps.jsonl has {bad} malformed line(s), ignored")
            if rows:
                step_pairs.append(_series(rows, "train/loss"))
        agg = _per_step(step_pairs) if step_pairs else None
        if agg is not None:
            entry["loss_range"] = (float(np.min(agg[1])), float(np.max(agg[2])))
            bands.append(plots.Band(NORM_LABEL.get(norm, norm), agg[0], agg[1], agg[2], None))
            ref_ranges.append(ref.get("loss_range"))
        cos, beta = [], []
        for run in runs:
            if "probes.jsonl" not in run.files:
                continue
            rows, _ = run.probes()
            cos.extend(v for v in (_num(r.get("probe/grad_cos")) for r in rows) if math.isfinite(v))
            beta.extend(v for v in (_num(r.get("probe/beta")) for r in rows) if math.isfinite(v))
        if cos:
            entry["grad_cos"] = float(np.mean(cos))
        if beta:
            entry["beta_mean"], entry["beta_max"] = float(np.mean(beta)), float(np.max(beta))
        entry["study"] = ref
        table.mechanism.append(entry)
    if bands:
        lrs = sorted({float(v) for c in table.cells if isinstance(v := c.setting("lr"), (int, float))})
        plots.band_plot(bands, os.path.join(fig_dir, f"{table.name}_landscape.png"),
                        "Training loss per step, min–max over learning rates " + ", ".join(f"{v:g}" for v in lrs),
                        "training loss", ref_ranges=ref_ranges)


# ------------------------------------------------------------------------------------------------
# rendering

def _fmt_stat(st: Stat, col: Column) -> str:
    if st.mean is None:
        return "–"
    if col.metric == "model/params":
        text = f"{st.mean:,.0f}"
        return text if not st.sd else f"{text} ± {st.ci:,.0f}" if st.ci is not None else text
    return st.fmt(col.scale, col.digits)


def _fmt_ref(value: float, col: Column) -> str:
    if col.metric == "model/params":
        return f"{value:,.0f}"
    return f"{value:.{col.digits if col.metric in PERCENT else 0}f}"


def _n_text(cell: Cell) -> str:
    text = str(cell.n)
    extra = []
    if cell.diverged:
        extra.append(f"{len(cell.diverged)} diverged")
    failed = [r for r in cell.other if r.status == "failed"]
    pruned = [r for r in cell.other if r.status == "pruned"]
    if failed:
        extra.append(f"{len(failed)} failed")
    if pruned:
        extra.append(f"{len(pruned)} pruned")
    return text + (f" (+{', '.join(extra)})" if extra else "")


def _comparison_text(row: Row, scale: float = 100.0) -> str:
    if row.vs is None:
        return ""
    parts = []
    c = row.comparison
    if c is None:
        parts.append(f"vs {row.vs}: not run")
    elif c.diff is None:
        parts.append(f"vs {row.vs}: {c.text}")
    else:
        parts.append(f"vs {row.vs}: {c.diff * scale:+.2f} pp, {c.text}")
    if row.study_diff is not None:
        parts.append(f"study {row.study_diff:+.2f} pp")
    return "; ".join(parts)


def display(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings, as shown in HTML and Markdown."""
    cols = table.columns
    primary = next(c for c in COLUMNS if c.metric == table.primary)
    header = ["row"] if table.kind == "study" else list(table.setting_columns or ["experiment"])
    if table.kind == "study":
        header.append("other settings")
    if table.show_experiment:
        header.append("experiment")
    header.append("n")
    for col in cols:
        header.append(col.title)
        if col.metric == table.primary and table.kind == "study":
            header += ["study", "ours − study"]
    header.append("comparison")
    out = []
    for row in table.rows[:MAX_HTML_ROWS]:
        cell = row.cell
        line: list[str] = []
        if table.kind == "study":
            line += [row.label, row.extra]
        else:
            line += _setting_values(table, cell)
        if table.show_experiment:
            line.append(cell.experiment if cell else "")
        line.append(_n_text(cell) if cell else "not run")
        for col in cols:
            st = cell.stat(col.metric) if cell else Stat(0, None, None, None)
            text = _fmt_stat(st, col)
            ref = row.ref.ref.get(col.metric) if row.ref else None
            if col.metric == table.primary and table.kind == "study":
                line.append(text)
                line.append(_fmt_ref(ref, col) if ref is not None else "")
                if ref is not None and st.mean is not None:
                    line.append(f"{st.mean * col.scale - ref:+.2f}")
                else:
                    line.append("")
            else:
                if ref is not None and not (col.metric == "test/acc" and table.primary == "test/err"):
                    text += f" (study {_fmt_ref(ref, col)})"
                line.append(text)
        line.append(_comparison_text(row, primary.scale))
        out.append(line)
    return header, out


def _setting_values(table: Table, cell: Cell | None) -> list[str]:
    if cell is None:
        return [""] * len(table.setting_columns)
    if not table.setting_columns:
        return [cell.experiment]
    values = []
    for key in table.setting_columns:
        value = " ".join(cell.value_overrides) if key == "overrides" else _value(cell, key)
        values.append("" if value is None else str(value))
    return values


def records(table: Table) -> tuple[list[str], list[list[Any]]]:
    """Header and rows with numbers (CSV, W&B): mean, CI half-width and n of each metric."""
    header = ["row", "other_settings", "experiment", "n", "n_diverged", "n_failed_or_pruned"]
    if table.kind == "generic":
        header = list(table.setting_columns) + header[2:]
    for col in table.columns:
        base = col.metric.replace("/", "_")
        header += [f"{base}_mean", f"{base}_ci95", f"{base}_n"]
        if table.kind == "study":
            header.append(f"{base}_study")
    header += ["vs", "vs_diff", "vs_p", "vs_verdict", "study_vs_diff"]
    rows = []
    for row in table.rows:
        cell = row.cell
        line: list[Any] = []
        if table.kind == "study":
            line += [row.label, row.extra]
        else:
            line += _setting_values(table, cell) if table.setting_columns else []
        line += [cell.experiment if cell else "", cell.n if cell else 0, len(cell.diverged) if cell else 0,
                 len(cell.other) if cell else 0]
        for col in table.columns:
            st = cell.stat(col.metric) if cell else Stat(0, None, None, None)
            scale = col.scale
            line += [None if st.mean is None else st.mean * scale, None if st.ci is None else st.ci * scale, st.n]
            if table.kind == "study":
                line.append(row.ref.ref.get(col.metric) if row.ref else None)
        c = row.comparison
        line += [row.vs or "", None if c is None or c.diff is None else c.diff * 100.0,
                 None if c is None else c.p, "" if c is None else c.verdict, row.study_diff]
        rows.append(line)
    return header, rows


def _table_title(table: Table) -> str:
    if table.study is not None:
        return f"{table.name} — {table.title} (study {table.study.study})"
    return f"{table.name} — {table.title}"


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:1.5em auto;max-width:1400px;
padding:0 1em;color:#222;line-height:1.4}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #ccc}h3{font-size:1.05em}
div.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}
td.cmp{min-width:22em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top}
th{background:#f0f0f0}tr.notrun td{color:#999}td.num{text-align:right;white-space:nowrap}
.verdict-differs{color:#0a6b0a}.verdict-noise{color:#8a5a00}.verdict-cannot{color:#777}
figure{display:inline-block;margin:.5em 1em .5em 0;vertical-align:top}
figure img{max-width:100%;border:1px solid #ddd}figcaption{font-size:.8em;color:#555;max-width:700px}
.filters figure img{image-rendering:pixelated;width:160px}.filters figcaption{max-width:170px}
.note{font-size:.85em;color:#444}.skipped td{font-size:.85em}code{background:#f4f4f4;padding:0 .2em}
nav ul{columns:2;font-size:.9em}
"""


STATS_NOTE_HTML = (
    "<p class=note>Cells pool runs that differ only in their seed: mean ± half-width of the 95% "
    "confidence interval of the mean (Student t, n−1 degrees of freedom); n counts completed runs. "
    "A comparison uses Welch's t-test at the 5% level: <b>differs</b> when p &lt; 0.05, "
    "<b>within noise</b> otherwise; with one seed on either side it cannot tell.</p>"
)


def _verdict_class(text: str) -> str:
    if "differs" in text:
        return "verdict-differs"
    if "within noise" in text:
        return "verdict-noise"
    if "cannot tell" in text or "not run" in text:
        return "verdict-cannot"
    return ""


def render_html(tables: list[Table], result: ScanResult, out: str, extra_warnings: list[str],
                title: str) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<p id="summary">{e(result.summary_line())}</p>',
        "<p class=note>Sources: " + ", ".join(f"<code>{e(r)}</code>" for r in result.roots) + "</p>",
        STATS_NOTE_HTML,
    ]
    if tables:
        parts.append("<nav><ul>" + "".join(f'<li><a href="#{e(t.name)}">{e(_table_title(t))}</a></li>'
                                             for t in tables) + "</ul></nav>")
    else:
        parts.append("<p><b>No finished runs to tabulate.</b></p>")
    for study in ("000", "002", None):
        group = [t for t in tables if (t.study.study if t.study else None) == study]
        if not group:
            continue
        parts.append(f"<h2>{e(STUDY_TITLES[study]) if study else 'Other runs'}</h2>")
        for table in group:
            parts.append(_html_table(table))
    parts.append('<h2 id="skipped">Skipped run records</h2>')
    if result.skipped:
        parts.append(f"<p>{len(result.skipped)} run record(s) were not used:</p>")
        parts.append('<table class="skipped"><tr><th>run dir</th><th>kind</th><th>reason</th></tr>')
        for s in result.skipped[:MAX_SKIPPED_LISTED]:
            parts.append(f"<tr><td><code>{e(s.path)}</code></td><td>{e(s.kind)}</td><td>{e(s.reason)}</td></tr>")
        parts.append("</table>")
        if len(result.skipped) > MAX_SKIPPED_LISTED:
            parts.append(f"<p class=note>… {len(result.skipped) - MAX_SKIPPED_LISTED} more in runs.csv.</p>")
    else:
        parts.append("<p>None.</p>")
    warnings = result.warnings + extra_warnings
    if warnings:
        parts.append("<h2>Warnings</h2><ul>" + "".join(f"<li>{e(w)}</li>" for w in warnings[:500]) + "</ul>")
    parts.append('<p class=note>Every run record: <a href="runs.csv">runs.csv</a>. '
                 'Tables as Markdown: <a href="report.md">report.md</a>.</p>')
    parts.append("</body></html>")
    return "\n".join(parts)


def _html_table(table: Table) -> str:
    e = html.escape
    header, rows = display(table)
    out = [f'<h3 id="{e(table.name)}">{e(_table_title(table))}</h3>']
    for note in table.notes:
        out.append(f"<p class=note>{e(note)}</p>")
    out.append(f'<div class="scroll"><table class="results" data-table="{e(table.name)}"><tr>'
               + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
    numeric = {i for i, h in enumerate(header) if h in {c.title for c in COLUMNS} | {"n", "study", "ours − study"}}
    for row_obj, line in zip(table.rows, rows, strict=False):
        cls = ' class="notrun"' if row_obj.cell is None else ""
        cells = []
        for i, text in enumerate(line):
            attr = ' class="num"' if i in numeric else ""
            if i == len(line) - 1:
                attr = f' class="cmp {_verdict_class(text)}"'
            cells.append(f"<td{attr}>{e(text)}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table></div>")
    if len(table.rows) > MAX_HTML_ROWS:
        out.append(f"<p class=note>Showing {MAX_HTML_ROWS} of {len(table.rows)} rows; all rows: "
                   f'<a href="tables/{e(table.name)}.csv">tables/{e(table.name)}.csv</a>.</p>')
    else:
        out.append(f'<p class=note>CSV: <a href="tables/{e(table.name)}.csv">tables/{e(table.name)}.csv</a></p>')
    if table.mechanism:
        out.append(_html_mechanism(table))
    for caption, path in table.figures:
        out.append(f'<figure><img src="{e(path)}" alt="{e(caption)}"><figcaption>{e(caption)}</figcaption></figure>')
    if table.filters:
        out.append('<div class="filters"><p class=note>First-layer convolution filters (one run per row):</p>')
        for caption, path in table.filters:
            out.append(f'<figure><img src="{e(path)}" alt="filters {e(caption)}">'
                       f"<figcaption>{e(caption)}</figcaption></figure>")
        out.append("</div>")
    return "\n".join(out)


def mechanism_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    header = ["norm", "runs", "training-loss range (ours)", "study", "mean gradient cosine (ours)", "study",
              "β-smoothness mean / max (ours)", "study Lipschitz estimate"]
    rows = []
    for m in table.mechanism:
        ref = m["study"]
        lr = m.get("loss_range")
        rows.append([
            m["norm"], str(m["runs"]),
            f"[{lr[0]:.2f}, {lr[1]:.2f}]" if lr else "no steps.jsonl",
            f"[{ref['loss_range'][0]:g}, {ref['loss_range'][1]:g}]" if "loss_range" in ref else "",
            f"{m['grad_cos']:.2f}" if "grad_cos" in m else "no probes",
            f"{ref['grad_cos']:g}" if "grad_cos" in ref else "",
            f"{m['beta_mean']:.3g} / {m['beta_max']:.3g}" if "beta_mean" in m else "no probes",
            f"{ref['lipschitz']:g}" if "lipschitz" in ref else "",
        ])
    return header, rows


def _html_mechanism(table: Table) -> str:
    e = html.escape
    header, rows = mechanism_rows(table)
    out = ['<p class=note>Optimisation mechanism per norm over this table\'s runs (study 000 section 9):</p>',
           f'<table class="mechanism" data-table="{e(table.name)}_mechanism"><tr>'
           + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for line in rows:
        out.append("<tr>" + "".join(f"<td>{e(t)}</td>" for t in line) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _md_escape(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(_md_escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_md_escape(t) for t in line) + " |" for line in rows]
    return out


def render_markdown(tables: list[Table], result: ScanResult, title: str) -> str:
    lines = [f"# {title}", "", result.summary_line(), "",
             "Cells: mean ± 95% CI half-width (Student t) over seeds; comparisons: Welch's t-test at 5%.", ""]
    for table in tables:
        lines += [f"## {_table_title(table)}", ""]
        lines += [f"> {n}" for n in table.notes] + ([""] if table.notes else [])
        header, rows = display(table)
        lines += _md_table(header, rows) + [""]
        if len(table.rows) > MAX_HTML_ROWS:
            lines += [f"Showing {MAX_HTML_ROWS} of {len(table.rows)} rows; all in tables/{table.name}.csv.", ""]
        if table.mechanism:
            lines += _md_table(*mechanism_rows(table)) + [""]
        for caption, path in table.figures:
            lines += [f"![{_md_escape(caption)}]({path})", ""]
    if result.skipped:
        lines += ["## Skipped run records", ""]
        lines += [f"- `{s.path}`: {s.kind}: {s.reason}" for s in result.skipped[:MAX_SKIPPED_LISTED]] + [""]
    return "\n".join(lines)


def write_runs_csv(result: ScanResult, path: str) -> None:
    choice_keys: list[str] = []
    metric_keys: list[str] = []
    seen_c, seen_m = set(), set()
    for run in result.runs:
        for k in run.choices:
            if k not in seen_c:
                seen_c.add(k)
                choice_keys.append(k)
        for k in run.metrics:
            if k not in seen_m:
                seen_m.add(k)
                metric_keys.append(k)
    header = (["path", "identity", "status", "experiment"] + [f"choice/{k}" for k in choice_keys]
              + ["overrides"] + [f"metric/{k}" for k in metric_keys]
              + ["objective", "epochs_done", "diverged_epoch", "error", "skipped", "skip_reason"])
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for run in result.runs:
            s = run.summary
            w.writerow([run.path, run.identity, run.status, run.experiment]
                       + [_csv_value(run.choices.get(k)) for k in choice_keys]
                       + [" ".join(run.overrides)]
                       + [_csv_value(run.metrics.get(k)) for k in metric_keys]
                       + [_csv_value(s.get("objective")), _csv_value(s.get("epochs_done")),
                          _csv_value(s.get("diverged_epoch")), _csv_value(s.get("error")), "", ""])
        blank = [""] * (len(choice_keys) + 1 + len(metric_keys) + 4)
        for sk in result.skipped:
            status = "running" if sk.kind == "in progress" else ""
            w.writerow([sk.path, "", status, ""] + blank + [sk.kind, sk.reason])


def _csv_value(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float) and math.isfinite(value):
        return repr(value)
    return value


def write_table_csv(table: Table, path: str) -> None:
    header, rows = records(table)
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        for line in rows:
            w.writerow([_csv_value(v) for v in line])


# ------------------------------------------------------------------------------------------------
# W&B

def wandb_mode() -> str:
    """WANDB_MODE if set; else online when W&B credentials are configured, offline otherwise."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return "online"
    try:
        from wandb.sdk.lib.wbauth import wbnetrc

        host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
        if wbnetrc.read_netrc_auth(host=host):
            return "online"
    except Exception:  # noqa: BLE001 - a problem reading credentials means: stay offline
        return "offline"
    return "offline"


def log_wandb(tables: list[Table], result: ScanResult, out: str, project: str, name: str) -> str:
    import wandb

    run = wandb.init(project=project, job_type="report", name=name, dir=out, mode=wandb_mode(),
                     config={"sources": result.roots, "n_records": result.n_records})
    try:
        payload: dict[str, Any] = {}
        for table in tables:
            header, rows = records(table)
            payload[f"table/{table.name}"] = wandb.Table(columns=header, data=[[_wb(v) for v in r] for r in rows])
            for caption, rel in table.figures:
                key = os.path.splitext(os.path.basename(rel))[0]
                payload[f"figure/{key}"] = wandb.Image(os.path.join(out, rel), caption=caption)
        run.log(payload)
        run.summary["report/runs"] = len(result.runs)
        run.summary["report/skipped"] = len(result.skipped)
        run.summary["report/tables"] = len(tables)
        return run.dir
    finally:
        run.finish()


def _wb(value: Any) -> Any:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return None
    return value


# ------------------------------------------------------------------------------------------------
# entry point

@dataclass
class Report:
    out: str
    tables: list[Table]
    result: ScanResult
    timings: dict[str, float]
    warnings: list[str]


def build(sweep_dirs: Sequence[str], out: str, *, wandb: bool = False, wandb_project: str = "normbench",
          title: str | None = None) -> Report:
    for d in sweep_dirs:
        if not os.path.isdir(d):
            raise ConfigError("sweep_dir", d, "pass existing sweep directories, e.g. multirun/vgg_losses")
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    result = scan(sweep_dirs)
    timings["scan"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    cells = cells_of(result.runs)
    tables: list[Table] = []
    for st in STUDY_TABLES:
        table = study_table(st, cells)
        if table is not None:
            tables.append(table)
    shown = {id(c) for t in tables for c in t.cells}
    tables += generic_tables(cells, shown)
    timings["tables"] = time.perf_counter() - t1

    t2 = time.perf_counter()
    os.makedirs(os.path.join(out, "tables"), exist_ok=True)
    warnings: list[str] = []
    copied: dict[str, str] = {}
    for table in tables:
        _figures(table, out, warnings, copied)
    timings["figures"] = time.perf_counter() - t2

    t3 = time.perf_counter()
    title = title or "normbench report: " + ", ".join(os.path.basename(os.path.normpath(d)) for d in sweep_dirs)
    for table in tables:
        write_table_csv(table, os.path.join(out, "tables", f"{table.name}.csv"))
    write_runs_csv(result, os.path.join(out, "runs.csv"))
    _write_text(os.path.join(out, "index.html"), render_html(tables, result, out, warnings, title))
    _write_text(os.path.join(out, "report.md"), render_markdown(tables, result, title))
    timings["write"] = time.perf_counter() - t3
    if wandb:
        t4 = time.perf_counter()
        log_wandb(tables, result, out, wandb_project, os.path.basename(os.path.normpath(out)))
        timings["wandb"] = time.perf_counter() - t4
    return Report(out, tables, result, timings, warnings)


def _write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def default_out(sweep_dirs: Sequence[str]) -> str:
    names = [os.path.basename(os.path.normpath(d)) or "report" for d in sweep_dirs]
    return os.path.join("reports", _slug("+".join(names)))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+", help="sweep directories (e.g. multirun/vgg_losses) or run dirs")
    parser.add_argument("--out", help="report directory (default: reports/<sweep name>)")
    parser.add_argument("--title", help="page title")
    parser.add_argument("--wandb", action="store_true", help="also log tables and figures to a W&B run")
    parser.add_argument("--wandb-project", default="normbench", help="W&B project (default: normbench)")
    parser.add_argument("--profile", action="store_true", help="print the time of each phase")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.sweep_dirs)
    try:
        report = build(args.sweep_dirs, out, wandb=args.wandb, wandb_project=args.wandb_project, title=args.title)
    except NormbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    result = report.result
    print(f"{result.summary_line()}; {len(report.tables)} table(s) -> {os.path.join(out, 'index.html')}")
    if args.profile:
        rate = result.n_records / result.seconds if result.seconds > 0 else float("inf")
        print("profile: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
              + f"; {rate:,.0f} records/s read")
    return 0
