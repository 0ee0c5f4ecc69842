"""The report's tables: study tables (the studies' rows, matched by settings) and generic tables.
Numbers only: normbench.report.render formats them."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from operator import attrgetter
from typing import Any

from normbench.identity import SEED
from normbench.record import CONFIG, LEARN_MARGIN, learned_threshold
from normbench.report.mechanism import LrLine, NormLine
from normbench.report.records import Cell, budget_notes, group_by
from normbench.report.reference import MODEL_VARIANTS, STUDY_TABLES, TABLES_BY_NAME, RefRow, StudyTable
from normbench.report.stats import Comparison, Stat, mean_ci, welch

ALPHA = 0.05
MAX_NEAREST = 50  # comparison partner searched among at most this many cells when no exact counterpart
MIN_CI_N = 3  # below this many seeds a cell shows its points, not a t-interval (t_{0.975,1} = 12.7)
# Steps to threshold (docs/report.md): a fraction of the table's best validation accuracy, so that the
# rows share one stated accuracy; a last epoch best by IMPROVING_MARGIN: cut by its budget, still improving.
CONVERGED_FRACTION = 0.99
IMPROVING_MARGIN = 0.005
# choice keys that select a study row and so are the row, not a setting to show (conf/vgg_best_row)
ROW_SELECTORS = {"vgg_best_row"}


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
    Column("convergence/steps", "steps to threshold", 1.0, 0),
    Column("train/steps", "steps", 1.0, 0),
    Column("train/images", "images", 1.0, 0),
    Column("model/params", "params", 1.0, 0),
    Column("memory/peak_mb", "peak memory MB", 1.0, 0),
    Column("time/total_s", "time s", 1.0, 1),
)
# Both studies report CIFAR-10 only: a row run on other data has no study number to compare with.
STUDY_DATA = "cifar10"
NO_STUDY_NUMBER = "no study number for this dataset"


@dataclass
class Row:
    label: str
    cell: Cell | None  # None: a study row no run covers
    ref: RefRow | None = None
    extra: str = ""  # settings that vary between the table's cells and the row does not fix
    vs: str | None = None
    comparison: Comparison | None = None
    study_diff: float | None = None  # study: ref(row) - ref(vs), in the primary metric's percent
    no_study: bool = False  # the cell ran on other data than the study's: its numbers are left out
    # the steps to the table's threshold of each of the cell's runs (None: never); None: not computed
    convergence: list[float | None] | None = None
    cut: list[float] = field(default_factory=list)  # steps of the runs cut while still improving


@dataclass
class Pair:
    """One of the study's comparisons besides a row's `vs` (study 002: bs 8 vs bs 64, LN vs BN, ...)."""

    row: str
    base: str
    comparison: Comparison | None  # None: one side not run
    study_diff: float | None
    cells: tuple[Cell, ...] = ()  # the two sides' cells, when both ran


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
    mechanism: list[LrLine | NormLine] = field(default_factory=list)  # normbench.report.mechanism
    figures: list[tuple[str, str]] = field(default_factory=list)  # (caption, path relative to out dir)
    filters: list[tuple[str, str]] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # the study's own inconsistencies about these numbers
    pairs: list[Pair] = field(default_factory=list)
    convergence_note: str = ""

    @property
    def cells(self) -> list[Cell]:
        return [r.cell for r in self.rows if r.cell is not None]

    @property
    def columns(self) -> list[Column]:
        return [c for c in COLUMNS if c.metric != "test/acc" or self.primary == "test/acc"]


def _same(value: Any, wanted: Any) -> bool:
    if isinstance(wanted, (bool, str)):
        return value is not None and str(value) == str(wanted)
    try:  # numbers (a bool is not one) compare as floats
        return not isinstance(value, bool) and math.isclose(float(value), float(wanted), rel_tol=1e-9,
                                                            abs_tol=1e-12)
    except (TypeError, ValueError):
        return False


def matches(cell: Cell, settings: dict[str, Any]) -> bool:
    # string settings first: numeric ones may need the run's config.yaml
    for key in sorted(settings, key=lambda k: not isinstance(settings[k], str)):
        value = cell.setting(key)
        if key == "model" and isinstance(value, str):  # a smaller variant fills the full model's rows
            value = MODEL_VARIANTS.get(value, value)
        if not _same(value, settings[key]):
            return False
    return True


def _varying(cells: Sequence[Cell], skip: set[str]) -> tuple[list[str], set[str]]:
    """Choice keys and override keys whose value differs between the cells."""
    keys = [k for k in dict.fromkeys(k for cell in cells for k in cell.choices)
            if k not in skip and k not in ROW_SELECTORS and len({repr(c.setting(k)) for c in cells}) > 1]
    per_cell = [override_map(c) for c in cells]
    return keys, {k for k in {k for m in per_cell for k in m} if len({m.get(k) for m in per_cell}) > 1}


def override_map(cell: Cell) -> dict[str, str]:
    pairs = (o.lstrip("+~").split("=", 1) for o in cell.value_overrides if "=" in o)
    return {k: v for k, v in pairs if k not in ROW_SELECTORS}


def _every_row_note(cells: Sequence[Cell]) -> list[str]:
    """The overrides every cell shares with the same value, shown once above the table."""
    first, *maps = [override_map(c) for c in cells] or [{}]
    shared = [f"{k}={round_text(v)}" for k, v in sorted(first.items()) if all(m.get(k) == v for m in maps)]
    return ["Every row also: " + " ".join(shared)] if shared else []


def fmt_value(value: Any) -> str:
    """A setting for people: floats to 4 significant digits (0.0012345678 -> 0.001235)."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def round_text(text: str) -> str:
    try:
        number = float(text)
    except ValueError:
        return text
    return text if number.is_integer() and "." not in text and "e" not in text.lower() else f"{number:.4g}"


def _extra_label(cell: Cell, keys: Sequence[str], overrides: set[str]) -> str:
    parts = [f"{k}={fmt_value(v)}" for k in keys if (v := cell.setting(k)) is not None]
    mine = override_map(cell)
    parts.extend(f"{k}={round_text(mine[k])}" if k in mine else f"{k}=(default)" for k in sorted(overrides))
    return " ".join(parts)


def _counterpart_key(cell: Cell, defining: set[str]) -> tuple:
    others = tuple(sorted((k, repr(v)) for k, v in cell.choices.items() if k not in defining))
    return (cell.experiment, others, cell.value_overrides)


def _closest(cell: Cell, candidates: Sequence[Cell], index: dict[tuple, Cell],
             defining: set[str]) -> Cell | None:
    """The exact counterpart (same everything but the defining settings), else the candidate sharing most
    settings (same experiment preferred) among at most MAX_NEAREST (a large search has no nearest)."""
    exact = index.get(_counterpart_key(cell, defining))
    if exact is not None or not candidates or len(candidates) > MAX_NEAREST:
        return exact

    def distance(other: Cell) -> tuple[int, int]:
        keys = set(cell.choices) | set(other.choices)
        d = sum(1 for k in keys if cell.choices.get(k) != other.choices.get(k))
        d += len(set(cell.value_overrides) ^ set(other.value_overrides))
        return (d, 0 if other.experiment == cell.experiment else 1)

    return min(candidates, key=distance)


def _compare(a: Cell, b: Cell, metric: str) -> Comparison:
    return welch(a.values(metric), b.values(metric), alpha=ALPHA)


def _study_diff(st: StudyTable, a: RefRow, b: RefRow) -> float | None:
    return a.ref[st.primary] - b.ref[st.primary] if st.primary in a.ref and st.primary in b.ref else None


def _first_cells(table: Table) -> dict[str, Cell]:
    """Row label -> the first cell of the rows with that label."""
    return {row.label: row.cell for row in reversed(table.rows) if row.cell is not None}


def _compare_pairs(st: StudyTable, table: Table) -> None:
    """The study's extra comparisons: the first cell of each side (same other settings when several)."""
    first = _first_cells(table)
    for a, b in st.pairs:
        ca, cb = first.get(a), first.get(b)
        cmp = _compare(ca, cb, st.primary) if ca is not None and cb is not None else None
        table.pairs.append(Pair(a, b, cmp, _study_diff(st, st.row(a), st.row(b)), (ca, cb) if cmp else ()))


def add_convergence(table: Table) -> None:
    """Each run's steps to the table's threshold into its row's ``convergence`` (None: never, or never
    learns); a run that does not get there but was still improving also into ``cut``."""
    runs = [(row, run) for row in table.rows if row.cell is not None for run in row.cell.runs]
    curves = {id(run): run.val_curve() for _, run in runs}
    best = max((acc for curve in curves.values() for _, acc in curve), default=None)
    if best is None:
        return
    threshold = CONVERGED_FRACTION * best
    unknown = 0
    for row, run in runs:
        curve, classes = curves[id(run)], run.num_classes
        unknown += classes is None
        learned = bool(curve) and (classes is None
                                   or max(acc for _, acc in curve) > learned_threshold(classes))
        steps = next((s for s, acc in curve if acc >= threshold), None) if learned else None
        row.convergence = (row.convergence or []) + [steps]
        accs = [acc for _, acc in curve]
        if steps is None and learned and len(accs) > 1 and accs[-1] >= max(accs[:-1]) + IMPROVING_MARGIN:
            row.cut.append(curve[-1][0])
    table.convergence_note = (
        f"steps to threshold: the optimizer steps after which validation accuracy first reaches "
        f"{100 * threshold:.2f}% ({CONVERGED_FRACTION:.0%} of this table's best, {100 * best:.2f}%), counted "
        "at epoch ends; 'cut at N steps, still improving' for a run whose budget ended while its validation "
        "accuracy still rose; 'never' for a run that does not get there or does not learn (best validation "
        f"accuracy not above chance + {100 * LEARN_MARGIN:g} points).")
    if unknown:
        table.convergence_note += (f" {unknown} run(s) without data.num_classes in their {CONFIG}: not "
                                   "checked for learning.")


def study_table(st: StudyTable, cells: Sequence[Cell]) -> Table | None:
    """The study table's rows filled with the cells that match them (None when no cell does)."""
    assigned = _assign(st, cells)
    if not assigned:
        return None
    covered = [c for group in assigned.values() for c in group]
    fixed = set(st.context) | {k for r in st.rows for k in r.settings} | {SEED}
    extra_keys, extra_overrides = _varying(covered, fixed)
    table = Table(st.name, st.title, "study", st.primary, [], study=st)
    table.show_experiment = len({c.experiment for c in covered}) > 1
    for ref in st.rows:
        group = assigned.get(ref.label, [])
        if not group:
            table.rows.append(Row(ref.label, None, ref, vs=ref.vs))
        for cell in sorted(group, key=lambda c: _extra_label(c, extra_keys, extra_overrides)):
            extra = _extra_label(cell, extra_keys, extra_overrides)
            table.rows.append(Row(ref.label, cell, ref, extra, ref.vs))
    _compare_rows(st, table)
    _compare_pairs(st, table)
    for row in table.rows:
        if row.cell is not None and not on_study_data(row.cell):
            row.ref, row.study_diff, row.no_study = replace(row.ref, ref={}), None, True
        elif row.cell is not None and not _study_model(row.cell, st):
            row.ref = replace(row.ref, ref={k: v for k, v in row.ref.ref.items() if k != "model/params"})
    table.notes.extend(_notes(st, covered) + _every_row_note(covered) + _contrasts(st, table)
                       + budget_notes(covered))
    if not all(r.no_study for r in table.rows if r.cell is not None):  # notes on numbers the table shows
        table.flags.extend(st.flags)
    add_convergence(table)
    return table


def assign_to_tables(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """Study table name -> the cells it shows, each cell in at most one: one sweep, one table
    (docs/report.md): a preset's runs go to its table, another experiment's to the first that fits all."""
    out: dict[str, list[Cell]] = {}
    for exp, same in group_by(cells, attrgetter("experiment")).items():
        if exp in TABLES_BY_NAME:
            matched = [c for c in same if _row_of(TABLES_BY_NAME[exp], c) is not None]
            out.setdefault(exp, []).extend(matched)
            continue
        st = next((st for st in STUDY_TABLES if all(_row_of(st, c) is not None for c in same)), None)
        if st is not None:
            out.setdefault(st.name, []).extend(same)
    return out


def _row_of(st: StudyTable, cell: Cell) -> RefRow | None:
    if not matches(cell, st.context):
        return None
    return next((ref for ref in st.rows if matches(cell, ref.settings)), None)


def on_study_data(cell: Cell) -> bool:
    return str(cell.choices.get("data", STUDY_DATA)) == STUDY_DATA


def _study_model(cell: Cell, st: StudyTable) -> bool:
    """The study's own model (not a smaller variant): parameter and memory numbers compare only then."""
    return "model" not in st.context or str(cell.choices.get("model")) == st.context["model"]


def _assign(st: StudyTable, cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    """Row label -> the cells whose first matching row it is (only the table's own preset's, where any)."""
    rows = {id(cell): ref for cell in cells if (ref := _row_of(st, cell)) is not None}
    assigned = group_by((c for c in cells if id(c) in rows), lambda c: rows[id(c)].label)
    return {label: [c for c in same if c.experiment == st.name] or same for label, same in assigned.items()}


def _compare_rows(st: StudyTable, table: Table) -> None:
    """Each row with a `vs` row: the study's difference, and ours by Welch's test against the counterpart."""
    by_label = {label: [r.cell for r in rows] for label, rows in
                group_by((r for r in table.rows if r.cell is not None), attrgetter("label")).items()}
    indexes: dict[str, tuple[set[str], dict[tuple, Cell]]] = {}
    for row in table.rows:
        if row.vs is None:
            continue
        vs_ref = st.row(row.vs)
        row.study_diff = _study_diff(st, row.ref, vs_ref)
        if row.cell is None:
            continue
        candidates = by_label.get(row.vs, [])
        if row.label not in indexes:  # the first candidate with a key is its counterpart
            defining = set(row.ref.settings) | set(vs_ref.settings) | {SEED}
            indexes[row.label] = (defining, {_counterpart_key(c, defining): c for c in reversed(candidates)})
        defining, index = indexes[row.label]
        other = _closest(row.cell, candidates, index, defining)
        if other is not None:
            row.comparison = _compare(row.cell, other, st.primary)
        elif candidates:
            row.comparison = Comparison(None, None, None, "cannot tell",
                                        "no run with the same other settings")


def _notes(st: StudyTable, covered: Sequence[Cell]) -> list[str]:
    """Where the runs differ from the study's setup (data, a smaller model variant), and the study's note."""
    notes = []
    data = {str(c.choices.get("data")) for c in covered if c.choices.get("data") is not None}
    if data - {STUDY_DATA}:
        notes.append(f"These runs used data={', '.join(sorted(data))}; the study reports CIFAR-10 only, so "
                     f"their rows show {NO_STUDY_NUMBER}.")
    variants = sorted({str(c.choices.get("model")) for c in covered} & set(MODEL_VARIANTS))
    if variants:
        notes.append(f"These runs used model={', '.join(variants)}, a smaller variant; the study's numbers "
                     f"are for {st.context.get('model', 'the full model')}.")
    if st.note and any(on_study_data(c) for c in covered):
        notes.append(st.note)
    return notes


def _contrasts(st: StudyTable, table: Table) -> list[str]:
    """The study's relative claims (parameters, memory) beside ours, only when every run is of the study's
    model on its data."""
    out, first = [], _first_cells(table)
    if not all(on_study_data(c) and _study_model(c, st) for c in table.cells):
        return []
    for con in st.contrasts:
        a, b = first.get(con.row), first.get(con.base)
        ours = "not measured"
        if a is not None and b is not None:
            ma, mb = a.stat(con.metric).mean, b.stat(con.metric).mean
            if ma is not None and mb:
                ours = f"{(ma / mb - 1.0) * 100.0:+.3g}%"
        out.append(f"{con.text} ({con.row} vs {con.base}, {con.metric}): ours {ours}, "
                   f"study +{con.percent:g}%.")
    return out


def generic_tables(cells: Sequence[Cell], shown: set[int]) -> list[Table]:
    """A table per experiment of the cells no study table shows, one row per cell."""
    by_exp = group_by((c for c in cells if id(c) not in shown), attrgetter("experiment"))  # each in one table
    tables = []
    for exp in sorted(by_exp):
        group = by_exp[exp]
        if exp in TABLES_BY_NAME:
            name, title = f"{exp}_other", f"{exp}: runs that match no row of the study table"
        else:
            name, title = exp, f"experiment {exp}: runs grouped by their varying choices"
        keys, overrides = _varying(group, {SEED})
        group.sort(key=lambda c: tuple(_sort_key(c.setting(k)) for k in keys) + c.value_overrides)
        table = Table(slug(name), title, "generic", "test/err", [])
        table.setting_columns = keys + sorted(overrides)
        search = any(c.trials for c in group)
        if search:  # its trials by objective (1 - best val acc), best first, and compared with the first
            table.title = f"search {exp}: trials sorted by objective (1 − best validation accuracy)"
            group.sort(key=lambda c: _sort_key(c.stat("objective").mean))
            table.setting_columns.insert(0, "trial")
        if keys or overrides:
            table.notes.extend(_every_row_note(group))
        else:
            first = group[0]
            shared = [*(f"{k}={v}" for k, v in first.choices.items() if k != SEED), *first.value_overrides]
            table.notes.append("All runs share the settings " + " ".join(shared))
        table.notes.extend(budget_notes(group))
        best = group[0] if search else min((c for c in group if c.stat("test/err").mean is not None),
                                           key=lambda c: c.stat("test/err").mean, default=None)
        for cell in group:
            label = _extra_label(cell, keys, overrides) or exp
            row = Row(f"trial {cell.trials}: {label}" if cell.trials else label, cell)
            if best is not None and cell is not best:
                row.vs, row.comparison = "best", _compare(cell, best, "test/err")
            table.rows.append(row)
        if best is not None and len(group) > 1:
            which = f"trial {best.trials}, the best objective" if search else "the lowest mean test error"
            label = _extra_label(best, keys, overrides)
            table.notes.append(f"'vs best' compares each row with {which} ({label}).")
        if not overrides and not search:
            _norm_batch_pairs(table, keys)
        add_convergence(table)
        tables.append(table)
    return tables


def _norm_batch_pairs(table: Table, keys: Sequence[str]) -> None:
    """Study 002's comparisons for any model and data, when norm and batch size are all a sweep varies:
    each norm at its smallest vs its largest batch size, and GN and batch renorm vs BN at each size."""
    if sorted(keys) != ["batch_size", "norm"]:
        return
    rows = {(row.cell.setting("norm"), row.cell.setting("batch_size")): row for row in table.rows if row.cell}
    batches = sorted({batch for _, batch in rows})
    wanted = [((norm, batches[0]), (norm, batches[-1])) for norm in dict.fromkeys(n for n, _ in rows)]
    wanted += [((norm, batch), ("bn", batch)) for norm in ("gn", "brn") for batch in batches]
    for a, b in wanted:
        if a != b and a in rows and b in rows:
            cells = (rows[a].cell, rows[b].cell)
            comparison = _compare(*cells, table.primary)
            table.pairs.append(Pair(rows[a].label, rows[b].label, comparison, None, cells))


def _sort_key(value: Any) -> tuple:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1 + (value is None), 0.0, str(value))


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "table"


def cell_stat(row: Row, metric: str) -> tuple[Stat, list[float], int]:
    """The statistic shown for a row's metric, its points and (convergence) how many runs never got there."""
    if row.cell is None:
        return Stat(0, None, None, None), [], 0
    if metric == "convergence/steps":
        steps = [v for v in row.convergence or () if v is not None]
        return mean_ci(steps), steps, len(row.convergence or ()) - len(steps)
    return row.cell.stat(metric), row.cell.values(metric), 0


def ci_for_display(st: Stat) -> float | None:
    """The CI half-width a figure may draw: none below MIN_CI_N seeds."""
    return st.ci if st.n >= MIN_CI_N else None


