"""Section ``loop`` (docs/PERFORMANCE.md): ``Trainer.train_steps`` against a minimal hand-written loop on
identical model copies and data; the data pipeline's own time; the loop's own cost per step."""

from __future__ import annotations

import copy
import itertools
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from normbench.device import compile_model
from normbench.optim import fast_optimizer_kwargs
from normbench.perf import parts
from normbench.perf.common import (
    PerfPaths,
    PerfSettings,
    alternate,
    autocast,
    compared,
    paired_ratio,
    precision_name,
    rates,
    timed,
    train_window,
)
from normbench.record import RecordSink

WHAT = ("Trainer.train_steps (RecordSink, constant scheduler, accuracy, logging every 25 steps, no "
        "progress bar) vs a hand-written forward/CE/zero_grad/backward/SGD-step loop; same model copy, "
        "BatchStream data with crop+flip+normalize in both, SGD lr 0.01 momentum 0.9")


def _raw_loop(model, stream, steps: int, device: torch.device, amp, compile_: bool) -> Callable[[], int]:
    forward = compile_model(model) if compile_ else model
    params = list(model.parameters())
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, **fast_optimizer_kwargs(torch.optim.SGD, params))

    def run() -> int:
        seen = 0
        for x, y in itertools.islice(stream, steps):
            with autocast(device, amp):
                loss = F.cross_entropy(forward(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seen += y.shape[0]
        return seen

    return run


def _candidates(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path, model_name: str,
                batch: int, steps: int) -> tuple[dict, dict]:
    run = parts.run_parts(s, paths.conf_dir, device, [*parts.model_overrides(model_name, s.width),
                                                       f"batch_size={batch}"],
                          num_train=max(batch * steps * 2, 512),
                          sink=RecordSink(workdir / f"loop-{model_name}-{batch}"))
    # the Trainer has made its norms compute in fp32 under autocast: the copy keeps that, and the weights
    raw_model = copy.deepcopy(run.model)
    raw = _raw_loop(raw_model, parts.another_stream(run, seed=1), steps, device,
                    run.trainer.settings.amp_dtype, s.compile)
    data = parts.another_stream(run, seed=2)  # 4 x `steps` batches of the pipeline alone
    data_only = lambda: sum(y.shape[0] for _ in range(4) for _x, y in itertools.islice(data, steps))
    candidates = {"normbench": train_window(run.trainer, steps, device),
                  "raw": lambda: timed(raw, device),
                  "data": lambda: timed(data_only, device)}
    return candidates, {"precision": precision_name(run.trainer.settings.amp_dtype),
                        "channels_last": run.trainer.settings.channels_last}


def _row(s: PerfSettings, device: torch.device, model_name: str, batch: int, steps: int, config: dict,
         res: dict) -> dict:
    nb, raw, ratio, ratio_quartiles = compared(res["normbench"], res["raw"])
    nb_rates, raw_rates = rates(res["normbench"]), rates(res["raw"])
    dat = statistics.median(rates(res["data"]))
    step_ms, data_ms = 1000 * batch / nb, 1000 * batch / dat
    return {"model": model_name, "batch": batch, "width": s.width, "steps_per_window": steps,
           "rounds": len(res["raw"]), "precision": config["precision"],
           "channels_last": config["channels_last"], "compile": s.compile,
           "normbench_img_s": nb, "raw_img_s": raw, "ratio": ratio, "ratio_quartiles": ratio_quartiles,
           "best_ratio": max(nb_rates) / max(raw_rates),
           "cpu_time_ratio": paired_ratio(rates(res["normbench"], cpu=True), rates(res["raw"], cpu=True))
           if device.type == "cpu" else None,
           "normbench_rounds_img_s": nb_rates, "raw_rounds_img_s": raw_rates,
           "data_img_s": dat, "step_ms": step_ms, "data_ms_per_batch": data_ms,
           "data_share": data_ms / step_ms,
           "extra_us_per_step": 1e6 * statistics.median((a.wall_s - b.wall_s) / steps
                                                        for a, b in zip(res["normbench"], res["raw"]))}


def loop_config(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path, model_name: str,
                batch: int, *, steps: int | None = None, budget_s: float | None = None) -> dict:
    steps = steps or int(s.steps.get(batch, max(3, 384 // batch)))
    candidates, config = _candidates(s, paths, device, workdir, model_name, batch, steps)
    res = alternate(candidates, s.rounds, budget_s=s.loop_budget_s if budget_s is None else budget_s)
    return _row(s, device, model_name, batch, steps, config, res)


def bench_loop(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    rows = [loop_config(s, paths, device, workdir, model_name, batch)
            for model_name, batch in itertools.product(s.models, s.batches)]
    # The loop's own cost per step, measured where it is not lost in the noise: a near-free model (one
    # linear layer) at batch 8, 25 steps (one logging interval) per window. A step of a real model takes
    # `step_ms`; normbench / raw >= step_ms / (step_ms + overhead) follows without the noise of big steps.
    overhead = loop_config(s, paths, device, workdir, "linear", 8, steps=25,
                           budget_s=min(s.loop_budget_s, 5.0))
    overhead_ms = max(overhead["extra_us_per_step"], 0.0) / 1e3
    for row in rows:
        row["predicted_ratio"] = row["step_ms"] / (row["step_ms"] + overhead_ms)
    return {"rows": rows, "overhead": overhead, "threads": torch.get_num_threads(), "what": WHAT}
