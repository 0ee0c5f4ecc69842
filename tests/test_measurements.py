"""Run-side measurements read back from a real Hydra multirun (basic launcher: every job in one process):
each run's own peak memory, and no convergence epoch for a run that never learns."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from conftest import TINY, run_train

from normbench.record import learned_threshold
from normbench.run import RunMemory
from normbench.trainer import convergence_epoch


def _history(accs: list[float]) -> list[dict]:
    return [{"epoch": e, "val/acc": a} for e, a in enumerate(accs, start=1)]


def test_convergence_epoch_is_null_for_a_run_that_never_learns():
    learned = learned_threshold(10, 5000)
    assert learned == pytest.approx(0.15)  # chance + 5 points on a large validation split
    assert learned_threshold(10, 128) == pytest.approx(0.1 + 3 * (0.09 / 128) ** 0.5)  # chance + 3 sigma
    assert convergence_epoch(_history([0.3, 0.6, 0.795, 0.8]), learned_above=learned) == 3
    assert convergence_epoch(_history([0.10, 0.11, 0.105]), learned_above=learned) is None
    assert convergence_epoch([], learned_above=learned) is None


@pytest.mark.slow
def test_each_sweep_job_measures_its_own_peak_memory(tmp_path):
    """Jobs of one process, large batch, small batch, large batch: the small one's peak is far below the
    large ones', which agree. Before, every job reported the process's peak RSS so far (never smaller)."""
    sizes = (240, 16, 241)
    tiny = [a for a in TINY if not a.startswith("batch_size=")]
    run_train(["-m", *tiny, "model.width=0.5", "trainer.max_steps_per_epoch=3", "trainer.max_eval_batches=1",
               "logger=none", "optimizer.lr=1e-12", "experiment_name=mem",
               f"batch_size={','.join(map(str, sizes))}"], tmp_path)
    summaries = sorted((json.loads(p.read_text())
                        for p in (tmp_path / "multirun" / "mem").rglob("summary.json")),
                       key=lambda s: s["job_num"])
    assert [s["status"] for s in summaries] == ["completed"] * 3
    assert len({s["pid"] for s in summaries}) == 1  # one process: the case the measurement is for
    peaks = [s["metrics"]["memory/peak_mb"] for s in summaries]
    assert peaks[1] < 0.6 * min(peaks[0], peaks[2]), peaks
    assert abs(peaks[2] - peaks[0]) < 0.4 * peaks[0], peaks  # CPU RSS: runs of one size vary up to ~30%
    assert all(s["metrics"]["memory/data_mb"] > 0 for s in summaries)
    # lr 1e-12: the runs never learn, so they have no convergence epoch (before: epoch 1)
    assert [s["metrics"]["convergence/epoch"] for s in summaries] == [None] * 3


def _full_collections(action) -> int:
    """How many full (generation 2) garbage collections `action()` ran."""
    seen: list[int] = []

    def callback(phase, info):
        if phase == "start" and info["generation"] == 2:
            seen.append(1)

    gc.callbacks.append(callback)
    try:
        action()
    finally:
        gc.callbacks.remove(callback)
    return len(seen)


def test_a_sweep_job_collects_once_and_the_first_freezes_what_survives():
    """Before a sweep job's memory baseline: the first job freezes what survives its collection (the
    imported modules) out of every later one; a later job runs one full collection, which still frees
    the garbage jobs left (a cycle made after the freeze goes). A single run collects and freezes
    nothing."""
    gc.unfreeze()
    try:
        single = RunMemory(torch.device("cpu"), in_sweep=False)
        assert _full_collections(single.collect) == 0
        assert gc.get_freeze_count() == 0
        RunMemory(torch.device("cpu"), in_sweep=True).collect()  # the first job (its imports collect too)
        frozen = gc.get_freeze_count()
        assert frozen > 10_000  # torch, hydra, normbench: the heap a full collection would walk again
        cycle = _Cycle()
        cycle.me, alive = cycle, weakref.ref(cycle)
        del cycle
        assert alive() is not None
        assert _full_collections(RunMemory(torch.device("cpu"), in_sweep=True).collect) == 1
        assert alive() is None
        assert gc.get_freeze_count() == frozen  # frozen once, by the first job
    finally:
        gc.unfreeze()


class _Cycle:
    me: object = None
