"""Section ``probes``: training images/s with probe=landscape / grad_similarity / all at their default
intervals against probe=none (vgg_a, one landscape interval per round, timed in alternating chunks)."""

from __future__ import annotations

import copy
import statistics
from pathlib import Path

import torch
from omegaconf import OmegaConf

from normbench.device import resolve_channels_last, resolve_precision
from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, alternate, paired_ratio, rates, timed, train_seen
from normbench.trainer import LoopState

VARIANTS = ("none", "landscape", "grad_similarity", "all")
INTERVAL, CHUNK = 50, 10   # a round = the 50-step landscape interval, timed in alternating 10-step chunks


def _trainers(s: PerfSettings, paths: PerfPaths, device: torch.device, variants: dict) -> dict:
    """One Trainer per probe variant, each on an identical copy of one model."""
    from normbench.probes import build_probes

    amp = resolve_precision(s.precision, device)
    channels_last = resolve_channels_last(s.channels_last, device, "bn")
    data = parts.synthetic_data(device, num_train=s.probe_batch * INTERVAL + s.probe_batch)
    base = parts.cnn("vgg_a", s.probe_width, "bn", device, channels_last)
    return {name: parts.trainer(copy.deepcopy(base), data,
                                parts.batch_stream(data, s.probe_batch, channels_last, device), device, amp,
                                channels_last, parts.NullSink(), paths.conf_dir, probes=build_probes(cfg))
            for name, cfg in variants.items()}


def bench_probes(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    variants = parts.probe_configs(paths.conf_dir, VARIANTS)
    trainers = _trainers(s, paths, device, variants)
    states = {name: LoopState() for name in variants}

    def chunk_of(name: str):
        return lambda: timed(lambda: train_seen(trainers[name], states[name], CHUNK), device)

    # warm-up: one whole interval each, so every probe has run once (and the step counters stay aligned)
    res = alternate({name: chunk_of(name) for name in variants}, s.probe_rounds, warmup=INTERVAL // CHUNK,
                    chunks=INTERVAL // CHUNK)
    none_rates = rates(res["none"])
    rows = []
    for name, cfg in variants.items():
        ratio = paired_ratio(rates(res[name]), none_rates)
        settings = {k: v for k, v in OmegaConf.to_container(cfg).items() if "interval" in k}
        rows.append({"probe": name, "img_s": statistics.median(rates(res[name])), "ratio_vs_none": ratio,
                     "overhead": 1.0 / ratio - 1.0, "settings": settings})
    return {"rows": rows, "model": "vgg_a", "width": s.probe_width, "batch": s.probe_batch,
            "steps_per_round": INTERVAL, "chunk_steps": CHUNK, "rounds": s.probe_rounds}
