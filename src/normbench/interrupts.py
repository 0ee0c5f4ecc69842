"""SIGTERM (kill, docker stop, SLURM), SIGHUP and Ctrl-C raise `Interrupted`, a KeyboardInterrupt, so that
every layer (the run, joblib, the Optuna sweeper) treats them alike; they are passed on to a sweep's joblib
workers, which never outlive their sweep process. Only the first interrupts: later ones are ignored, so
that the record and the closing line are written and the exit status is the first signal's.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

MAIN_PID_ENV = "NORMBENCH_MAIN_PID"   # the pid of the bench/train.py process (its launcher's workers see it)
ORPHANED = threading.Event()          # set in a launcher worker whose sweep process is gone
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143, "SIGHUP": 129}
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # raise Interrupted (SIGINT: see pass_on_ctrl_c)


class Interrupted(KeyboardInterrupt):
    def __init__(self, signame: str = "SIGTERM"):
        super().__init__(signame)
        self.signame = signame


def signal_name(exc: BaseException) -> str:
    return getattr(exc, "signame", "SIGINT")


def raise_on_sigterm() -> None:  # in the main thread
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in STOP_SIGNALS:
        previous = signal.getsignal(signum)
        if not getattr(previous, "normbench", False):
            signal.signal(signum, _raiser(previous))


def _raiser(previous):  # a handler that was there (e.g. submitit's) is called first
    def handler(signum, frame):
        ignore_further_interrupts()
        stop_workers()
        if callable(previous):
            with contextlib.suppress(KeyboardInterrupt):  # one that raises its own: ours says which signal
                previous(signum, frame)
        raise Interrupted(signal.Signals(signum).name)

    handler.normbench = True
    return handler


def pass_on_ctrl_c() -> None:
    """In the main thread of the sweep process: Ctrl-C first stops its joblib workers cleanly (joblib
    would SIGKILL them while their runs record themselves), then raises a KeyboardInterrupt as usual."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, _raiser(None))


def ignore_further_interrupts(exiting: bool = False) -> None:
    """After the first interrupt: a no-op Python handler while the process runs (a signal that had
    arrived when SIG_IGN was set would raise "Signal ignored due to race condition" mid-record); SIG_IGN
    when `exiting`, since Python's exit gives a Python handler's signal its default action back."""
    for signum in (signal.SIGINT, *STOP_SIGNALS):
        signal.signal(signum, signal.SIG_IGN if exiting else (lambda signum, frame: None))


def process_stat(pid: int | str) -> list[str]:
    """/proc/<pid>/stat's fields after the command name ([19]: start time); [] when gone."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return []


def launcher_workers() -> list[int]:  # this process's joblib (loky) workers
    me, found = str(os.getpid()), []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or process_stat(name)[1:2] != [me]:
            continue
        with contextlib.suppress(OSError), open(f"/proc/{name}/cmdline", "rb") as handle:
            cmdline = handle.read()
            if b"loky" in cmdline and b"resource_tracker" not in cmdline:
                found.append(int(name))
    return found


def stop_workers(timeout: float = 20.0) -> None:
    """Pass SIGTERM on to the launcher workers and give their runs the time to record themselves
    interrupted (joblib would SIGKILL them on its way out)."""
    workers = launcher_workers()
    for pid in workers:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while workers and time.monotonic() < deadline:
        workers = [pid for pid in workers if process_stat(pid)[:1] not in ([], ["Z"])]
        time.sleep(0.05)


def is_launcher_worker() -> bool:
    """A joblib worker of the bench/train.py process (or one that outlived it); not a SLURM task, whose
    parent is slurmstepd although it inherits the environment."""
    return ORPHANED.is_set() or os.environ.get(MAIN_PID_ENV) == str(os.getppid())


def watch_parent() -> None:
    """A launcher worker whose sweep process dies, even by SIGKILL, interrupts its run instead of training
    on as an orphan; it leaves once the run is recorded, or after 30 s."""
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


@contextlib.contextmanager
def signals_held():
    """While an interrupted run writes its record, a second Ctrl-C or SIGTERM does not cut it short."""
    held = (signal.SIGINT, *STOP_SIGNALS) if threading.current_thread() is threading.main_thread() else ()
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in held}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
