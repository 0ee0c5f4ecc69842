"""Study 000 section 9's optimisation mechanism per norm and learning rate, from the runs' records
(docs/report.md, "The mechanism table"); the jsonl files are read here, at most MAX_BAND_RUNS per norm."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from normbench.record import Status, learned_threshold
from normbench.report.records import Cell, RunRecord, group_by, num
from normbench.report.reference import NORM_LABEL

MAX_BAND_RUNS = 200
# The training-loss range (study 000 section 9) is taken after the first epoch: every network starts at
# ln(10) = 2.30 on CIFAR-10, above BN's reported upper bound of 1.8, so the study's range cannot include
# the start. A run with a single epoch uses the second half of its steps.
LOSS_RANGE_WARMUP_EPOCHS = 1
EFFECTIVE_LR_FRACTION = 0.9  # an lr is in a norm's effective range at >= 90% of that norm's best test acc
# LrLine field -> (probe key without "probe/", statistic over the runs' finite probe values)
PROBE_STATS = {"grad_cos": ("grad_cos", np.mean), "grad_pred": ("grad_pred", np.mean),
               "beta_mean": ("beta", np.mean), "beta_max": ("beta", np.max),
               "lipschitz_median": ("lipschitz", np.median), "lipschitz_max": ("lipschitz", np.max),
               "grad_var_rel": ("grad_var_rel", np.mean)}


@dataclass
class LrLine:
    """A norm at one learning rate: means (maxima, medians) over its runs' probe steps."""

    norm: str
    lr: float | None
    runs: int
    test_acc: float | None  # a diverged seed counts as chance
    loss_range: tuple[float, float] | None = None
    grad_cos: float | None = None
    grad_pred: float | None = None
    beta_mean: float | None = None
    beta_max: float | None = None
    lipschitz_median: float | None = None
    lipschitz_max: float | None = None
    grad_var_rel: float | None = None
    trains: bool = False  # the lr is in the norm's effective range
    vs_plain: str = ""  # β's and the Lipschitz estimate's direction against plain at the same lr


@dataclass
class NormLine:
    """A norm over all its learning rates, with the study's numbers (``study``; empty off its data)."""

    norm: str
    runs: int
    loss_range: tuple[float, float] | None
    study: dict[str, Any]
    no_study: bool
    effective_lrs: list[float]
    lrs: list[float]
    records: list[RunRecord] = field(default_factory=list, repr=False)  # the runs the figure's band shows


def lr_of(cell: Cell) -> float | None:
    value = cell.setting("lr")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def mechanism(table) -> list[LrLine | NormLine]:
    """Per norm (in NORM_LABEL's order) its LrLines, then its NormLine (table: a tables.Table, which
    holds them, so not imported here)."""
    by_norm = {norm: group_by(cells, lr_of)
               for norm, cells in group_by(table.cells, lambda c: str(c.choices.get("norm"))).items()}
    lines: list[LrLine | NormLine] = []
    plain: dict[float | None, LrLine] = {}
    for norm in sorted(by_norm, key=lambda n: list(NORM_LABEL).index(n) if n in NORM_LABEL else 99):
        no_study = any(r.no_study for r in table.rows
                       if r.cell is not None and r.cell.choices.get("norm") == norm)
        per_lr = by_norm[norm]
        label = NORM_LABEL.get(norm, norm)
        lr_lines = [_lr_line(label, lr, per_lr[lr])
                    for lr in sorted(per_lr, key=lambda v: (v is None, v or 0.0))]
        runs = [r for cells in per_lr.values() for c in cells for r in c.runs + c.diverged][:MAX_BAND_RUNS]
        ranges = [line.loss_range for line in lr_lines if line.loss_range]
        effective = _effective_lrs(lr_lines, _num_classes(runs))
        for line in lr_lines:
            line.trains = line.lr in effective
            if norm == "none":
                plain[line.lr] = line
            elif line.lr in plain:
                line.vs_plain = _direction(line, plain[line.lr])
        lines += lr_lines
        loss_range = (min(r[0] for r in ranges), max(r[1] for r in ranges)) if ranges else None
        study = {} if no_study or table.study is None else table.study.mechanism.get(norm, {})
        lrs = [line.lr for line in lr_lines if line.lr is not None]
        lines.append(NormLine(label, len(runs), loss_range, study, no_study, effective, lrs, runs))
    return lines


def _lr_line(label: str, lr: float | None, cells: Sequence[Cell]) -> LrLine:
    runs = [r for c in cells for r in c.runs + c.diverged][:MAX_BAND_RUNS]
    window = _loss_window(runs)
    line = LrLine(label, lr, len(runs), _mean_acc(runs),
                  (float(min(window)), float(max(window))) if window else None)
    found: dict[str, list[float]] = {key: [] for key, _ in PROBE_STATS.values()}
    classes = _num_classes(runs)
    for run in runs:
        start = _left_chance(run, classes)
        rows = [] if start is None else [r for r in run.probes() if num(r.get("step")) >= start]
        for key, values in found.items():
            values.extend(v for r in rows if math.isfinite(v := num(r.get(f"probe/{key}"))))
    for name, (key, statistic) in PROBE_STATS.items():
        if found[key]:
            setattr(line, name, float(statistic(found[key])))
    return line


def _left_chance(run: RunRecord, classes: int | None) -> float | None:
    """The step ending the run's first epoch above chance, from which its probes measure training, not a
    plateau (0: classes unknown; None: never)."""
    if classes is None:
        return 0.0
    return next((step for step, acc in run.val_curve() if acc > learned_threshold(classes)), None)


def _direction(line: LrLine, plain: LrLine) -> str:
    words = ("?" if a is None or b is None else "lower" if a < b else "higher"
             for a, b in ((line.beta_mean, plain.beta_mean), (line.lipschitz_median, plain.lipschitz_median)))
    return "β {}, Lipschitz {}".format(*words)


def _loss_window(runs: Sequence[RunRecord]) -> list[float]:
    """The finite training losses of the runs' steps after the warm-up (LOSS_RANGE_WARMUP_EPOCHS)."""
    values: list[float] = []
    for run in runs:
        rows = run.steps()
        after = [r for r in rows if num(r.get("epoch")) > LOSS_RANGE_WARMUP_EPOCHS]
        if not after and rows:  # a single-epoch run: its second half
            after = rows[len(rows) // 2:]
        values.extend(v for v in (num(r.get("train/loss")) for r in after) if math.isfinite(v))
    return values


def _num_classes(runs: Sequence[RunRecord]) -> int | None:
    return next((n for run in runs if (n := run.num_classes) is not None), None)


def _mean_acc(runs: Sequence[RunRecord]) -> float | None:
    """Mean test accuracy, a diverged run at chance (it stopped learning; left out when chance is unknown)."""
    classes = _num_classes(runs)
    chance = None if classes is None else 1.0 / classes
    accs = [chance if r.status == Status.DIVERGED else r.metric("test/acc") for r in runs]
    accs = [a for a in accs if a is not None]
    return float(np.mean(accs)) if accs else None


def _effective_lrs(lines: Sequence[LrLine], classes: int | None) -> list[float]:
    """The lrs whose mean test accuracy has learned and reaches EFFECTIVE_LR_FRACTION of the norm's best."""
    accs = [(line.lr, line.test_acc) for line in lines if line.lr is not None and line.test_acc is not None]
    if not accs:
        return []
    floor = EFFECTIVE_LR_FRACTION * max(a for _, a in accs)
    if classes is not None:
        floor = max(learned_threshold(classes), floor)
    return [lr for lr, a in accs if a >= floor]
