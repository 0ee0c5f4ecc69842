"""The Python API for notebooks (docs/api.md): `train` runs one configuration in-process as bench/train.py
does; `load_runs` reads run records into a pandas DataFrame. torch, Hydra and pandas are imported inside."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from normbench.record import METRICS, REJECTED, SEEDLESS_IDENTITY, WANDB_RUN_ID, read_json, read_jsonl

if TYPE_CHECKING:
    import pandas as pd

# bench/train.py composes `../conf` from its own dir: the repository's conf/ beside bench/ and src/
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"


@dataclass
class TrainResult:
    run_dir: Path  # the run's record
    summary: dict  # its summary.json
    metrics: pd.DataFrame  # its metrics.jsonl: one row per epoch


def train(overrides: list[str] | None = None, *, config_dir: str | Path | None = None,
          config_name: str = "config", output_dir: str | Path | None = None) -> TrainResult:
    """Train one configuration of `conf/` (or `config_dir`) in this process, recorded in `output_dir`
    (default: hydra.run.dir; an interrupted run's dir continues it). Bad input raises NormbenchError."""
    import pandas as pd
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf, open_dict

    from normbench.identity import register_resolvers
    from normbench.job import claim_run_dir, release_run_dir, run_job

    register_resolvers()
    with initialize_config_dir(config_dir=str(Path(config_dir or CONF_DIR).absolute())):
        cfg = compose(config_name, overrides=list(overrides or []), return_hydra_config=True)
    with open_dict(cfg):
        if output_dir is not None:
            cfg.hydra.run.dir = str(output_dir)
        claim_run_dir(cfg)  # as a single run of bench/train.py: its own, locked dir
        run_dir = Path(cfg.hydra.run.dir).absolute()
        cfg.hydra.runtime.output_dir = str(run_dir)
    try:
        HydraConfig.instance().set_config(cfg)  # the job reads its choices and overrides from Hydra
        run_job(OmegaConf.masked_copy(cfg, [key for key in cfg if key != "hydra"]), run_dir)
    finally:
        HydraConfig.instance().cfg = None
        release_run_dir()
    summary = read_json(run_dir / "summary.json") or {}
    return TrainResult(run_dir, summary, pd.DataFrame(read_jsonl(run_dir / METRICS)[0]))


def load_runs(*sweep_dirs: str | Path) -> pd.DataFrame:
    """One row per run recorded under the given sweep or run dirs (columns: docs/api.md); a sweep job refused
    before its run started is a `failed` row with its error; runs in progress or unreadable are left out."""
    import pandas as pd

    from normbench.report.records import scan

    found = scan(sweep_dirs)
    rows = [{**run.choices, "identity": run.identity, "seedless_identity": run.summary.get(SEEDLESS_IDENTITY),
             "status": str(run.status), "objective": run.summary.get("objective"), **run.metrics,
             "steps": None if (steps := run.budget[0]) is None else int(steps),
             "epochs_done": run.summary.get("epochs_done"), "dir": run.path,
             "wandb_run_id": run.summary.get(WANDB_RUN_ID), "overrides": run.overrides,
             "error": run.summary.get("error")} for run in found.runs]
    rows += [{"status": "failed", "error": item.reason, "dir": item.path,
              "overrides": (read_json(Path(item.path) / REJECTED) or {}).get("overrides") or []}
             for item in found.skipped if item.kind == "rejected"]
    return pd.DataFrame(rows)
