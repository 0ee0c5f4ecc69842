"""A private Docker engine for the tests, and the images they build on it, without Docker Hub.

- `private_engine()`: dockerd with its own data root, exec root and socket in a temp dir, no default bridge
  and no iptables rules (containers use the host's network, none, or a compose network of their own),
  stopped by its PID at the end; the temp dir goes with it. Its data root (images and their layers) is kept
  in NORMBENCH_DOCKER_CACHE/engine, like the base, so that a rebuild takes only the changed layers (a cold
  build of the torch layers is ~10 minutes here); NORMBENCH_DOCKER_DATA_ROOT names another, `temp` a fresh
  one in the temp dir.
- `debian_base()`: the Debian base image of scripts/docker_base.sh (debootstrap, python3, a venv), its root
  filesystem cached between runs in NORMBENCH_DOCKER_CACHE (default /var/cache/normbench-docker) under a
  name keyed by the script and the host's CA bundle, so that a changed one is rebuilt; older than
  BASE_MAX_AGE_DAYS it is rebuilt too (Debian's security updates).
- `build_normbench()`: docker/Dockerfile on that base, torch and its CUDA wheels served from this host's
  local wheels (tests/wheel_index.py), everything else from the package registries.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE_SCRIPT = ROOT / "scripts" / "docker_base.sh"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
HOST_CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CACHE = Path(os.environ.get("NORMBENCH_DOCKER_CACHE", "/var/cache/normbench-docker"))
BASE_MAX_AGE_DAYS = 30
# The wheel index's port is part of a build argument, and a changed build argument invalidates the cached
# layers from the torch step on: a fixed port (another one only when it is taken) keeps them reusable.
WHEEL_INDEX_PORT = 38457
TOOLS = ("dockerd", "docker", "debootstrap")


class Unavailable(Exception):
    """No engine can run here; the message says why (a test skips with it)."""


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "not root: dockerd and debootstrap need root"
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if missing:
        return (f"{', '.join(missing)} not installed "
                "(scripts/install.sh --dev installs docker.io and debootstrap)")
    if "overlay" not in Path("/proc/filesystems").read_text().split():
        subprocess.run(["modprobe", "overlay"], capture_output=True, check=False)
        if "overlay" not in Path("/proc/filesystems").read_text().split():
            return "the kernel has no overlay filesystem (dockerd's overlay2 storage driver needs it)"
    return None


@dataclass
class Engine:
    home: Path
    data_root: Path
    process: subprocess.Popen

    @property
    def env(self) -> dict[str, str]:
        # The classic builder: Debian's docker.io has no buildx plugin.
        return {**os.environ, "DOCKER_HOST": f"unix://{self.home / 'docker.sock'}", "DOCKER_BUILDKIT": "0"}

    def docker(self, *args: str, timeout: float = 300, check: bool = True,
               **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(["docker", *args], env=self.env, capture_output=True, text=True,
                              timeout=timeout, check=False, **kw)
        if check and proc.returncode != 0:
            raise AssertionError(f"docker {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n"
                                 f"{proc.stderr[-3000:]}")
        return proc

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join((self.home / "dockerd.log").read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def private_engine(start_timeout: float = 120) -> Iterator[Engine]:
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    # Short paths: the engine's and containerd's unix sockets live under it (108 bytes at most).
    home = Path(tempfile.mkdtemp(prefix="nbdock-"))
    wanted = os.environ.get("NORMBENCH_DOCKER_DATA_ROOT") or str(CACHE / "engine")
    data_root = home / "data" if wanted == "temp" else Path(wanted)
    log = (home / "dockerd.log").open("w")
    process = subprocess.Popen(
        ["dockerd", "--data-root", str(data_root), "--exec-root", str(home / "exec"),
         "--pidfile", str(home / "dockerd.pid"), "--host", f"unix://{home / 'docker.sock'}",
         "--bridge", "none", "--iptables=false", "--ip-masq=false", "--storage-driver", "overlay2"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    engine = Engine(home, data_root, process)
    try:
        _wait_until_up(engine, start_timeout)
        yield engine
    finally:
        _stop(engine)
        log.close()
        shutil.rmtree(home, ignore_errors=True)


def _wait_until_up(engine: Engine, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if engine.process.poll() is not None:
            raise Unavailable(f"dockerd exited {engine.process.returncode} at start:\n{engine.log_tail()}")
        if engine.docker("version", timeout=30, check=False).returncode == 0:
            return
        time.sleep(1)
    raise Unavailable(f"dockerd did not answer within {timeout:.0f} s:\n{engine.log_tail()}")


def _stop(engine: Engine) -> None:
    running = engine.docker("ps", "-q", timeout=60, check=False).stdout.split()
    if running:
        engine.docker("rm", "-f", *running, timeout=120, check=False)
    if engine.process.poll() is None:
        os.kill(engine.process.pid, signal.SIGTERM)
        try:
            engine.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.kill(engine.process.pid, signal.SIGKILL)
            engine.process.wait(timeout=30)
    # A killed engine can leave its overlay mounts; never delete through a mount.
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()
              if line.split()[1].startswith((str(engine.home), str(engine.data_root)))]
    for mount in sorted(mounts, key=len, reverse=True):
        subprocess.run(["umount", "-l", mount], capture_output=True, check=False)


def base_cache_key() -> str:
    digest = hashlib.sha256(BASE_SCRIPT.read_bytes())
    if HOST_CA_BUNDLE.is_file():
        digest.update(HOST_CA_BUNDLE.read_bytes())
    return digest.hexdigest()[:12]


def debian_base(engine: Engine) -> str:
    """Tag of the Debian base image in `engine`, from the cached root filesystem (made when missing)."""
    key = base_cache_key()
    CACHE.mkdir(parents=True, exist_ok=True)
    tarball = CACHE / f"debian-bookworm-{key}.tar"
    for old in CACHE.glob("debian-bookworm-*.tar"):
        stale = old != tarball or time.time() - old.stat().st_mtime > BASE_MAX_AGE_DAYS * 86400
        if stale:
            old.unlink()
    tag = f"normbench-base:bookworm-{key}"
    if tarball.exists() and engine.docker("image", "inspect", tag, check=False).returncode == 0:
        return tag   # a kept data root has it: importing again would give new ids and miss every cached layer
    proc = subprocess.run([str(BASE_SCRIPT), str(tarball), tag], env=engine.env, capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, f"scripts/docker_base.sh failed:\n{proc.stderr[-3000:]}"
    return tag


@dataclass
class Build:
    tag: str
    seconds: float
    size_bytes: int
    local_wheels: list[str]   # the wheels the build took from this host's disk
    torch_layer_cached: bool  # the torch step was not run: its layer came from a kept data root


def build_normbench(engine: Engine, base: str, tag: str, local_projects) -> Build:
    from wheel_index import WheelIndex

    start = time.monotonic()
    try:
        index = WheelIndex(local_projects, port=WHEEL_INDEX_PORT)
    except OSError:
        index = WheelIndex(local_projects)
    with index.serving() as url:
        out = engine.docker("build", "--network", "host", "-f", str(DOCKERFILE), "-t", tag,
                      "--build-arg", f"BASE_IMAGE={base}", "--build-arg", f"TORCH_INDEX_URL={url}",
                      str(ROOT), timeout=2400).stdout
    seconds = time.monotonic() - start
    engine.docker("image", "prune", "--force")   # a kept data root would collect the replaced images
    size = int(engine.docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())
    # The classic builder prints "Step i/n : RUN ..." and, for a reused layer, "---> Using cache" next.
    torch_step = out[out.index("import sys, torch"):].split("Step ", 1)[0]
    return Build(tag, seconds, size, sorted(index.served), "Using cache" in torch_step)
