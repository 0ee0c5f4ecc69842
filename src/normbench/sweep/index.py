"""Sweep bookkeeping under `<sweep dir>/.normbench/` (layout: docs/sweeps.md): the identity index,
per-identity locks, finished curves and the journal.

The records are the truth, the index only a cache of them. Every file is written whole, one per identity,
so concurrent jobs never write the same file. Nothing here imports torch: the planning command uses it.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

from filelock import FileLock

from normbench.errors import warn
from normbench.record import (
    DONE,
    SUMMARY,
    Status,
    atomic_write_json,
    load_json,
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
JSON_FILES = "[!.]*.json"  # not the temp files of a write in progress

# Journal rows a job could not write (a full disk): kept for the summary line of this process.
_UNWRITTEN: dict[str, dict[str, dict]] = {}


def record_is_done(summary: dict | None, identity: str, statuses: tuple[str, ...]) -> bool:
    return bool(summary) and summary.get("identity") == identity and summary.get("status") in statuses


def _entry(data: dict | None) -> dict | None:
    """An index entry as read, less a "dir" that is no path (a damaged entry's, never followed)."""
    if data is not None and not isinstance(data.get("dir", ""), str):
        data = {k: v for k, v in data.items() if k != "dir"}
    return data


def sibling_dir(job_dir: Path, identity: str) -> Path:  # a job's, when its dir holds another identity
    return job_dir.with_name(f"{job_dir.name}.{identity}")


def done_statuses(pruning_on: bool) -> tuple[str, ...]:
    """What counts as done. A pruned run is done while pruning is on (re-running it would only be
    pruned again); with pruning off, a re-run continues it from its checkpoint to the end."""
    return (*DONE, Status.PRUNED) if pruning_on else DONE


class SweepState:
    def __init__(self, sweep_dir: str | Path):
        self.root = Path(sweep_dir).absolute()
        self.state = self.root / STATE_DIR
        self.index_dir = self.state / "index"
        self.locks_dir = self.state / "locks"
        self.curves_dir = self.state / "curves"
        self.journal_dir = self.state / "sweeps"
        self.cached: dict[str, dict] = {}  # the planning command's in-memory copy of the index

    def ensure_index(self) -> None:
        """Create the index; a sweep dir with records but no index is indexed once from its summaries."""
        if self.index_dir.is_dir():
            return
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
        """Index entries from a full scan of the records; of several of an identity, a done one wins."""
        entries: dict[str, dict] = {}
        for path, files in run_dirs(self.root):
            try:
                summary = load_json(Path(path, SUMMARY)) if SUMMARY in files else None
            except (OSError, ValueError) as err:
                warn(f"{Path(path, SUMMARY)} is skipped: {getattr(err, 'strerror', None) or err}")
                continue
            if isinstance(summary, dict) and summary.get("identity"):
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
        return str(run_dir.relative_to(self.root) if run_dir.is_relative_to(self.root) else run_dir)

    def run_dir(self, entry: dict) -> Path:
        return self.root / entry["dir"]  # an absolute "dir" stays absolute

    def get(self, identity: str) -> dict | None:
        return _entry(read_json(self.index_dir / f"{identity}.json"))

    def recover(self, identity: str, statuses: tuple[str, ...], candidates: list[Path]) -> dict | None:
        """The entry of a run whose record in its entry's dir or `candidates` says done although its index
        entry does not (missing, unreadable, or left `running` by a kill), rebuilt with a warning."""
        entry = self.get(identity)
        if entry is None and (self.index_dir / f"{identity}.json").exists():  # there but unreadable
            entry = self.scan_records().get(identity)
            self.put_entry(identity, entry)
            where = f"rebuilt from its record in {self.run_dir(entry)}" if entry else "no record of it found"
            warn(f"the sweep index entry of {identity} was unreadable: {where}")
            if entry and record_is_done(read_summary(self.run_dir(entry)), identity, statuses):
                return entry
        found = self.done_record(identity, statuses, candidates)
        if found is None:
            return None
        run_dir, summary = found
        rebuilt = self.entry_from_summary(run_dir, summary)
        self.put_entry(identity, rebuilt)
        was = "missing" if entry is None else f"'{entry.get('status')}' in {entry.get('dir')}"
        warn(f"the sweep index entry of {identity} was {was} but its record in {run_dir} says "
             f"{summary['status']}: entry rebuilt from the record, the run is not trained again")
        return rebuilt

    def done_record(self, identity: str, statuses: tuple[str, ...], candidates: list[Path]):
        """(dir, summary) of a done record in the entry's dir or `candidates`, or None (reads only)."""
        entry = self.get(identity) or {}
        dirs = [self.run_dir(entry)] if entry.get("dir") else []
        for run_dir in [*dirs, *map(Path, candidates)]:
            summary = read_summary(run_dir)
            if record_is_done(summary, identity, statuses):
                return run_dir, summary
        return None

    def put_entry(self, identity: str, entry: dict | None) -> None:
        """None drops the entry. Never raises: the index is a cache."""
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

    def known_entries(self) -> dict[str, dict]:
        """All index entries, or a scan of the records without an index (writes nothing)."""
        if not self.index_dir.is_dir():
            return self.scan_records()
        entries = (_entry(read_json(path)) for path in sorted(self.index_dir.glob(JSON_FILES)))
        return {e["identity"]: e for e in entries if e and e.get("identity")}

    def done(self, identity: str, statuses: tuple[str, ...] = DONE) -> dict | None:
        """The entry of a finished run whose record still says so (two reads), else None."""
        entry = self.get(identity)
        if not entry or entry.get("status") not in statuses or not entry.get("dir"):
            return None
        summary = read_summary(self.run_dir(entry))
        if not record_is_done(summary, identity, statuses):
            return None
        return {**entry, "objective": summary.get("objective", entry.get("objective")),
                "status": summary["status"]}

    @staticmethod
    def _file_lock(path: Path) -> FileLock:  # flock(): released by the kernel when its holder dies
        path.parent.mkdir(parents=True, exist_ok=True)
        return FileLock(path)

    def lock(self, identity: str):
        """Held while a job works on this identity: a second job of it waits, then finds it done."""
        return self._file_lock(self.locks_dir / f"{identity}.lock")

    def add_curve(self, identity: str, errors: list[float]) -> None:
        atomic_write_json(self.curves_dir / f"{identity}.json", {"identity": identity, "val_error": errors})

    def journal(self, sweep_id: str, job: str, quiet: bool = False, **fields) -> None:
        """One job's outcome. Never raises: on a full disk the row is kept in this process."""
        row = {**fields, "at": now_iso()}
        try:
            atomic_write_json(self.journal_dir / sweep_id / f"{job}.json", row)
        except OSError as err:
            _UNWRITTEN.setdefault(sweep_id, {})[job] = row
            if not quiet:
                warn(f"could not write the sweep journal: {err}")

    def read_journal(self, sweep_id: str) -> list[dict]:
        rows = {path.stem: read_json(path) for path in sorted((self.journal_dir / sweep_id).glob(JSON_FILES))}
        rows.update(_UNWRITTEN.get(sweep_id, {}))
        return [r for r in rows.values() if r]


def count_outcomes(rows: list[dict]) -> dict[str, int]:
    return {**dict.fromkeys(OUTCOMES, 0), **Counter(row.get("status") for row in rows)}


def summary_line(sweep_dir: str, counts: dict[str, int], expected: int | None = None) -> str:
    if expected == 0:
        return f"sweep {sweep_dir}: no runs (the sweep expands to zero jobs; nothing was launched)"
    shown = list(OUTCOMES) + [k for k in SHOWN_IF_ANY if counts.get(k)]
    line = f"sweep {sweep_dir}: " + " / ".join(f"{counts.get(k, 0)} {k}" for k in shown)
    reported = sum(counts.values())
    if expected is not None and reported < expected:
        line += f" ({expected - reported} of {expected} jobs did not report)"
    return line
