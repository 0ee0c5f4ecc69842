"""Comparison report over sweep directories: seed tables against the studies, figures, HTML page.

Reads run records only (normbench.report.records); what it writes: docs/report.md."""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from normbench.errors import ConfigError, NormbenchError, warn
from normbench.loggers import wandb_mode
from normbench.record import PROBES, SUMMARY
from normbench.report.mechanism import mechanism
from normbench.report.records import ScanResult, cells_of, scan
from normbench.report.reference import STUDY_TABLES
from normbench.report.render import records, write_files
from normbench.report.tables import Table, assign_to_tables, generic_tables, slug, study_table


def log_wandb(tables: list[Table], result: ScanResult, out: str, project: str, name: str) -> None:
    import wandb

    run = wandb.init(project=project, job_type="report", name=name, dir=out, mode=wandb_mode("auto"),
                     config={"sources": result.roots, "n_records": result.n_records})
    try:
        payload: dict[str, Any] = {}
        for table in tables:
            header, rows = records(table)
            data = [[None if isinstance(v, float) and not math.isfinite(v) else v for v in r] for r in rows]
            payload[f"table/{table.name}"] = wandb.Table(columns=header, data=data)
            for caption, rel in table.figures:
                payload[f"figure/{Path(rel).stem}"] = wandb.Image(os.path.join(out, rel), caption=caption)
        run.log(payload)
        run.summary.update({"report/runs": len(result.runs), "report/skipped": len(result.skipped),
                            "report/tables": len(tables)})
    finally:
        run.finish()


@dataclass
class Report:
    out: str
    tables: list[Table]
    result: ScanResult
    timings: dict[str, float]
    warnings: list[str]


@contextmanager
def _timed(timings: dict[str, float], phase: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[phase] = time.perf_counter() - start


def build(sweep_dirs: Sequence[str], out: str, *, wandb: bool = False, wandb_project: str = "normbench",
          title: str | None = None) -> Report:
    for d in sweep_dirs:
        if not os.path.isdir(d):
            raise ConfigError("sweep_dir", d, "pass existing sweep directories, e.g. multirun/vgg_losses")
    os.makedirs(os.path.join(out, "tables"), exist_ok=True)  # an unusable --out fails before the scan
    timings: dict[str, float] = {}
    with _timed(timings, "scan"):
        result = scan(sweep_dirs)
    with _timed(timings, "tables"):
        cells = cells_of(result.runs)
        assigned = assign_to_tables(cells)
        tables = [t for st in STUDY_TABLES if (t := study_table(st, assigned.get(st.name, []))) is not None]
        tables += generic_tables(cells, {id(c) for t in tables for c in t.cells})
        for table in tables:
            # a study table with the study's mechanism numbers, or any other table with probe records
            probed = any(PROBES in run.files for cell in table.cells for run in cell.runs)
            if table.study.mechanism if table.study else probed:
                table.mechanism = mechanism(table)
    with _timed(timings, "figures"):
        from normbench.report.figures import add_figures  # matplotlib: imported only when figures are drawn

        warnings = add_figures(tables, out)
    warnings = [f"{run.path}: {name} {what}, ignored"  # the files read that were unreadable or malformed
                for run in result.runs for name, what in run.malformed.items()] + warnings
    names = ", ".join(os.path.basename(os.path.normpath(d)) for d in sweep_dirs)
    title = title or f"normbench report: {names}"
    with _timed(timings, "write"):
        write_files(out, tables, result, warnings, title)
    if wandb:
        with _timed(timings, "wandb"):
            log_wandb(tables, result, out, wandb_project, os.path.basename(os.path.normpath(out)))
    return Report(out, tables, result, timings, warnings)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/report.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dirs", nargs="+",
                        help="sweep directories (e.g. multirun/vgg_losses) or run dirs")
    parser.add_argument("--out", help="report directory (default: reports/<sweep name>)")
    parser.add_argument("--title", help="page title")
    parser.add_argument("--wandb", action="store_true", help="also log tables and figures to a W&B run")
    parser.add_argument("--wandb-project", default="normbench", help="W&B project (default: normbench)")
    parser.add_argument("--profile", action="store_true", help="print the time of each phase")
    args = parser.parse_args(argv)
    names = [os.path.basename(os.path.normpath(d)) or "report" for d in args.sweep_dirs]
    out = args.out or os.path.join("reports", slug("+".join(names)))
    try:
        report = build(args.sweep_dirs, out, wandb=args.wandb, wandb_project=args.wandb_project,
                       title=args.title)
    except NormbenchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # --out read-only, full, or a file: nothing half-written stays (atomic writes)
        print(f"normbench: cannot write the report in {out}: {e.filename or out}: [Errno {e.errno}] "
              f"{e.strerror}", file=sys.stderr)
        return 1
    result = report.result
    for skipped in result.skipped:
        if skipped.kind == "malformed":
            warn(f"{os.path.join(skipped.path, SUMMARY)} is skipped ({skipped.reason})")
    print(f"{result.summary_line()}; {len(report.tables)} table(s) -> {os.path.join(out, 'index.html')}")
    if args.profile:
        rate = result.n_records / result.seconds if result.seconds > 0 else float("inf")
        print("profile: " + ", ".join(f"{k} {v:.2f}s" for k, v in report.timings.items())
              + f"; {rate:,.0f} records/s read")
    return 0
