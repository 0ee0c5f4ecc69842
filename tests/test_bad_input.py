"""Bad input ends in one line naming the key, the value and the fix, before any data or GPU work."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import TINY, run_train

CASES = {
    "batch_size=0": "bad value batch_size=0: must be a positive integer",
    "batch_size=-8": "bad value batch_size=-8: must be a positive integer",
    "optimizer.lr=0": "bad value optimizer.lr=0: must be a number > 0",
    "optimizer.lr=-0.1": "bad value optimizer.lr=-0.1: must be a number > 0",
    "trainer.epochs=0": "bad value trainer.epochs=0: must be an integer >= 1",
    "model.dropout=1.0": "bad value model.dropout=1.0: must be in [0, 1)",
    "model.dropout=-0.1": "bad value model.dropout=-0.1: must be in [0, 1)",
    "trainer.device=tpu": "bad value trainer.device='tpu': use auto, cpu, cuda, cuda:N or mps",
}


def _assert_one_line_error(proc, expected: str, cwd) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("normbench: ") and expected in lines[0], lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not list(cwd.rglob("summary.json")), "a failing run must not leave a record"


@pytest.mark.parametrize("override", CASES, ids=list(CASES))
def test_bad_value_is_one_clear_line(override, tmp_path, capsys, monkeypatch):
    """In-process through the same task function bench/train.py runs (Hydra compose, then main)."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from normbench.job import main

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*TINY, "logger=none", override])
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err == f"normbench: {err[len('normbench: '):]}"
    assert CASES[override] in err
    assert not list(tmp_path.rglob("summary.json"))


@pytest.mark.slow
def test_bad_value_from_the_command_line(battery):
    proc, _, root = battery["cli"]["batch_size=0"]
    _assert_one_line_error(proc, CASES["batch_size=0"], root)


@pytest.mark.slow
def test_gn_groups_that_do_not_divide_channels(battery):
    proc, _, root = battery["cli"]["norm.groups=5"]
    _assert_one_line_error(proc, "bad value norm.groups=5: must divide every normalized layer's channels",
                           root)


@pytest.mark.slow
def test_cuda_requested_without_cuda(battery):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc, _, root = battery["cli"]["trainer.device=cuda"]
    _assert_one_line_error(proc, "CUDA is not available on this machine", root)


@pytest.mark.slow
def test_unknown_option_lists_the_available_ones(battery):
    proc, _, _ = battery["cli"]["norm=batchnorm"]
    assert proc.returncode != 0
    assert "Could not find 'norm/batchnorm'" in proc.stderr
    for option in ("bn", "gn", "ln", "lrn", "none"):
        assert f"\t{option}\n" in proc.stderr


@pytest.mark.slow
def test_missing_cifar_without_network_names_the_data_dir(battery):
    proc, _, root = battery["cli"]["missing cifar"]
    empty = root / "empty-data"
    assert empty.is_dir()
    _assert_one_line_error(proc, str(empty), root)
    assert "data.download=true" in proc.stderr or "data=synthetic" in proc.stderr


GROUP_CASES = {
    "probe.interval=0": (["probe=landscape", "probe.interval=0"], "bad value probe.interval=0"),
    "pruning.min_runs=-1": (["pruning=median", "pruning.min_runs=-1"], "bad value pruning.min_runs=-1"),
    "trainer.fault=boom": (["+trainer.fault=boom"], "bad value trainer.fault='boom'"),
    "norm.affine=diag": (["norm=ln", "norm.affine=diag"], "bad value norm.affine='diag'"),
    "model._target_=os.system": (["model._target_=os.system"], "bad value model._target_='os.system'"),
    "data._target_=nowhere.data": (["data._target_=nowhere.data"], "bad value data._target_='nowhere.data'"),
    "data.channels=0": (["data.channels=0"], "bad value data.channels=0"),
    # one value is for every channel; two for a 3-channel dataset is wrong
    "data.mean=[0.5,0.5]": (["data.mean=[0.5,0.5]", "data.std=[0.2,0.2]"], "bad value data.mean=[0.5, 0.5]"),
    "trainer.threads=abc": (["trainer.threads=abc"], "bad value trainer.threads='abc'"),
    "seed=-1": (["seed=-1"], "bad value seed=-1"),
    "+foo=1": (["+foo=1"], "bad value foo=1: unknown key (no top-level setting of that name)"),
}


@pytest.mark.parametrize("overrides,expected", GROUP_CASES.values(), ids=list(GROUP_CASES))
def test_every_group_is_checked_before_anything_is_recorded(overrides, expected, tmp_path, capsys,
                                                            monkeypatch):
    """validate() parses every group: a bad probe, pruning, fault, norm or target is one line, no record."""
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from normbench.job import main

    monkeypatch.chdir(tmp_path)
    with initialize_config_dir(config_dir=str(CONF)):
        cfg = compose(config_name="config", overrides=[*TINY, "logger=none", *overrides])
    with pytest.raises(SystemExit) as exit_info:
        main(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith(f"normbench: {expected}"), err
    assert not list(tmp_path.rglob("summary.json"))


@pytest.mark.slow
def test_a_sweep_job_with_a_bad_group_value_records_nothing(tmp_path):
    """In a sweep the bad job is reported and the others run; the bad one leaves no record."""
    proc = run_train(["-m", *TINY, "logger=none", "probe=landscape", "probe.interval=0,5"], tmp_path)
    assert "bad value probe.interval=0" in proc.stderr
    records = list(tmp_path.rglob("summary.json"))
    assert len(records) == 1 and "probe.interval=5" in json.loads(records[0].read_text())["overrides"]
    assert "1 completed / 0 diverged / 1 failed" in proc.stdout


# --------------------------------------------------------------------------------------------------
# The battery: each case through a real `bench/train.py` process, two at a time. Each must end in exactly
# one line naming the key and the value, exit status 2, no traceback, no file written, well under 10 s.

SEARCH = ["-m", "search=optuna_random", "model=vgg_a_light"]
PASSWORD = "s3cr3t-pw-77"
BATTERY = {
    # tracebacks before
    "model.width=1e6": (["model.width=1e6"], "bad value model.width=1000000.0: is too large"),
    "model.width=1000": (["model.width=1000"], "bad value model.width=1000: gives a model of"),
    "seed=2**70": ([f"seed={2**70}"], f"bad value seed={2**70}: must be an integer from 0 to"),
    "seed=abc": (["seed=abc"], "bad value seed='abc'"),
    "norm.groups=abc": (["norm=gn", "norm.groups=abc"], "bad value norm.groups='abc'"),
    "loss.gamma=abc": (["loss=focal", "loss.gamma=abc"], "bad value loss.gamma='abc'"),
    "optimizer.betas=[1.5,0.9]": (["optimizer=adam", "optimizer.betas=[1.5,0.9]"],
                                  "bad value optimizer.betas=[1.5, 0.9]: must be two numbers in [0, 1)"),
    "+optimizer.lrr=0.1": (["+optimizer.lrr=0.1"], "bad value optimizer.lrr=0.1: unknown key"),
    "norm.eps=-1": (["norm.eps=-1"], "bad value norm.eps=-1: must be a number > 0"),
    "hydra.launcher.n_jobs=0": (["-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=0"],
                                "bad value hydra.launcher.n_jobs=0"),
    "optimizer._target_=os.system": (["optimizer._target_=os.system"],
                                     "bad value optimizer._target_='os.system'"),
    # values of the right type but out of range
    "optimizer.lr=inf": (["optimizer.lr=inf"], "bad value optimizer.lr=inf"),
    "optimizer.momentum=1.5": (["optimizer=sgd", "optimizer.momentum=1.5"],
                               "bad value optimizer.momentum=1.5: must be in [0, 1)"),
    "norm.momentum=5": (["norm=bn", "norm.momentum=5"], "bad value norm.momentum=5: must be in [0, 1]"),
    "scheduler.every_epochs=0": (["scheduler=step", "scheduler.every_epochs=0"],
                                 "bad value scheduler.every_epochs=0"),
    "step longer than the run": (
        ["scheduler=step", "trainer.epochs=3", "scheduler.every_epochs=5"],
        "bad value scheduler.every_epochs=5: the first decay would come after epoch 5"),
    "trainer.compile=maybe": (["trainer.compile=maybe"],
                              "bad value trainer.compile='maybe': must be true or false"),
    "data.augment=maybe": (["data.augment=maybe"], "bad value data.augment='maybe': must be true or false"),
    "+trainer.epoch=3": (["+trainer.epoch=3"], "bad value trainer.epoch=3: unknown key"),
    "+model.widht=2": (["+model.widht=2"], "bad value model.widht=2: unknown key"),
    "+norm.group=4": (["norm=gn", "+norm.group=4"],
                      "bad value norm.group=4: no norm reads it; did you mean norm.groups?"),
    "+loss.gama=2": (["loss=focal", "+loss.gama=2"],
                     "bad value loss.gama=2: no loss reads it; did you mean loss.gamma?"),
    "+scheduler.fn.T_max=5": (["scheduler=cosine", "+scheduler.fn.T_max=5"],
                              "bad value scheduler.fn.T_max=5: is set"),
    "hydra.sweeper.n_trials=0": ([*SEARCH, "hydra.sweeper.n_trials=0"], "bad value hydra.sweeper.n_trials=0"),
    "hydra.sweeper.n_trials=-1": ([*SEARCH, "hydra.sweeper.n_trials=-1"],
                                  "bad value hydra.sweeper.n_trials=-1"),
    # experiment_name is one path component
    "experiment_name=../../x": (["experiment_name=../../x"], "bad value experiment_name='../../x'"),
    "experiment_name=..": (["experiment_name=.."], "bad value experiment_name='..'"),
    "experiment_name=a/b": (["-m", "experiment_name=a/b"], "bad value experiment_name='a/b'"),
    "experiment_name=": (["experiment_name="], "bad value experiment_name=''"),
    # a password in an override Hydra cannot parse
    "unparsable storage override": (
        [*SEARCH, f"hydra.sweeper.storage=postgresql://u:{PASSWORD}@h/db?x=[1"],
        "cannot parse the override 'hydra.sweeper.storage=postgresql://u:***@h/db?x=[1'"),
}
# What each case names besides key and value: the fix.
FIXES = {
    "+optimizer.lrr=0.1": "did you mean optimizer.lr?",
    "+trainer.epoch=3": "did you mean trainer.epochs?",
    "+model.widht=2": "did you mean model.width?",
    "model.width=1000": "use a smaller width",
}
# `bench/train.py --cfg job` (imports + composition), two at a time, idle 2-core machine
IDLE_REFERENCE_S = 3.0
LIMIT_S = 10.0


# Single bad runs through a real `bench/train.py` process each; they run in the battery's queue,
# two at a time. name -> the run's whole command line ("{root}": the dir it runs in, with an empty-data/).
CLI_CASES = {
    "batch_size=0": [*TINY, "logger=none", "batch_size=0"],
    "norm.groups=5": [*TINY, "logger=none", "norm=gn", "norm.groups=5"],
    "trainer.device=cuda": [*TINY, "logger=none", "trainer.device=cuda"],
    "norm=batchnorm": [*TINY, "logger=none", "norm=batchnorm"],
    "missing cifar": [o for o in TINY if not o.startswith("data")] + [
        "logger=none", "data=cifar10", "data.root={root}/empty-data", "data.download=false"],
    "password in a Hydra error": [*TINY, f"hydra.sweeper.storagee=postgresql://u:{PASSWORD}@h/db"],
}


def _run_case(args: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float]:
    # cwd two levels down, so that experiment_name=../../x would land inside `root`
    cwd = root / "a" / "b"
    cwd.mkdir(parents=True)
    start = time.perf_counter()
    proc = run_train([*TINY, "logger=none", *args], cwd, check=False, timeout=120)
    return proc, time.perf_counter() - start


def _run_cli_case(args: list[str], root: Path) -> tuple[subprocess.CompletedProcess, float, Path]:
    """A CLI_CASES run from `root` itself."""
    root.mkdir(parents=True)
    (root / "empty-data").mkdir()
    start = time.perf_counter()
    proc = run_train([a.replace("{root}", str(root)) for a in args], root, check=False, timeout=120)
    return proc, time.perf_counter() - start, root


@pytest.fixture(scope="module")
def battery(tmp_path_factory) -> dict:
    """Every case and every CLI_CASES run, two processes at a time; plus, first and last in the same queue, a
    process that only composes the config: the time limit scales with the slower of the two when the
    machine is busy."""
    root = tmp_path_factory.mktemp("battery")
    with ThreadPoolExecutor(max_workers=2) as pool:
        first = pool.submit(_run_case, ["--cfg", "job"], root / "reference-first")
        futures = {name: pool.submit(_run_case, args, root / f"case{i}")
                   for i, (name, (args, _)) in enumerate(BATTERY.items())}
        cli = {name: pool.submit(_run_cli_case, args, root / f"cli{i}") for i, (name, args) in
               enumerate(CLI_CASES.items())}
        last = pool.submit(_run_case, ["--cfg", "job"], root / "reference-last")
        results = {name: (*future.result(), root / f"case{list(BATTERY).index(name)}")
                   for name, future in futures.items()}
        reference = max(first.result()[1], last.result()[1])
    return {"reference": reference, "results": results, "cli": {name: f.result() for name, f in cli.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("name", BATTERY, ids=list(BATTERY))
def test_bad_input_battery(name, battery):
    proc, elapsed, root = battery["results"][name]
    expected = BATTERY[name][1]
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("normbench: ") and expected in lines[0], lines[0]
    assert FIXES.get(name, "") in lines[0], lines[0]
    assert "Traceback" not in out and PASSWORD not in out
    # Nothing but, for a single run, Hydra's own job metadata (.hydra/, train.log), which Hydra writes before
    # any normbench code runs; experiment_name and the launcher settings are refused before even that.
    written = [p for p in root.rglob("*") if p.is_file()]
    if not name.startswith(("experiment_name", "hydra.")):
        written = [p for p in written if ".hydra" not in p.parts and p.name != "train.log"]
    assert not written, f"a refused run wrote {written}"
    limit = LIMIT_S * max(1.0, battery["reference"] / IDLE_REFERENCE_S)
    assert elapsed < limit, (f"{elapsed:.1f} s (limit {limit:.1f} s; "
                             f"composing alone took {battery['reference']:.1f} s)")


@pytest.mark.slow
def test_a_password_in_any_hydra_error_is_masked(battery):
    """Hydra's own composition errors quote the override (with its value): masked too."""
    proc, _, _ = battery["cli"]["password in a Hydra error"]
    assert proc.returncode != 0
    assert PASSWORD not in proc.stdout + proc.stderr
    assert "postgresql://u:***@h/db" in proc.stderr


@pytest.mark.slow
def test_a_bad_value_in_a_sweep_fails_that_job_only(tmp_path):
    """A value refused by the new checks, in a sweep: that job is counted failed, the other one runs."""
    proc = run_train(["-m", *TINY, "logger=none", "optimizer.momentum=1.5,0.9"], tmp_path)
    assert "bad value optimizer.momentum=1.5" in proc.stderr
    records = list(tmp_path.rglob("summary.json"))
    assert len(records) == 1 and "optimizer.momentum=0.9" in json.loads(records[0].read_text())["overrides"]
    assert "1 completed / 0 diverged / 1 failed" in proc.stdout


class Blackhole:
    """A TCP server that accepts connections and never answers (a PostgreSQL host that hangs)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        with contextlib.suppress(OSError):
            while True:
                self.accepted.append(self.sock.accept()[0])

    def close(self) -> None:
        for conn in self.accepted:
            conn.close()
        self.sock.close()


@pytest.mark.slow
def test_a_hanging_postgresql_fails_within_connect_timeout(tmp_path):
    timeout = 4
    hole = Blackhole()
    try:
        start = time.perf_counter()
        url = f"postgresql://u:{PASSWORD}@127.0.0.1:{hole.port}/db"
        proc = run_train([*SEARCH, *TINY, "logger=none", f"hydra.sweeper.storage={url}",
                          f"hydra.sweeper.connect_timeout={timeout}"], tmp_path, check=False)
        elapsed = time.perf_counter() - start
        reference = run_train(["--cfg", "job"], tmp_path, check=False)
        assert reference.returncode == 0
    finally:
        hole.close()
    assert proc.returncode == 2 and PASSWORD not in proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "timeout expired" in lines[0], proc.stderr
    assert len(hole.accepted) == 1, "the client connected more than once"
    assert elapsed < 2 * timeout + LIMIT_S, elapsed


def test_a_config_error_survives_pickling():
    """A launcher worker sends its job's error back pickled: it must arrive whole."""
    import pickle

    from normbench.errors import ConfigError

    err = pickle.loads(pickle.dumps(ConfigError("norm.groups", 5, "must divide every layer's channels")))
    assert (err.key, err.value, str(err)) == ("norm.groups", 5,
                                              "bad value norm.groups=5: must divide every layer's channels")
