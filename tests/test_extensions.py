"""A model and a dataset of one's own, added exactly as the README's "Your own model and dataset" shows
(its files written from the README's code blocks into a temp dir, its command run as a subprocess): a
single run, a sweep over norms and activations, a study preset, and the report over their records."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, TINY, run_train

SECTION = "## Your own model and dataset"
# The quick run on the README's dataset at these sizes, tiny_cnn at its own width (1.0: quick's 0.125
# would leave it 8 channels instead of 16)
QUICK = [o for o in TINY if not o.startswith("data")] + ["model.width=1.0", "logger=none", "data.num_train=600",
                                                         "data.num_test=200", "data.val_size=100"]


def readme_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return text[start:end if end != -1 else None]


def code_blocks(section: str) -> list[tuple[str, str]]:
    return re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL)


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> tuple[Path, list[str], dict]:
    """The README's files in a temp dir, the arguments of its command and its environment."""
    root = tmp_path_factory.mktemp("user")
    command = None
    for lang, body in code_blocks(readme_section()):
        first = body.splitlines()[0]
        if lang in ("python", "yaml") and first.startswith("# myproject/"):
            path = root / first[2:].strip()
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(body)
        elif lang == "bash" and "bench/train.py" in body:
            command = shlex.split(body.replace("\\\n", " "))
    assert command is not None, "the README section shows no bench/train.py command"
    env_assignments = [w for w in command[: command.index("python")] if "=" in w]
    env = dict(w.split("=", 1) for w in env_assignments)
    if "PYTHONPATH" in env and os.environ.get("PYTHONPATH"):
        env["PYTHONPATH"] += os.pathsep + os.environ["PYTHONPATH"]
    args = command[command.index("bench/train.py") + 1:]
    assert {"model=tiny_cnn", "data=stripes"} <= set(args)
    return root, args, env


def summaries(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in root.rglob("summary.json")]


@pytest.mark.slow
def test_readme_model_and_dataset_train(project):
    root, args, env = project
    assert (root / "myproject" / "tiny_cnn.py").exists() and (root / "myproject" / "stripes.py").exists()
    run_train([*args, *QUICK, "trainer.epochs=2", "trainer.max_steps_per_epoch=8"], root, env_extra=env)
    [summary] = summaries(root / "outputs")
    assert summary["status"] == "completed"
    assert summary["choices"]["model"] == "tiny_cnn" and summary["choices"]["data"] == "stripes"
    assert summary["metrics"]["val/best_acc"] > 0.9  # stripes are easy: the model really learned them
    config = next((root / "outputs").rglob("config.yaml")).read_text()
    assert "channels: 1" in config and "image_size: 20" in config


@pytest.mark.slow
def test_a_dataset_config_without_pipeline_keys_trains(tmp_path):
    """Only `_target_`, what the dataset returns and its own keys: the pipeline keys take their defaults."""
    data_dir = tmp_path / "conf" / "data"
    data_dir.mkdir(parents=True)
    (data_dir / "bare.yaml").write_text("_target_: normbench.datasets.synthetic\nnum_train: 5300\n"
                                        "num_test: 100\nnum_classes: 10\nchannels: 3\nimage_size: 32\n")
    quick = [o for o in QUICK if not o.startswith("data")]
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'conf'}]"
    run_train([searchpath, "data=bare", *quick, "model.width=0.125"], tmp_path)
    [summary] = summaries(tmp_path / "outputs")
    assert summary["status"] == "completed" and summary["choices"]["data"] == "bare"
    config = next((tmp_path / "outputs").rglob("config.yaml")).read_text()
    assert "split_seed" not in config  # nothing but the file's keys; the run used the defaults
    assert summary["metrics"]["memory/data_mb"] > 0


@pytest.mark.slow
def test_readme_model_and_dataset_compose_with_sweeps_presets_and_the_report(project):
    root, args, env = project
    base = [a for a in args if not a.startswith("norm=")]
    run_train(["-m", *base, *QUICK, "norm=none,bn,ln,gn", "activation=relu,gelu", "loss=focal",
               "optimizer=adam", "scheduler=cosine", "probe=all", "probe.interval=2"], root, env_extra=env)
    sweep = [s for s in summaries(root / "multirun" / "default")]
    assert len(sweep) == 8 and all(s["status"] == "completed" for s in sweep)
    assert {(s["choices"]["norm"], s["choices"]["activation"]) for s in sweep} == {
        (n, a) for n in ("none", "bn", "ln", "gn") for a in ("relu", "gelu")}
    assert all(s["choices"]["model"] == "tiny_cnn" for s in sweep)

    run_train(["-m", "+experiment=vgg_bn_baseline", *base, *QUICK], root, env_extra=env)
    preset = summaries(root / "multirun" / "vgg_bn_baseline")
    assert {s["choices"]["norm"] for s in preset} == {"none", "bn"}
    assert all(s["choices"]["model"] == "tiny_cnn" and s["choices"]["data"] == "stripes" for s in preset)

    out = root / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(root / "multirun" / "default"),
                           str(root / "multirun" / "vgg_bn_baseline"), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 10 and {r["choice/model"] for r in rows} == {"tiny_cnn"}
    assert "vgg_bn_baseline" in (out / "index.html").read_text()


@pytest.mark.slow
def test_an_untrusted_target_is_one_clear_line(project):
    root, args, env = project
    untrusted = [a for a in args if not a.startswith("trusted_targets")]
    cwd = root / "untrusted"
    cwd.mkdir()
    (cwd / "myproject").symlink_to(root / "myproject")
    proc = run_train([*untrusted, *QUICK], cwd, env_extra=env, check=False)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    expected = ("normbench: bad value model._target_='tiny_cnn.tiny_cnn': is not a trusted target; add its "
                "module to trusted_targets, e.g. 'trusted_targets=[tiny_cnn.*]'")
    assert lines == [expected], proc.stderr
    assert not list(cwd.rglob("summary.json"))
