"""Section ``layout``: channels_last against NCHW training images/s per model and norm, on whatever device
runs the benchmark, and whether ``trainer.channels_last=auto`` picks the faster one there (the CPU and CUDA
policies in ``normbench.device``). Both layouts get identical model copies, batches and optimizer; rounds
alternate them."""

from __future__ import annotations

import itertools
from pathlib import Path

import torch

from normbench.device import resolve_channels_last
from normbench.perf import parts
from normbench.perf.common import PerfPaths, PerfSettings, alternate, compared, train_window

NORMS = ("none", "bn", "gn", "ln", "lrn")
# auto may pick the slower layout when the two are this close (noise, not a wrong policy).
TIE = 0.03


def layout_rows(s: PerfSettings, paths: PerfPaths, device: torch.device, models, norms) -> list[dict]:
    rows = []
    for model, norm in itertools.product(models, norms):
        candidates = {}
        for cl in (True, False):
            run = parts.run_parts(s, paths.conf_dir, device, [*parts.model_overrides(model, s.width, norm),
                                                              f"batch_size={s.layout_batch}",
                                                              f"trainer.channels_last={str(cl).lower()}"],
                                  num_train=s.layout_batch * s.layout_steps * 2)
            candidates["channels_last" if cl else "nchw"] = train_window(run.trainer, s.layout_steps, device)
        res = alternate(candidates, s.layout_rounds)
        cl_img_s, nchw_img_s, ratio, _ = compared(res["channels_last"], res["nchw"])
        auto = resolve_channels_last("auto", device, norm, model, s.width)
        rows.append({"model": model, "norm": norm, "batch": s.layout_batch, "width": s.width,
                     "channels_last_img_s": cl_img_s, "nchw_img_s": nchw_img_s, "ratio": ratio,
                     "auto": "channels_last" if auto else "nchw",
                     "auto_ok": abs(ratio - 1) <= TIE or (ratio > 1) == auto})  # faster, or a tie
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def bench_layout(s: PerfSettings, paths: PerfPaths, device: torch.device, workdir: Path) -> dict:
    return {"rows": layout_rows(s, paths, device, s.models, NORMS), "tie": TIE}
