"""hydra/sweeper=normbench_optuna does what hydra-optuna-sweeper 1.4 does (its README, docs and tests,
behaviour by behaviour), plus the differences normbench makes on purpose (docs/optuna.md,
"Compatibility"). The task is upstream's example: a sphere function (and Binh-Korn for two objectives),
written into tmp_path; sweeps run through Hydra for real, in process (fast) or as a script (exit status,
stderr), and every study is read back with Optuna's API."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
from hydra._internal.hydra import Hydra
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

from hydra_plugins.normbench_optuna_sweeper._study import failure_values
from normbench.sweep.optuna_support import ENV_STORAGE

optuna.logging.set_verbosity(optuna.logging.WARNING)
SRC = Path(__file__).resolve().parents[1] / "src"
SEED = "hydra.sweeper.sampler.seed=123"

CONFIG = """
defaults:
  - override hydra/sweeper: normbench_optuna
  - override hydra/sweeper/sampler: tpe

hydra:
  sweeper:
    direction: minimize
    study_name: sphere
    n_trials: 20
    n_jobs: 1
    params:
      x: range(-5.5, 5.5, step=0.5)
      y: choice(-5, 0, 5)

x: 1
y: 1
z: 1
error: false
fail_above: null
max_z_difference_from_x: 0.5
"""

# upstream's example/sphere.py (+ a failure above a threshold), as a script for the CLI tests
APP = '''
import hydra


@hydra.main(version_base=None, config_path="conf", config_name="config")
def sphere(cfg):
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    if cfg.get("fail_above") is not None and cfg.x > cfg.fail_above:
        raise RuntimeError("x above fail_above")
    return cfg.x ** 2 + cfg.y ** 2


if __name__ == "__main__":
    sphere()
'''


def sphere(cfg: DictConfig) -> float:
    if cfg.get("error", False):
        raise RuntimeError("cfg.error is True")
    if cfg.get("fail_above") is not None and cfg.x > cfg.fail_above:
        raise RuntimeError("x above fail_above")
    value = cfg.x ** 2 + cfg.y ** 2
    return value + (cfg.w ** 2 + cfg.z ** 2 if "w" in cfg else 0.0)


def binh_and_korn(cfg: DictConfig) -> tuple[float, float]:
    """upstream's example/multi-objective.py"""
    if cfg.get("fail_above") is not None and cfg.x > cfg.fail_above:
        raise RuntimeError("x above fail_above")
    return 4 * cfg.x ** 2 + 4 * cfg.y ** 2, (cfg.x - 5) ** 2 + (cfg.y - 5) ** 2


def configure(cfg: DictConfig, trial: optuna.trial.Trial) -> None:
    """upstream's example/custom-search-space-objective.py configure()"""
    x = trial.params["x"]
    trial.suggest_float("z", x - cfg.max_z_difference_from_x, x + cfg.max_z_difference_from_x)
    trial.suggest_float("+w", 0.0, 1.0)  # +w: a new key


@pytest.fixture
def app(tmp_path, monkeypatch) -> Path:
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "config.yaml").write_text(CONFIG)
    (tmp_path / "sphere.py").write_text(APP)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(ENV_STORAGE, "")  # the sweeper sets it in its process: restored after the test
    monkeypatch.delenv(ENV_STORAGE)
    return tmp_path


def sweep(app: Path, overrides: list[str], task=sphere, name: str = "out") -> Path:
    """A real Hydra multirun in this process (as hydra.test_utils' SweepTaskFunction runs one)."""
    sweep_dir = app / name
    GlobalHydra.instance().clear()
    try:
        hydra_ = Hydra.create_main_hydra_file_or_module(calling_file=str(app / "sphere.py"),
                                                        calling_module=None,
                                                        config_path="conf", job_name="sphere")
        hydra_.multirun(config_name="config", task_function=task,
                        overrides=[*overrides, f"hydra.sweep.dir={sweep_dir}"], with_log_configuration=False)
    finally:
        GlobalHydra.instance().clear()
    return sweep_dir


def study_of(sweep_dir: Path, name: str = "sphere") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")


def results(sweep_dir: Path) -> DictConfig:
    return OmegaConf.load(sweep_dir / "optimization_results.yaml")


def dominates(a, b) -> bool:
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


# --------------------------------------------------------------------------------------------------
# upstream's documented behaviours


@pytest.mark.slow
def test_tpe_example_finds_the_minimum_links_the_study_and_continues_it(app):
    """upstream test_optuna_example (TPE, seed 123, 20 trials, best value <= 2.27, `~z`, the results
    file), plus normbench's: the default SQLite study in the sweep dir named by study_name, the study's
    metric names and user attributes, and n_trials as the study's total (a re-run continues it)."""
    out = sweep(app, ["~z", SEED, "hydra.sweeper.objectives=[loss]"])
    study = study_of(out)
    trials = study.get_trials()
    assert len(trials) == 20 and all(t.state == TrialState.COMPLETE for t in trials)
    best = results(out)
    assert best.name == "optuna" and best.best_value == study.best_value <= 2.27
    assert dict(best.best_params) == study.best_trial.params
    assert study.metric_names == ["loss"]
    attrs = study.user_attrs
    assert attrs["search_space"] == {"x": "range(-5.5, 5.5, step=0.5)", "y": "choice(-5, 0, 5)", "~z": ""}
    assert "command" in attrs and attrs["sweep_dir"] == str(out) and attrs["storage"].endswith("optuna.db")
    assert trials[0].distributions == {"x": FloatDistribution(-5.5, 5.0, step=0.5),
                                       "y": CategoricalDistribution([-5, 0, 5])}
    assert all(t.user_attrs["status"] == "completed" for t in trials)

    sweep(app, ["~z", SEED, "hydra.sweeper.n_trials=22"])  # upstream: 22 more trials; normbench: 22 in all
    assert len(study_of(out).get_trials()) == 22
    sweep(app, ["~z", SEED, "hydra.sweeper.n_trials=22"])  # full: nothing to run
    assert len(study_of(out).get_trials()) == 22


def test_search_space_override_syntax(app):
    """upstream's docs (interval, int(interval), tag(log, ...), range, shuffle(range), choice, float
    range) and test_create_params_from_overrides: a fixed value leaves the space (and is the study's
    fixed_overrides attribute, once); each sweep type becomes the documented Optuna distribution."""
    out = sweep(app, ["hydra.sweeper.n_trials=3", "hydra/sweeper/sampler=random", SEED, "y=0",
                      "+a=int(interval(-5, 5))",
                      "+b=tag(log, interval(1, 10))", "+c=tag(log, int(interval(1, 8)))", "+d=range(1, 3)",
                      "+e=shuffle(range(1, 3))", "+f=choice(true, false)", "+g=choice('hello', 'world')",
                      "+h=range(0.5, 5.5, step=1)", "x=interval(-5.0, 5.0)"])
    trials = study_of(out).get_trials()
    assert len(trials) == 3
    dist = trials[0].distributions
    assert dist["x"] == FloatDistribution(-5.0, 5.0)
    assert dist["+a"] == IntDistribution(-5, 5)
    assert dist["+b"] == FloatDistribution(1, 10, log=True)
    assert dist["+c"] == IntDistribution(1, 8, log=True)
    assert dist["+d"] == IntDistribution(1, 2)
    assert isinstance(dist["+e"], CategoricalDistribution) and set(dist["+e"].choices) == {1, 2}
    assert dist["+f"] == CategoricalDistribution([True, False])
    assert dist["+g"] == CategoricalDistribution(["hello", "world"])
    assert dist["+h"] == FloatDistribution(0.5, 4.5, step=1)
    for trial in trials:  # normbench: the fixed value is the study's attribute, not every trial's
        assert "y" not in trial.params and "y" not in trial.user_attrs
        assert trial.value == pytest.approx(trial.params["x"] ** 2)  # y=0 reached the job
    assert "y=0" in study_of(out).user_attrs["fixed_overrides"]
    assert "y" not in results(out).best_params


@pytest.mark.slow
def test_grid_sampler_runs_each_point_once(app):
    """upstream test_example_with_grid_sampler: n_trials above the grid size runs the grid (best value 1
    at |x| = 1, y = 0); normbench: n_trials=null is the whole grid too."""
    grid = ["hydra/sweeper/sampler=grid", "x=choice(-1, 1)", "y=range(-1.0, 1.0, step=1)",
            "z=choice(foo, bar)"]
    out = sweep(app, [*grid, "hydra.sweeper.n_trials=20"])
    trials = study_of(out).get_trials()
    assert len(trials) == 8 and len({tuple(sorted(t.params.items())) for t in trials}) == 8
    best = results(out)
    assert best.best_value == 1 and abs(best.best_params.x) == 1 and best.best_params.y == 0
    out = sweep(app, [*grid, "hydra.sweeper.n_trials=1"], name="one")
    assert len(study_of(out).get_trials()) == 1
    out = sweep(app, ["hydra/sweeper/sampler=grid", "x=choice(-1, 1)", "y=0", "hydra.sweeper.n_trials=null"],
                name="all")
    assert sorted(t.params["x"] for t in study_of(out).get_trials()) == [-1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["nsgaii", "random"])
def test_multi_objective_completes_exactly_n_trials_with_a_pareto_front(app, sampler):
    """upstream test_optuna_multi_objective_example: direction [minimize, minimize], the task returns a
    tuple; the study ends with exactly n_trials COMPLETE two-value trials and optimization_results.yaml
    holds the non-dominated solutions. With a failing region (x > 3) those trials get +inf twice and
    never reach the front."""
    out = sweep(app, ["hydra.sweeper.direction=[minimize,minimize]", f"hydra/sweeper/sampler={sampler}", SEED,
                      "hydra.sweeper.n_trials=8", "x=range(0, 5, step=0.5)", "y=range(0, 3, step=0.5)",
                      "hydra.sweeper.objectives=[f1,f2]",
                      "fail_above=3"], task=binh_and_korn)
    study = study_of(out)
    trials = study.get_trials()
    assert len(trials) == 8 and all(t.state == TrialState.COMPLETE and len(t.values) == 2 for t in trials)
    assert study.metric_names == ["f1", "f2"]
    for trial in trials:
        if trial.params["x"] > 3:
            assert trial.values == [math.inf, math.inf] and trial.user_attrs["status"] == "failed"
        else:
            assert trial.values == pytest.approx([4 * trial.params["x"] ** 2 + 4 * trial.params["y"] ** 2,
                                                  (trial.params["x"] - 5) ** 2
                                                  + (trial.params["y"] - 5) ** 2])
    solutions = results(out).solutions
    assert solutions
    for a in solutions:
        assert a.params.x <= 3 and a.params.x % 1 in (0, 0.5)
        assert not any(dominates(b["values"], a["values"]) for b in solutions)


def test_custom_search_space(app):
    """upstream test_optuna_custom_search_space_example: configure() adds z near x and a new key +w."""
    out = sweep(app, ["hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=random", SEED,
                      "max_z_difference_from_x=0.3",
                      f"hydra.sweeper.custom_search_space={__name__}.configure"])
    for trial in study_of(out).get_trials():
        assert abs(trial.params["x"] - trial.params["z"]) <= 0.3 and 0 <= trial.params["+w"] <= 1
        assert trial.value == pytest.approx(sum(v ** 2 for k, v in trial.params.items() if k != "y")
                                            + trial.params["y"] ** 2)
    best = results(out).best_params
    assert abs(best.x - best.z) <= 0.3 and 0 <= best["+w"] <= 1


@pytest.mark.slow
def test_n_jobs_launches_batches_and_the_study_has_exactly_n_trials(app):
    """upstream test_launch_jobs (n_trials=8, n_jobs=3): batches of 3, 3, 2."""
    out = sweep(app, ["hydra.sweeper.n_trials=8", "hydra.sweeper.n_jobs=3", "hydra/sweeper/sampler=random"])
    trials = study_of(out).get_trials()
    assert [t.number for t in trials] == list(range(8)) and all(t.state == TrialState.COMPLETE
                                                                for t in trials)
    job_dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert job_dirs == [str(i) for i in range(8)]


@pytest.mark.parametrize("sampler", ["tpe", "random", "cmaes", "nsgaii", "nsgaiii", "qmc", "gp"])
def test_every_sampler(app, sampler):
    """Every sampler of upstream's hydra/sweeper/sampler group runs a study to n_trials (grid: above)."""
    direction = "[minimize,minimize]" if sampler in ("nsgaii", "nsgaiii") else "minimize"
    task = binh_and_korn if sampler in ("nsgaii", "nsgaiii") else sphere
    out = sweep(app, [f"hydra/sweeper/sampler={sampler}", "hydra.sweeper.n_trials=2",
                      f"hydra.sweeper.direction={direction}", "x=interval(-5.0, 5.0)"], task=task)
    trials = study_of(out).get_trials()
    assert len(trials) == 2 and all(t.state == TrialState.COMPLETE for t in trials)


def test_motpe_is_refused_as_upstream(app):
    with pytest.raises(Exception, match="sampler was removed in Optuna 4.0"):
        sweep(app, ["hydra/sweeper/sampler=motpe", "hydra.sweeper.direction=[minimize,minimize]"])


@pytest.mark.slow
def test_failure_rate_ends_the_sweep_with_the_jobs_exception(app):
    """upstream test_failure_rate: max_failure_rate=0.5 with failing jobs: the job's exception on
    stderr, a non-zero exit; max_failure_rate=1.0: the sweep goes on to n_trials (the exception is not
    shown). normbench: every failure told as +inf (minimize), no best trial is claimed from them."""
    base = [sys.executable, "sphere.py", "--multirun", "hydra.sweeper.n_trials=4", "hydra.sweeper.n_jobs=2",
            "hydra/sweeper/sampler=random", "error=true"]
    # this checkout's sweeper, whatever the venv's editable install points at
    env = {**os.environ, "HYDRA_FULL_ERROR": "0",
           "PYTHONPATH": os.pathsep.join([str(SRC), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([*base, "hydra.sweeper.max_failure_rate=0.5", "hydra.sweep.dir=half"], cwd=app,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode != 0
    assert "RuntimeError: cfg.error is True" in proc.stderr
    assert "max_failure_rate=0.5" in proc.stderr
    assert len(study_of(app / "half").get_trials()) == 2  # the first batch, then it stopped

    proc = subprocess.run([*base, "hydra.sweeper.max_failure_rate=1.0", "hydra.sweep.dir=all"], cwd=app,
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeError: cfg.error is True" not in proc.stderr
    trials = study_of(app / "all").get_trials()
    assert len(trials) == 4 and all(t.state == TrialState.COMPLETE and t.value == math.inf for t in trials)
    assert all(t.user_attrs["status"] == "failed" and "cfg.error" in t.user_attrs["error"] for t in trials)
    assert not (app / "all" / "optimization_results.yaml").exists()  # every trial failed: no best


# --------------------------------------------------------------------------------------------------
# normbench's differences


@pytest.mark.slow
@pytest.mark.parametrize("direction", ["minimize", "maximize"])
def test_failed_trials_are_told_the_worst_value_for_the_direction(app, direction):
    """failure: worst (normbench's default): a failed trial is COMPLETE with a value worse than any
    real one (+inf minimizing, -inf maximizing) and is never the best; failure: fail makes it FAIL
    and still counts it toward n_trials."""
    out = sweep(app, ["hydra.sweeper.n_trials=6", "hydra/sweeper/sampler=random", SEED,
                      f"hydra.sweeper.direction={direction}", "fail_above=0"])
    study = study_of(out)
    failed = [t for t in study.get_trials() if t.user_attrs["status"] == "failed"]
    real = [t for t in study.get_trials() if t.user_attrs["status"] == "completed"]
    assert len(failed) + len(real) == 6 and failed and real
    worst = math.inf if direction == "minimize" else -math.inf
    assert all(t.state == TrialState.COMPLETE and t.value == worst for t in failed)
    pick = min if direction == "minimize" else max
    assert results(out).best_value == pick(t.value for t in real)
    assert results(out).best_trial in {t.number for t in real}
    if direction == "maximize":
        return
    out = sweep(app, ["hydra.sweeper.n_trials=4", "hydra/sweeper/sampler=random", SEED,
                      "hydra.sweeper.failure=fail",
                      "fail_above=0"], name="fail")
    trials = study_of(out).get_trials()
    assert len(trials) == 4 and any(t.state == TrialState.FAIL for t in trials)
    assert all(t.state == TrialState.FAIL for t in trials if t.user_attrs["status"] == "failed")


def test_failure_values_semantics():
    """Known normbench objectives fail to their bound, others to +-inf; an explicit worst_value wins."""
    assert failure_values(["minimize"], ["val/error"], None) == [1.0]
    assert failure_values(["maximize"], ["val/best_acc"], None) == [0.0]
    assert failure_values(["minimize", "minimize"], ["val/error", "time/total_s"], None) == [1.0, math.inf]
    assert failure_values(["maximize", "minimize"], None, None) == [-math.inf, math.inf]
    assert failure_values(["minimize", "maximize"], None, 7) == [7.0, 7.0]
    assert failure_values(["minimize", "maximize"], None, [3, -3]) == [3.0, -3.0]
    with pytest.raises(ValueError):
        failure_values(["minimize"], None, [1, 2])


def test_objectives_must_match_the_directions(app):
    with pytest.raises(SystemExit) as exit_:
        sweep(app, ["hydra.sweeper.objectives=[a,b]", "hydra.sweeper.n_trials=1"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        sweep(app, ["hydra.sweeper.objectives=[val/error]", "hydra.sweeper.direction=maximize"], name="o2")
