"""Sweep bookkeeping under the sweep dir: identity index, per-identity locks, finished curves, journal.

Layout (hidden from the report, which does not enter dot-dirs)::

    <sweep dir>/.normbench/
        index/<identity>.json      where the run of this identity lives and how it ended:
                                   {"identity", "dir" (relative to the sweep dir), "status",
                                    "objective", "time_s", "epochs_done", "updated_at"}
        locks/<identity>.lock      flock()ed (filelock) while a job trains that identity (released by
                                   the kernel when the job dies, so a SIGKILL never leaves a stale lock)
        curves/<identity>.json     validation-error curve of a completed run (for the median pruner)
        sweeps/<sweep id>/<job>.json   one file per job of one sweep invocation (for the summary line)

The records are the truth, the index only a cache of them: an entry that is missing, unreadable, or
behind its record (a job killed between writing its summary and updating its entry) is rebuilt from
the records (SweepState.recover), with a warning; a completed run is never trained again because of its
index entry.

Every file is written whole through a temp file + rename, one file per identity, so concurrent jobs
(joblib workers, SLURM array tasks, several hosts on a shared filesystem) never write the same file
at the same time and a killed job never leaves a half file. A lookup is one file open: O(1) in the
size of the sweep.

Nothing here imports torch: the planning command uses it too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from filelock import FileLock

from normbench.errors import warn
from normbench.record import (
    DONE,
    SUMMARY,
    Status,
    atomic_write_json,
    now_iso,
    read_json,
    read_summary,
    run_dirs,
)

STATE_DIR = ".normbench"
SWEEP_ID_ENV = "NORMBENCH_SWEEP_ID"
SKIPPED = "skipped"  # a journal outcome: the job found its run done and did not train
OUTCOMES = (Status.COMPLETED, Status.DIVERGED, Status.FAILED, Status.PRUNED, SKIPPED)
SHOWN_IF_ANY = (Status.INTERRUPTED,)  # in the summary line only when some job has it

# Journal rows a job could not write (a full disk): kept for the summary line of this process.
_UNWRITTEN: dict[str, dict[str, dict]] = {}


def record_is_done(summary: dict | None, identity: str, statuses: tuple[str, ...]) -> bool:
    """A summary.json that says this identity finished with one of `statuses` (the truth, whatever
    the index says)."""
    return bool(summary) and summary.get("identity") == identity and summary.get("status") in statuses


def done_statuses(pruning_on: bool) -> tuple[str, ...]:
    """What counts as done. A pruned run is done while pruning is on (re-running it would only be
    pruned again); with pruning off, a re-run continues it from its checkpoint to the end."""
    return (*DONE, Status.PRUNED) if pruning_on else DONE


class SweepState:
    """The `.normbench/` bookkeeping of one sweep dir."""

    def __init__(self, sweep_dir: str | Path):
        self.root = Path(sweep_dir).absolute()
        self.state = self.root / STATE_DIR
        self.index_dir = self.state / "index"
        self.locks_dir = self.state / "locks"
        self.curves_dir = self.state / "curves"
        self.journal_dir = self.state / "sweeps"
        self.cached: dict[str, dict] = {}  # the planning command's in-memory copy of the index

    # ------------------------------------------------------------------------------------- index
    def ensure_index(self) -> None:
        """Create the index; a sweep dir that has records but no index (e.g. copied in) is indexed once
        from its summary.json files."""
        if self.index_dir.is_dir():
            return
        self.state.mkdir(parents=True, exist_ok=True)
        with self._file_lock(self.state / "index.lock"):
            if self.index_dir.is_dir():
                return
            entries = self.scan_records()
            tmp = self.state / f".index.{os.getpid()}.tmp"
            tmp.mkdir(parents=True, exist_ok=True)
            for identity, entry in entries.items():
                atomic_write_json(tmp / f"{identity}.json", entry)
            os.replace(tmp, self.index_dir)

    def scan_records(self) -> dict[str, dict]:
        """Index entries built from the records under the sweep dir (a one-off full scan). Where an
        identity has several records, a done one wins over an incomplete one."""
        entries: dict[str, dict] = {}
        for path, files in run_dirs(self.root):
            summary = read_summary(Path(path)) if SUMMARY in files else None
            if summary and summary.get("identity"):
                entry = self.entry_from_summary(Path(path), summary)
                old = entries.get(entry["identity"])
                if old is None or (old["status"] not in DONE and entry["status"] in DONE):
                    entries[entry["identity"]] = entry
        return entries

    def entry_from_summary(self, run_dir: Path, summary: dict) -> dict:
        status = summary.get("status") or Status.RUNNING
        return {"identity": summary["identity"], "dir": self.relative(run_dir), "status": status,
                "objective": summary.get("objective"), "epochs_done": summary.get("epochs_done"),
                "time_s": (summary.get("metrics") or {}).get("time/total_s"),
                "updated_at": summary.get("finished_at") or summary.get("started_at")}

    def relative(self, run_dir: Path) -> str:
        run_dir = Path(run_dir).absolute()
        try:
            return str(run_dir.relative_to(self.root))
        except ValueError:
            return str(run_dir)

    def run_dir(self, entry: dict) -> Path:
        return self.root / entry["dir"]  # an absolute "dir" stays absolute

    def get(self, identity: str) -> dict | None:
        return read_json(self.index_dir / f"{identity}.json")

    def entry_is_corrupt(self, identity: str) -> bool:
        """The entry's file is there but is not a JSON object (a torn or damaged file)."""
        path = self.index_dir / f"{identity}.json"
        return self.get(identity) is None and path.exists()

    def recover(self, identity: str, statuses: tuple[str, ...], candidates: list[Path]) -> dict | None:
        """The run of this identity that its record says is done although its index entry does not
        (missing, unreadable, or still `running` after a kill between the summary and the index
        update): the entry is rebuilt from the record, with a warning, and returned. Looks in the
        entry's dir and `candidates` (the job's own dir); an unreadable entry is rebuilt from a scan of
        every record (where the run of this identity is, done or not)."""
        entry = self.get(identity)
        if entry is None and self.entry_is_corrupt(identity):
            entry = self.scan_records().get(identity)
            self.put_entry(identity, entry)
            where = f"rebuilt from its record in {self.run_dir(entry)}" if entry else "no record of it found"
            warn(f"the sweep index entry of {identity} was unreadable: {where}")
            if entry and record_is_done(read_summary(self.run_dir(entry)), identity, statuses):
                return entry
        dirs = ([self.run_dir(entry)] if entry and entry.get("dir") else []) + [Path(c) for c in candidates]
        for run_dir in dirs:
            summary = read_summary(run_dir)
            if record_is_done(summary, identity, statuses):
                rebuilt = self.entry_from_summary(Path(run_dir), summary)
                self.put_entry(identity, rebuilt)
                was = "missing" if entry is None else f"'{entry.get('status')}' in {entry.get('dir')}"
                warn(f"the sweep index entry of {identity} was {was} but its record in {run_dir} says "
                     f"{summary['status']}: entry rebuilt from the record, the run is not trained again")
                return rebuilt
        return None

    def put_entry(self, identity: str, entry: dict | None) -> None:
        """Replace the entry whole (None: drop an unreadable one). Never raises: the index is a cache."""
        path = self.index_dir / f"{identity}.json"
        try:
            if entry is None:
                path.unlink(missing_ok=True)
            else:
                atomic_write_json(path, entry)
        except OSError as err:
            warn(f"could not update the sweep index: {err}")

    def put(self, identity: str, **fields) -> dict:
        entry = {**(self.get(identity) or {}), **fields, "identity": identity, "updated_at": now_iso()}
        if isinstance(entry.get("dir"), Path):
            entry["dir"] = self.relative(entry["dir"])
        atomic_write_json(self.index_dir / f"{identity}.json", entry)
        return entry

    def entries(self) -> Iterator[dict]:
        """All index entries (a full read: for the planning command, not for jobs)."""
        try:
            names = os.listdir(self.index_dir)
        except OSError:
            return
        for name in names:
            if name.endswith(".json") and not name.startswith("."):
                entry = read_json(self.index_dir / name)
                if entry:
                    yield entry

    def done(self, identity: str, statuses: tuple[str, ...] = DONE) -> dict | None:
        """The index entry of a finished run of this identity whose record still says so, else None.
        Two file reads, whatever the size of the sweep."""
        entry = self.get(identity)
        if not entry or entry.get("status") not in statuses:
            return None
        summary = read_summary(self.run_dir(entry))
        if not summary or summary.get("identity") != identity or summary.get("status") not in statuses:
            return None
        return {**entry, "objective": summary.get("objective", entry.get("objective")),
                "status": summary["status"]}

    # ------------------------------------------------------------------------------------- locks
    @staticmethod
    @contextlib.contextmanager
    def _file_lock(path: Path) -> Iterator[None]:
        """flock() on `path` (filelock's UnixFileLock): released by the kernel when its holder dies. On a
        filesystem without flock, filelock warns and falls back to a marker file it reclaims from a
        holder that died on the same host."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(path):
            yield

    def lock(self, identity: str):
        """Held while a job works on this identity: a second job of the same identity (a duplicate
        in the grid, or a second sweep process) waits, then finds it done and skips it."""
        return self._file_lock(self.locks_dir / f"{identity}.lock")

    # ------------------------------------------------------------------------------------ curves
    def add_curve(self, identity: str, errors: list[float]) -> None:
        atomic_write_json(self.curves_dir / f"{identity}.json", {"identity": identity, "val_error": errors})

    # ----------------------------------------------------------------------------------- journal
    def journal(self, sweep_id: str, job: str, quiet: bool = False, **fields) -> None:
        """One job's outcome. Never raises: on a full disk the row is kept in this process (the basic
        launcher's summary line still counts it) and a warning says so."""
        row = {**fields, "at": now_iso()}
        try:
            atomic_write_json(self.journal_dir / sweep_id / f"{job}.json", row)
        except OSError as err:
            _UNWRITTEN.setdefault(sweep_id, {})[job] = row
            if not quiet:
                warn(f"could not write the sweep journal: {err}")

    def read_journal(self, sweep_id: str) -> list[dict]:
        folder = self.journal_dir / sweep_id
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            names = []
        rows = {n[:-5]: read_json(folder / n) for n in names if n.endswith(".json") and not n.startswith(".")}
        rows.update(_UNWRITTEN.get(sweep_id, {}))
        return [r for r in rows.values() if r]


def count_outcomes(rows: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(OUTCOMES, 0)
    for row in rows:
        status = row.get("status")
        counts[status] = counts.get(status, 0) + 1
    return counts


def summary_line(sweep_dir: str, counts: dict[str, int], expected: int | None = None) -> str:
    """`sweep <dir>: N completed / N diverged / N failed / N pruned / N skipped`."""
    if expected == 0:
        return f"sweep {sweep_dir}: no runs (the sweep expands to zero jobs; nothing was launched)"
    shown = list(OUTCOMES) + [k for k in SHOWN_IF_ANY if counts.get(k)]
    line = f"sweep {sweep_dir}: " + " / ".join(f"{counts.get(k, 0)} {k}" for k in shown)
    reported = sum(counts.values())
    if expected is not None and reported < expected:
        line += f" ({expected - reported} of {expected} jobs did not report)"
    return line
