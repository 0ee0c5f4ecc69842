"""Writing the report: the strings of every table (one place for how a number is shown), the page and
Markdown through templates/, and the CSV files."""

from __future__ import annotations

import csv
import os
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jinja2

from normbench.record import STEPS, Status, atomic_write_text
from normbench.report.mechanism import NormLine
from normbench.report.records import Cell, ScanResult, used
from normbench.report.reference import STUDY_TITLES
from normbench.report.stats import Comparison, Stat
from normbench.report.tables import (
    COLUMNS,
    MIN_CI_N,
    NO_STUDY_NUMBER,
    Column,
    Row,
    Table,
    cell_stat,
    fmt_value,
    on_study_data,
    override_map,
    round_text,
)

MAX_HTML_ROWS = 200  # per table; the table's CSV has all rows
MAX_SKIPPED_LISTED = 1000
MAX_WARNINGS_LISTED = 500
COUNTS = {"model/params", "train/steps", "train/images"}  # whole numbers with thousands separators
MAX_HEADLINES = 6
MAX_POINTS = 4  # a comparison lists its points up to this many seeds a side (an interval says little then)
SUMMARY_COLUMNS = ("objective", "epochs_done", "diverged_epoch", "error")  # runs.csv's from summary.json


def fmt_stat(st: Stat, col: Column, points: Sequence[float] = ()) -> str:
    """Mean ± 95% CI half-width from MIN_CI_N seeds on; below that the mean and its points."""
    if st.mean is None:
        return "–"
    if col.metric in COUNTS:
        text = f"{st.mean:,.0f}"
        return text if not st.sd else f"{text} ± {st.ci:,.0f}" if st.ci is not None else text
    text = f"{st.mean * col.scale:.{col.digits}f}"
    if st.n < MIN_CI_N:
        shown = ", ".join(f"{v * col.scale:.{col.digits}f}" for v in points) if st.n > 1 else ""
        return f"{text} ({shown})" if shown else text
    return text if st.ci is None else f"{text} ± {st.ci * col.scale:.{col.digits}f}"


def _fmt_ref(value: float, col: Column) -> str:
    if col.metric in COUNTS:
        return f"{value:,.0f}"
    return f"{value:.{col.digits if col.scale == 100 else 0}f}"  # a percent as shown, else whole


def _n_text(cell: Cell) -> str:
    counts = {"diverged": len(cell.diverged),
              **{s.value: sum(r.status == s for r in cell.other) for s in (Status.FAILED, Status.PRUNED)}}
    extra = ", ".join(f"{n} {status}" for status, n in counts.items() if n)
    return f"{cell.n} (+{extra})" if extra else str(cell.n)


def difference_text(c: Comparison | None, scale: float = 100.0) -> str:
    """E.g. "+2.85 pp, not resolved at n = 3: [-4.10, +9.80] pp (Welch p=0.31; points 12.1, 13.0 vs ...)"."""
    if c is None:
        return "not run"
    if c.diff is None or c.interval is None:
        return c.text if c.diff is None else f"{c.diff * scale:+.2f} pp, {c.text}"
    (na, nb), (lo, hi) = c.n, (v * scale for v in c.interval)
    n = f"{na}" if na == nb else f"{na} / {nb}"
    text = f"{c.diff * scale:+.2f} pp, {c.verdict} at n = {n}: [{lo:+.2f}, {hi:+.2f}] pp"
    extra = [] if c.p is None else [f"Welch p={c.p:.3g}"]
    if max(na, nb) <= MAX_POINTS:
        a, b = (", ".join(f"{v * scale:.1f}" for v in side) for side in c.points)
        extra.append(f"points {a} vs {b}")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def display(table: Table) -> tuple[list[str], list[list[str]]]:
    """Header and rows of strings, as shown in HTML and Markdown (the first MAX_HTML_ROWS rows)."""
    header, _, lines = _lines(table, table.rows[:MAX_HTML_ROWS])
    return header, [shown for shown, _ in lines]


def records(table: Table) -> tuple[list[str], list[list[Any]]]:
    """Header and rows with numbers (CSV, W&B): mean, CI half-width and n of each metric."""
    _, header, lines = _lines(table, table.rows)
    return header, [numbers for _, numbers in lines]


def _lines(table: Table, rows: Sequence[Row]) -> tuple[list[str], list[str], list[tuple[list, list]]]:
    """One column spec for both: the shown header, the numbers' header, and per row (shown, numbers)."""
    study = table.kind == "study"
    extra = study and any(r.extra for r in table.rows)  # shown only when some row differs
    shown = (["row"] + ["other settings"] * extra) if study else list(table.setting_columns or ["experiment"])
    numbers = ["row", "other_settings"] if study else list(table.setting_columns)
    shown += ["experiment"] * table.show_experiment + ["n"]
    numbers += ["experiment", "n", "n_diverged", "n_failed_or_pruned"]
    for col in table.columns:
        base = col.metric.replace("/", "_")
        shown += [col.title] + (["study", "ours − study"] if col.metric == table.primary and study else [])
        numbers += [f"{base}_mean", f"{base}_ci95", f"{base}_n"] + [f"{base}_study"] * study
    shown.append("comparison")
    numbers += ["vs", "vs_diff", "vs_ci95_low", "vs_ci95_high", "vs_p", "vs_verdict", "study_vs_diff"]
    return shown, numbers, [_line(table, row, extra) for row in rows]


def _line(table: Table, row: Row, extra: bool) -> tuple[list[str], list[Any]]:
    cell, study = row.cell, table.kind == "study"
    if study:
        shown, numbers = [row.label] + [row.extra] * extra, [row.label, row.extra]
    else:  # the experiment where there are no setting columns; the numbers have it in its own column
        shown = _setting_values(table, cell)
        numbers = list(shown) if table.setting_columns else []
    shown += [cell.experiment if cell else ""] * table.show_experiment
    shown.append(_n_text(cell) if cell else "not run")
    numbers += [cell.experiment, cell.n, len(cell.diverged), len(cell.other)] if cell else ["", 0, 0, 0]
    for col in table.columns:
        st, points, never = cell_stat(row, col.metric)
        ref = row.ref.ref.get(col.metric) if row.ref else None
        numbers += [None if st.mean is None else st.mean * col.scale,
                    None if st.ci is None else st.ci * col.scale, st.n] + [ref] * study
        text = fmt_stat(st, col, points)
        if never:
            text = _never_text(row, never, never + st.n,
                               "" if st.mean is None else f"{text} ({st.n} of {never + st.n}); ")
        if col.metric == table.primary and study:
            none = NO_STUDY_NUMBER if row.no_study else ""
            shown += [text, none if ref is None else _fmt_ref(ref, col),
                      f"{st.mean * col.scale - ref:+.2f}" if ref is not None and st.mean is not None else ""]
        elif ref is not None and not (col.metric == "test/acc" and table.primary == "test/err"):
            shown.append(f"{text} (study {_fmt_ref(ref, col)})")
        else:
            shown.append(text)
    c = row.comparison
    low, high = (None, None) if c is None or c.interval is None else (v * 100.0 for v in c.interval)
    numbers += [row.vs or "", None if c is None or c.diff is None else c.diff * 100.0, low, high,
                None if c is None else c.p, "" if c is None else c.verdict, row.study_diff]
    if row.vs is None:
        return shown + [""], numbers
    study_diff = "" if row.study_diff is None else f"; study {row.study_diff:+.2f} pp"
    primary = next(c for c in COLUMNS if c.metric == table.primary)
    return shown + [f"vs {row.vs}: {difference_text(c, primary.scale)}{study_diff}"], numbers


def _never_text(row: Row, never: int, total: int, before: str) -> str:
    """The runs that did not reach the threshold: cut while still improving, or never."""
    cut, rest = len(row.cut), never - len(row.cut)
    steps = "/".join(f"{v:,.0f}" for v in sorted(set(row.cut)))
    parts = [f"cut at {steps} steps, still improving ({cut} of {total})"] * bool(cut)
    return before + "; ".join(parts + [f"never ({rest} of {total})"] * bool(rest))


def _setting_values(table: Table, cell: Cell | None) -> list[str]:
    if cell is None:
        return [""] * len(table.setting_columns)
    if not table.setting_columns:
        return [cell.experiment]
    values, overrides = [], override_map(cell)
    for key in table.setting_columns:
        if key == "trial":
            values.append(cell.trials)
        elif key in overrides:
            values.append(round_text(overrides[key]))
        else:
            value = cell.setting(key) if key in cell.choices or "." not in key else None
            values.append("" if value is None else fmt_value(value))
    return values


def pair_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """The study's own comparisons (Table.pairs): ours by Welch's test next to the study's difference."""
    col = next(c for c in COLUMNS if c.metric == table.primary)
    header = ["comparison", f"ours ({col.title}, difference, 95% interval, Welch)", "study difference"]
    return header, [[f"{pair.row} vs {pair.base}", difference_text(pair.comparison, col.scale),
                     "" if pair.study_diff is None else f"{pair.study_diff:+.2f} pp"] for pair in table.pairs]


def headlines(tables: Sequence[Table]) -> list[tuple[str, str]]:
    """The answer, first on the page: per comparison of a table (a search: its best trial) one line
    with the difference, its 95% interval, n and the budget; and the figure that shows it."""
    out: list[tuple[str, str]] = []
    for table in tables:
        figure = table.figures[0][1] if table.figures else ""
        col = next(c for c in COLUMNS if c.metric == table.primary)
        best = table.rows[0].cell if table.rows else None
        if best is not None and best.trials:
            text = (f"{used(table.cells)}: best of {len(table.rows)} trials: trial {best.trials}, best "
                    f"validation accuracy {_stat_text(best, 'val/best_acc')}%, {col.title} "
                    f"{_stat_text(best, table.primary)}, {_stat_text(best, 'train/steps')} steps")
            out.append((text, figure))
            continue
        for row in table.rows:
            c = row.comparison
            many = row.vs == "best" and len(table.rows) > 3  # each row vs the best: no single answer
            if c is None or c.interval is None or row.cell is None or many:
                continue
            name = row.label + (f" ({row.extra})" if row.extra else "")
            out.append((_headline(f"{name} vs {row.vs}", c, col, [row.cell]), figure))
        out += [(_headline(f"{pair.row} vs {pair.base}", pair.comparison, col, pair.cells), figure)
                for pair in table.pairs if pair.cells and pair.comparison.interval is not None]
    return out[:MAX_HEADLINES]


def _headline(name: str, c: Comparison, col: Column, cells: Sequence[Cell]) -> str:
    """One comparison's answer: the difference, its interval, n, the budget and the data."""
    lo, hi = (v * col.scale for v in c.interval)
    steps = dict.fromkeys(_stat_text(cell, "train/steps") for cell in cells)
    budget = f"{' / '.join(steps)} steps" + (" each" if len(steps) == 1 else "")
    return (f"{name}: {col.title.removesuffix(' %')} {c.diff * col.scale:+.2f} pp [95% CI {lo:+.2f}, "
            f"{hi:+.2f}] ({c.verdict}), n = {c.n[0]} / {c.n[1]}, {budget} — {used(list(cells))}")


def _stat_text(cell: Cell, metric: str) -> str:
    return fmt_stat(cell.stat(metric), next(c for c in COLUMNS if c.metric == metric))


def mechanism_rows(table: Table) -> tuple[list[str], list[list[str]]]:
    """Study 000 section 9: a line per norm and lr, then per norm (normbench.report.mechanism)."""
    header = ["norm", "lr", "runs", "test acc %", "training-loss range (after epoch 1)", "study",
              "gradient cosine (mean)", "study", "gradient predictiveness (mean max ‖Δ∇L‖)",
              "β-smoothness mean / max", "Lipschitz along the path median / max", "β, Lipschitz vs plain",
              "gradient variance (relative)", "trains / effective lrs"]
    rows = []
    for m in table.mechanism:
        loss = f"[{m.loss_range[0]:.2f}, {m.loss_range[1]:.2f}]" if m.loss_range else f"no {STEPS}"
        if isinstance(m, NormLine):
            ref, none = m.study, NO_STUDY_NUMBER if m.no_study else ""
            lo_hi = ref.get("loss_range")
            study_range = f"[{lo_hi[0]:g}, {lo_hi[1]:g}]" if lo_hi else none
            rows.append([m.norm, f"all {len(m.lrs)}", str(m.runs), "", loss, study_range, "per lr",
                         f"{ref['grad_cos']:g}" if "grad_cos" in ref else none, "per lr", "per lr", "per lr",
                         _study_direction(table, m), "per lr", _effective_text(m.effective_lrs, m.lrs)])
            continue
        rows.append([m.norm, "" if m.lr is None else f"{m.lr:g}", str(m.runs),
                     "" if m.test_acc is None else f"{m.test_acc * 100:.2f}", loss, "",
                     _probe(".2f", m.grad_cos), "", _probe(".3g", m.grad_pred),
                     _probe(".3g", m.beta_mean, m.beta_max),
                     _probe(".3g", m.lipschitz_median, m.lipschitz_max),
                     m.vs_plain, _probe(".3g", m.grad_var_rel), "yes" if m.trains else "no"])
    return header, rows


def _study_direction(table: Table, line: NormLine) -> str:
    """The study's direction of the Lipschitz estimate against plain (its magnitude does not compare)."""
    ours = line.study.get("lipschitz")
    plain = table.study.mechanism.get("none", {}).get("lipschitz") if ours is not None else None
    if ours is None or plain is None or line.norm == "plain":
        return NO_STUDY_NUMBER if line.no_study else ""
    return f"study: Lipschitz {'lower' if ours < plain else 'higher'}"


def _probe(spec: str, *values: float | None) -> str:
    return "no probes" if values[0] is None else " / ".join(f"{v:{spec}}" for v in values)


def _effective_text(effective: list[float], lrs: list[float]) -> str:
    if not effective:
        return f"none of {len(lrs)}"
    lo, hi = min(effective), max(effective)
    span = f"{lo:g}" if lo == hi else f"{lo:g}–{hi:g} (×{hi / lo:.3g})"
    return f"{span}, {len(effective)} of {len(lrs)} lrs"


def _view(table: Table) -> SimpleNamespace:
    """A table's strings as the page and the Markdown show them."""
    header, rows = display(table)
    numbers = {c.title for c in COLUMNS} | {"n", "study", "ours − study"}
    return SimpleNamespace(
        table=table, header=header, rows=rows,
        title=(f"{table.name} — {table.title}" + (f" (study {table.study.study})" if table.study else "")
               + (f" — {used(table.cells)}" if table.cells else "")),
        numeric={i for i, h in enumerate(header) if h in numbers},  # right-aligned
        not_run={i for i, row in enumerate(table.rows[:len(rows)]) if row.cell is None},
        pairs=pair_rows(table) if table.pairs else None,
        mechanism=mechanism_rows(table) if table.mechanism else None,
        notes=(table.notes + [f"⚠ {f}" for f in table.flags]  # as the Markdown quotes them
               + [table.convergence_note] * bool(table.convergence_note)))


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("normbench.report"), trim_blocks=True,
                             autoescape=jinja2.select_autoescape(("html.j2",)), lstrip_blocks=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["md"] = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
    env.globals.update(max_rows=MAX_HTML_ROWS, max_skipped=MAX_SKIPPED_LISTED,
                       max_warnings=MAX_WARNINGS_LISTED)
    return env


def _heading(study: str | None, views: list[SimpleNamespace]) -> str:
    """A section's heading: the study's title on its data, else the data and models actually run."""
    cells = [c for v in views for c in v.table.cells]
    if study is None or all(on_study_data(c) for c in cells):
        return STUDY_TITLES[study] if study else "Other runs"
    return f"Study {study}'s comparisons, run on {used(cells)}"


def write_files(out: str, tables: list[Table], result: ScanResult, warnings: list[str], title: str) -> None:
    """Every table's CSV (csv writes None as "" and a float as its repr: full precision), runs.csv, then
    index.html and report.md from templates/."""
    for table in tables:
        header, rows = records(table)
        with open(os.path.join(out, "tables", f"{table.name}.csv"), "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows([header, *rows])
    write_runs_csv(result, os.path.join(out, "runs.csv"))
    views = [_view(t) for t in tables]
    sections = [(_heading(study, group), group) for study in ("000", "002", None)
                if (group := [v for v in views if (v.table.study.study if v.table.study else None) == study])]
    for name in ("index.html", "report.md"):
        atomic_write_text(Path(out, name), _environment().get_template(f"{name}.j2").render(
            title=title, result=result, views=views, sections=sections, warnings=warnings,
            headlines=headlines(tables)))


def write_runs_csv(result: ScanResult, path: str) -> None:
    choices = [f"choice/{k}" for k in dict.fromkeys(k for run in result.runs for k in run.choices)]
    metrics = [f"metric/{k}" for k in dict.fromkeys(k for run in result.runs for k in run.metrics)]
    header = ["path", "identity", "status", "experiment", *choices, "overrides", *metrics, *SUMMARY_COLUMNS,
              "skipped", "skip_reason"]
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, header, restval="")
        w.writeheader()
        w.writerows({"path": run.path, "identity": run.identity, "status": run.status,
                     "experiment": run.experiment, "overrides": " ".join(run.overrides),
                     **{f"choice/{k}": v for k, v in run.choices.items()},
                     **{f"metric/{k}": v for k, v in run.metrics.items()},
                     **{k: run.summary.get(k) for k in SUMMARY_COLUMNS}} for run in result.runs)
        w.writerows({"path": sk.path, "status": Status.RUNNING.value if sk.kind == "in progress" else "",
                     "skipped": sk.kind, "skip_reason": sk.reason} for sk in result.skipped)
