"""Section ``probes``: training images/s with probe=landscape / grad_similarity / all at their default
intervals against probe=none (vgg_a, one landscape interval per round, timed in alternating chunks)."""

from __future__ import annotations

from pathlib import Path

import torch

from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, alternate, compared, train_window
from normbench.trainer import LoopState

VARIANTS = ("none", "landscape", "grad_similarity", "all")
INTERVAL, CHUNK = 50, 10   # a round = the 50-step landscape interval, timed in alternating 10-step chunks


def bench_probes(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    # one Trainer per probe variant, each on the same model (same seed, same weights) and data
    model = [*parts.model_overrides("vgg_a", s.probe_width), f"batch_size={s.probe_batch}"]
    trainers = {name: parts.run_parts(s, paths.conf_dir, device, [*model, f"probe={name}"],
                                      num_train=s.probe_batch * INTERVAL + s.probe_batch).trainer
                for name in VARIANTS}
    states = {name: LoopState() for name in VARIANTS}

    # warm-up: one whole interval each, so every probe has run once (and the step counters stay aligned)
    res = alternate({name: train_window(trainers[name], CHUNK, device, states[name]) for name in VARIANTS},
                    s.probe_rounds, warmup=INTERVAL // CHUNK, chunks=INTERVAL // CHUNK)
    rows = []
    for name in VARIANTS:
        img_s, _, ratio, _ = compared(res[name], res["none"])
        settings = {f"{p.name}.interval": p.interval for p in trainers[name].probes}
        rows.append({"probe": name, "img_s": img_s, "ratio_vs_none": ratio,
                     "overhead": 1.0 / ratio - 1.0, "settings": settings})
    return {"rows": rows, "model": "vgg_a", "width": s.probe_width, "batch": s.probe_batch,
            "steps_per_round": INTERVAL, "chunk_steps": CHUNK, "rounds": s.probe_rounds}
