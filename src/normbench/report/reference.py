"""The studies' reported numbers (studies.yaml beside this module), each with the settings it belongs to
(how a run matches them: docs/report.md). Metric keys are the run record's; accuracies and errors in %."""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from typing import Any

import yaml

# Smaller variants of the studies' models (conf/model/): their runs fill the study's tables, and the
# report notes that the study's numbers are for the full model.
MODEL_VARIANTS = {"vgg_a_light": "vgg_a", "alexnet_cifar": "alexnet"}
NORM_LABEL = {"none": "plain", "bn": "BN", "ln": "LN", "gn": "GN"}


@dataclass(frozen=True)
class RefRow:  # one reported number (or several for the same settings) of a study table
    label: str
    settings: dict[str, Any]
    ref: dict[str, float]  # metric -> value in the study's units (see module doc)
    vs: str | None = None  # label of the row this one is compared with (same table)


@dataclass(frozen=True)
class Contrast:  # a relative claim between two rows: metric(row) / metric(base) - 1, in percent
    metric: str
    row: str
    base: str
    percent: float
    text: str


@dataclass(frozen=True)
class StudyTable:
    name: str  # also the sweep preset's name (summary["experiment"])
    study: str  # "000" | "002"
    title: str
    context: dict[str, Any]  # settings every row of the table shares
    rows: tuple[RefRow, ...]
    primary: str = "test/err"  # the metric the study reports for the rows
    note: str = ""
    contrasts: tuple[Contrast, ...] = ()
    mechanism: dict[str, dict[str, Any]] = field(default_factory=dict)  # per norm (study 000, section 9)
    flags: tuple[str, ...] = ()  # where the study contradicts itself about these numbers
    pairs: tuple[tuple[str, str], ...] = ()  # the study's comparisons besides each row's `vs`: (row, base)

    def row(self, label: str) -> RefRow:
        return {r.label: r for r in self.rows}[label]


def _study_table(spec: dict[str, Any]) -> StudyTable:
    """A table of studies.yaml: rows are [label, settings, reference, vs?], contrasts and pairs lists."""
    mechanism = {norm: {k: tuple(v) if isinstance(v, list) else v for k, v in numbers.items()}
                 for norm, numbers in spec.pop("mechanism", {}).items()}
    return StudyTable(**{**spec, "rows": tuple(RefRow(*row) for row in spec["rows"]),
                         "flags": tuple(spec.get("flags", ())), "mechanism": mechanism,
                         "contrasts": tuple(Contrast(*c) for c in spec.get("contrasts", ())),
                         "pairs": tuple(tuple(p) for p in spec.get("pairs", ()))})


_STUDIES = yaml.safe_load(resources.files(__package__).joinpath("studies.yaml").read_text(encoding="utf-8"))
STUDY_TITLES: dict[str, str] = _STUDIES["titles"]
STUDY_TABLES: tuple[StudyTable, ...] = tuple(_study_table(spec) for spec in _STUDIES["tables"])
TABLES_BY_NAME = {t.name: t for t in STUDY_TABLES}
