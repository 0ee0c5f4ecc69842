"""Hydra callbacks (conf/config.yaml): SweepSummary names the multirun and its swept keys for the jobs and
prints the sweep's closing line; Preflight checks the config before any run or sweep dir exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from normbench.errors import ConfigError, fail, warn
from normbench.identity import SWEPT_KEYS_ENV, sweep_arguments, swept_keys
from normbench.preflight import check_experiment_name, check_launch
from normbench.record import Status
from normbench.sweep.index import SKIPPED, SWEEP_ID_ENV, SweepState, count_outcomes, summary_line

log = logging.getLogger(__name__)
RESULTS_CSV = "results.csv"
RESULT_COLUMNS = ["status", "objective", "test/acc", "steps", "time/total_s"]
MAX_SHOWN = 30  # rows printed; results.csv has them all


def expected_jobs(config: DictConfig) -> int | None:
    """How many jobs the basic sweeper makes of this multirun config (None for other sweepers)."""
    target = OmegaConf.select(config, "hydra.sweeper._target_", default="") or ""
    if not target.endswith("BasicSweeper"):
        return None
    try:
        from normbench.plan import expand_grid

        return len(expand_grid(*sweep_arguments(config)))
    except Exception:  # noqa: BLE001 - the count only refines the summary line
        return None


class JobLogFile(logging.FileHandler):
    """The job's train.log (hydra/job_logging=normbench), opened at its first record, so that a run dir
    that cannot hold it costs the log file, never the sweep (the job's own writes fail the job)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None) -> None:
        super().__init__(filename, mode, encoding, delay=True)

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:
            try:
                self.stream = self._open()
            except OSError as err:
                self.emit = lambda record: None
                if os.access(os.path.dirname(self.baseFilename), os.W_OK):  # else the job says it
                    warn(f"the job log cannot be written: {err}")
                return
        super().emit(record)


class Preflight(Callback):
    def on_run_start(self, config: DictConfig, multirun: bool = False, **kwargs: Any) -> None:
        try:
            check_experiment_name(config.get("experiment_name"))
            if multirun:
                check_launch(config)
        except ConfigError as err:
            fail(err)
        if not multirun:  # a sweep's jobs get their dirs from the sweep (normbench.job.choose_run_dir)
            from normbench.job import claim_run_dir

            claim_run_dir(config)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.on_run_start(config, multirun=True)


class SweepSummary(Callback):
    RATE_KEY = "hydra.callbacks.sweep_summary.max_failure_rate"

    def __init__(self, max_failure_rate: float = 1.0) -> None:
        self.max_failure_rate = max_failure_rate
        self.sweep_id: str | None = None
        self.previous: dict[str, str | None] = {}  # the environment to restore at the end

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        rate = self.max_failure_rate
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            fail(ConfigError(self.RATE_KEY, rate, "a share of the jobs, from 0 (any failure) to 1 (never)"))
        self.previous = {name: os.environ.get(name) for name in (SWEEP_ID_ENV, SWEPT_KEYS_ENV)}
        self.sweep_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        # the swept keys: the jobs' dir and W&B run names put them first (a job sees only its own overrides)
        swept = ",".join(swept_keys(*sweep_arguments(config)))
        os.environ.update({SWEEP_ID_ENV: self.sweep_id, SWEPT_KEYS_ENV: swept})

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.sweep_id is None:
            return
        sweep_dir = str(config.hydra.sweep.dir)
        try:
            print_results(sweep_dir, swept_keys(*sweep_arguments(config)))
        except Exception as err:  # noqa: BLE001 - the table must never hide the closing line
            warn(f"no results table: {err}")
        rows = SweepState(sweep_dir).read_journal(self.sweep_id)
        line = summary_line(sweep_dir, counts := count_outcomes(rows), expected_jobs(config))
        print(line, flush=True)
        log.debug(line)
        for name, previous in self.previous.items():
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous
        ran, failed = sum(counts.values()) - counts[SKIPPED], counts[Status.FAILED]
        if ran and failed / ran > (rate := self.max_failure_rate):  # more failed than asked: exit 1
            fail(f"{failed} of {ran} jobs failed, more than {self.RATE_KEY}={rate}", status=1)


def print_results(sweep_dir: str, swept: list[str]) -> None:
    """Every run of the sweep dir (normbench.load_runs), best objective first, with its swept values:
    printed (the first MAX_SHOWN) and written to results.csv."""
    import pandas as pd
    from rich.console import Console
    from rich.table import Table

    from normbench.api import load_runs
    from normbench.identity import override_key

    runs = load_runs(sweep_dir)
    if runs.empty:
        return
    values = pd.DataFrame([{override_key(o): o.split("=", 1)[1] for o in given if "=" in o}
                           for given in runs["overrides"]], columns=swept)  # the swept keys' values as given
    results = pd.concat([values, runs.reindex(columns=[*RESULT_COLUMNS, "identity", "dir"])], axis=1)
    results = results.sort_values("objective", na_position="last", kind="stable")
    results.to_csv(Path(sweep_dir) / RESULTS_CSV, index=False)
    table = Table(*swept, *RESULT_COLUMNS, title=f"{len(results)} runs in {sweep_dir} (best objective first; "
                  f"all in {RESULTS_CSV})")
    for row in results.iloc[:MAX_SHOWN].to_dict("records"):
        table.add_row(*(_cell(row[column], column) for column in [*swept, *RESULT_COLUMNS]))
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # a log file: no 80-column cut


def _cell(value, column: str) -> str:
    if value is None or value != value:  # noqa: PLR0124 - NaN: pandas' missing value
        return "-"
    if isinstance(value, float):  # steps and seconds whole (one decimal), metrics to 4 decimals
        return f"{value:.{ {'steps': 0, 'time/total_s': 1}.get(column, 4) }f}"
    with contextlib.suppress(ValueError):  # a swept number as given on the command line: 4 digits
        return f"{float(value):.4g}" if "." in str(value) else str(value)
    return str(value)
