"""Bad input ends in one line naming the key, the value and the fix, before any data or GPU work."""

from __future__ import annotations

import json

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


def test_bad_value_from_the_command_line(tmp_path):
    proc = run_train([*TINY, "logger=none", "batch_size=0"], tmp_path, check=False)
    _assert_one_line_error(proc, CASES["batch_size=0"], tmp_path)


def test_gn_groups_that_do_not_divide_channels(tmp_path):
    proc = run_train([*TINY, "logger=none", "norm=gn", "norm.groups=5"], tmp_path, check=False)
    _assert_one_line_error(proc, "bad value norm.groups=5: must divide every normalized layer's channels",
                           tmp_path)


def test_cuda_requested_without_cuda(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = run_train([*TINY, "logger=none", "trainer.device=cuda"], tmp_path, check=False)
    _assert_one_line_error(proc, "CUDA is not available on this machine", tmp_path)


def test_unknown_option_lists_the_available_ones(tmp_path):
    proc = run_train([*TINY, "logger=none", "norm=batchnorm"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "Could not find 'norm/batchnorm'" in proc.stderr
    for option in ("bn", "gn", "ln", "lrn", "none"):
        assert f"\t{option}\n" in proc.stderr


def test_missing_cifar_without_network_names_the_data_dir(tmp_path):
    empty = tmp_path / "empty-data"
    empty.mkdir()
    args = [o for o in TINY if not o.startswith("data")] + [
        "logger=none", "data=cifar10", f"data.root={empty}", "data.download=false"]
    proc = run_train(args, tmp_path, check=False)
    _assert_one_line_error(proc, str(empty), tmp_path)
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
}


@pytest.mark.parametrize("overrides,expected", GROUP_CASES.values(), ids=list(GROUP_CASES))
def test_every_group_is_checked_before_anything_is_recorded(overrides, expected, tmp_path, capsys, monkeypatch):
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


def test_a_sweep_job_with_a_bad_group_value_records_nothing(tmp_path):
    """In a sweep the bad job is reported and the others run; the bad one leaves no record."""
    proc = run_train(["-m", *TINY, "logger=none", "probe=landscape", "probe.interval=0,5"], tmp_path)
    assert "bad value probe.interval=0" in proc.stderr
    records = list(tmp_path.rglob("summary.json"))
    assert len(records) == 1 and "probe.interval=5" in json.loads(records[0].read_text())["overrides"]
    assert "1 completed / 0 diverged / 1 failed" in proc.stdout
