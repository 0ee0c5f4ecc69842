"""SIGTERM and Ctrl-C: one exception for both, passed on to a sweep's joblib workers, and workers that
never outlive their sweep process.

SIGTERM (kill, docker stop, SLURM) raises `Interrupted`, a KeyboardInterrupt, so that every layer (the
run, joblib, the Optuna sweeper) treats it like Ctrl-C: the job records the run `interrupted` and
bench/train.py ends without a traceback (normbench.job).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

MAIN_PID_ENV = "NORMBENCH_MAIN_PID"   # the pid of the bench/train.py process (its launcher's workers see it)
ORPHANED = threading.Event()          # set in a launcher worker whose sweep process is gone
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}


class Interrupted(KeyboardInterrupt):
    """SIGTERM (kill, docker stop, SLURM), raised like Ctrl-C's KeyboardInterrupt so that every layer
    (the run, joblib, the Optuna sweeper) treats both alike."""

    def __init__(self, signame: str = "SIGTERM"):
        super().__init__(signame)
        self.signame = signame


def signal_name(exc: BaseException) -> str:
    return getattr(exc, "signame", "SIGINT")


def raise_on_sigterm() -> None:
    """In the main thread: SIGTERM raises Interrupted (a handler that was there, e.g. submitit's, is
    called first)."""
    if threading.current_thread() is not threading.main_thread():
        return
    previous = signal.getsignal(signal.SIGTERM)
    if getattr(previous, "normbench", False):
        return

    def handler(signum, frame):
        stop_workers()
        if callable(previous):
            with contextlib.suppress(KeyboardInterrupt):  # one that raises its own: ours says which signal
                previous(signum, frame)
        raise Interrupted(signal.Signals(signum).name)

    handler.normbench = True
    signal.signal(signal.SIGTERM, handler)


def pass_on_ctrl_c() -> None:
    """In the main thread of the sweep process: Ctrl-C first stops its joblib workers cleanly (joblib
    would SIGKILL them while their runs record themselves), then raises KeyboardInterrupt as usual."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum, frame):
        stop_workers()
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)


def process_stat(pid: int | str) -> list[str]:
    """The fields of /proc/<pid>/stat after the command name (state, ppid, ..., start time at [19]);
    [] when the process is gone or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def launcher_workers() -> list[int]:
    """This process's joblib (loky) worker processes."""
    me, found = str(os.getpid()), []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or process_stat(name)[1:2] != [me]:
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as handle:
                cmdline = handle.read()
        except OSError:
            continue
        if b"loky" in cmdline and b"resource_tracker" not in cmdline:
            found.append(int(name))
    return found


def stop_workers(timeout: float = 20.0) -> None:
    """SIGTERM reached a sweep process: pass it on to its launcher workers and give their runs the time
    to record themselves interrupted (joblib would SIGKILL them on its way out)."""
    workers = launcher_workers()
    for pid in workers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        workers = [pid for pid in workers if process_stat(pid)[:1] not in ([], ["Z"])]
        time.sleep(0.05)


def is_launcher_worker() -> bool:
    """A joblib (loky) worker of the bench/train.py process (or one that outlived it); not a SLURM task,
    whose parent is slurmstepd although it inherits the environment."""
    return ORPHANED.is_set() or os.environ.get(MAIN_PID_ENV) == str(os.getppid())


def watch_parent() -> None:
    """A launcher worker (a joblib/loky process of this sweep) whose sweep process dies -- even by
    SIGKILL -- interrupts its run (SIGTERM to itself) instead of training on as an orphan; it leaves
    once the run is recorded (normbench.job), or after 30 s."""
    parent = os.environ.get(MAIN_PID_ENV)
    if not parent or parent == str(os.getpid()) or parent != str(os.getppid()):
        return
    if any(t.name == "normbench-parent-watch" for t in threading.enumerate()):
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            threading.Event().wait(0.2)
        ORPHANED.set()
        os.kill(os.getpid(), signal.SIGTERM)
        threading.Event().wait(30)  # the run records itself interrupted and leaves (_train); else:
        os._exit(143)

    threading.Thread(target=watch, name="normbench-parent-watch", daemon=True).start()


def ignore_sigterm() -> None:
    """From here on SIGTERM does nothing: a process on its way out after submitit requeued its job (the
    requeue's SIGTERM must not cut the exit short)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


@contextlib.contextmanager
def signals_held():
    """While an interrupted run writes its record, a second Ctrl-C or SIGTERM does not cut it short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
