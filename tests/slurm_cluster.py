"""A real one-node SLURM cluster for the tests, started and stopped with scripts/slurm_one_node.sh (the
recipe docs/cluster.md gives users, so the recipe itself is what the tests run on).

`one_node_cluster()` yields a `Cluster` (its slurm.conf and helpers around the SLURM commands), or
raises `Unavailable` with the reason when SLURM cannot run here (not root, no slurm-wlm/munge, the
daemons do not come up). Everything lives in one temp dir: its own munge key and socket, free ports,
its own state and spool; the daemons and any job still running are stopped on exit, even after a
failing test.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "slurm_one_node.sh"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue")


class Unavailable(RuntimeError):
    """SLURM cannot run on this machine (the reason is the message)."""


@dataclass
class Cluster:
    dir: Path
    conf: Path
    start_s: float = 0.0   # how long the cluster took to come up

    @property
    def env(self) -> dict:
        return {"SLURM_CONF": str(self.conf)}

    def run(self, *args: str, check: bool = True) -> str:
        proc = subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              timeout=60, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (for an array: its first task's line)."""
        out = self.run("scontrol", "-o", "show", "job", job_id)
        fields = {}
        for token in out.splitlines()[0].split():
            key, _, value = token.partition("=")
            fields[key] = value
        return fields

    def start_requeued_now(self, job_id: str, timeout: float = 60) -> float:
        """A requeued job may not start again for 2 minutes (SLURM sets its begin time to now + 120 s);
        once it is pending, let it start now. Returns how long it took to get there."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.job(job_id).get("JobState") == "PENDING":
                self.run("scontrol", "update", f"JobId={job_id}", "StartTime=now")
                return time.monotonic() - started
            time.sleep(0.1)
        raise AssertionError(f"job {job_id} not pending again after {timeout} s: "
                             f"{self.job(job_id)}\n{self.logs()}")

    def queue(self) -> list[str]:
        return self.run("squeue", "-h", "-o", "%i %T").splitlines()

    def logs(self) -> str:
        parts = []
        for log in sorted((self.dir / "log").glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)


def unavailable_reason() -> str | None:
    if os.geteuid() != 0:
        return "the one-node SLURM cluster needs root (slurmd runs jobs as their user)"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"SLURM not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge"
    return None


@contextlib.contextmanager
def one_node_cluster():
    reason = unavailable_reason()
    if reason:
        raise Unavailable(reason)
    # not under pytest's 0700 tmp dir: munged runs as the munge user and must reach its socket dir
    base = Path(tempfile.mkdtemp(prefix="normbench-slurm-", dir="/tmp"))
    base.chmod(0o755)
    try:
        started = time.monotonic()
        proc = subprocess.run(["bash", str(SCRIPT), "start", str(base)], capture_output=True, text=True,
                              timeout=120, check=False)
        if proc.returncode != 0:
            raise Unavailable(f"the one-node SLURM cluster did not start: {proc.stderr.strip()[-800:]}")
        yield Cluster(base, base / "slurm.conf", time.monotonic() - started)
    finally:
        subprocess.run(["bash", str(SCRIPT), "stop", str(base)], capture_output=True, timeout=120,
                       check=False)
        shutil.rmtree(base, ignore_errors=True)
