"""The results as table rows (section, measure, normbench, reference, ratio, target, result) and as one
rich table."""

from __future__ import annotations

import math
from collections.abc import Callable


def _f(value, digits: int = 0, suffix: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:,.{digits}f}{suffix}"


Add = Callable[..., None]


def _loop_rows(add: Add, loop: dict) -> None:
    for r in loop.get("rows", []):
        cpu = f" (cpu {r['cpu_time_ratio']:.3f})" if r.get("cpu_time_ratio") else ""
        add("1 loop", f"{r['model']} b{r['batch']} w{r['width']:g} img/s ({r['precision']})",
            _f(r["normbench_img_s"], 1), _f(r["raw_img_s"], 1) + " raw", _f(r["ratio"], 3) + cpu,
            f"loop/raw {r['model']} b{r['batch']}")
    for r in loop.get("rows", []):
        add("1 loop", f"{r['model']} b{r['batch']} data ms/batch vs step ms", _f(r["data_ms_per_batch"], 2),
            _f(r["step_ms"], 1) + " step", _f(r["data_share"], 3))
    if loop.get("overhead"):
        o = loop["overhead"]
        add("1 loop", "loop's own cost per step (1-layer model, b8; us)", _f(o["extra_us_per_step"], 1),
            _f(1e3 * o["step_ms"], 0) + " us/step", _f(o["ratio"], 3))


def _data_rows(add: Add, data: dict) -> None:
    if "ratio" in data:
        add("2 data", f"train img/s, b{data['batch_size']} ({data['data']}, {data['num_workers']} workers)",
            _f(data["normbench_img_s"]), _f(data["torchvision_img_s"]) + " tv", _f(data["ratio"], 1),
            "data pipeline / torchvision")


def _fixed_rows(add: Add, fixed: dict) -> None:
    if "ratio" not in fixed:
        return
    add("3 fixed", "process start -> first step (s)", _f(fixed["first_step_s"], 2),
        _f(fixed["bare_import_torch_s"], 2) + " import torch", _f(fixed["ratio"], 2),
        "first step / bare import torch")
    add("3 fixed", "  vs a minimal torch script: start -> first SGD step", _f(fixed["first_step_s"], 2),
        _f(fixed["minimal_torch_step_s"], 2) + " minimal", _f(fixed["ratio_vs_minimal"], 2))
    for r in fixed.get("breakdown", []):
        add("3 fixed", f"  {r['phase']} (s from start)", _f(r["at_s"], 2), f"+{r['phase_s']:.2f}", "")
    add("3 fixed", "tiny run, start -> exit (s)", _f(fixed["tiny_run_total_s"], 2), "", "")


def _jobs_rows(add: Add, jobs: dict) -> None:
    if "outside" not in jobs:
        return
    for phase, seconds in sorted(jobs["phases"].items(), key=lambda item: -item[1]):
        add("3 jobs", f"  {phase} (s per job; share)", _f(seconds, 3), "", _f(seconds / jobs["job_s"], 3))
    add("3 jobs", f"once per sweep: start -> first job (s; {jobs['jobs']} jobs)", _f(jobs["start_s"], 2), "",
        "")
    add("3 jobs", "a later job: share outside training steps (median)", "", "",
        _f(jobs["outside_later_job"], 3))
    add("3 jobs", "tiny sweep job (b8 w0.125 100 steps, W&B offline): s; share outside training steps",
        _f(jobs["job_s"], 2), "", _f(jobs["outside"], 3), "sweep job: share outside training steps")


def _probe_rows(add: Add, probes: dict) -> None:
    none = next((x["img_s"] for x in probes.get("rows", []) if x["probe"] == "none"), None)
    for r in probes.get("rows", []):
        if r["probe"] != "none":
            add("4 probes", f"probe={r['probe']} img/s (vgg_a w{probes['width']:g} b{probes['batch']})",
                _f(r["img_s"], 1), _f(none, 1) + " none",
                _f(r["ratio_vs_none"], 3) + f" (+{100 * r['overhead']:.1f}%)")


def _layout_rows(add: Add, layout: dict) -> None:
    for r in layout.get("rows", []):
        add("5 layout", f"channels_last / NCHW {r['model']} w{r['width']:g} b{r['batch']} norm={r['norm']} "
            f"(auto: {r['auto']})", _f(r["channels_last_img_s"], 1), _f(r["nchw_img_s"], 1) + " nchw",
            _f(r["ratio"], 3))


def _cuda_rows(add: Add, cuda: dict) -> None:
    for r in cuda.get("epochs", []):
        add("6 cuda", f"vgg_a b{r['batch']} epoch s / TFLOP/s (peak {_f(cuda['peak_tflops'])})",
            _f(r["epoch_s"], 1), _f(r["achieved_tflops"], 1) + " TFLOP/s",
            _f(r["mfu"], 3) + " of peak" if r["mfu"] else "-")
    for r in cuda.get("concurrency", {}).get("levels", []):
        add("6 cuda", f"runs/hour, {r['concurrent']} concurrent (b8, {cuda['concurrency']['steps_per_job']} "
            "steps)",
            _f(r["runs_per_hour"], 1), _f(r["train_img_s_total"]) + " img/s", _f(r["speedup"], 2)
            + f" (img/s {r['train_speedup']:.2f})")


def _fused_rows(add: Add, fused: dict) -> None:
    for r in fused.get("rows", []):
        concurrent = (f", {_f(r['concurrent_steps_s'], 1)} {r['k']} procs" if r.get("concurrent_steps_s")
                      else "")
        add("7 fused", f"model-steps/s fused K={r['k']} w{r['width']:g} b{r['batch']}",
            _f(r["fused_steps_s"], 1),
            _f(r["sequential_steps_s"], 1) + f" seq{concurrent}", _f(r["speedup"], 2),
            f"fused / sequential K={r['k']} w{r['width']:g} b{r['batch']}")


# section key -> (table label, its rows, the verdict-only row after them: measure, target name, digits)
SECTION_ROWS = {
    "loop": ("1 loop", _loop_rows, ("data share of a step (worst)", "data time / step time (worst)", 3)),
    "data": ("2 data", _data_rows, None),
    "fixed_cost": ("3 fixed", _fixed_rows, None),
    "jobs": ("3 jobs", _jobs_rows, None),
    "probes": ("4 probes", _probe_rows, None),
    "layout": ("5 layout", _layout_rows, ("auto picks the faster layout (wrong picks)",
                                          "channels_last=auto picks the faster layout", 0)),
    "cuda": ("6 cuda", _cuda_rows, ("runs/hour gain from concurrency", "runs/hour, concurrent / single (b8)",
                                    2)),
    "fused": ("7 fused", _fused_rows, None),
}


def table_rows(results: dict) -> list[tuple[str, ...]]:
    """(section, measure, normbench, reference, ratio, target, result) rows."""
    verdict = {t["name"]: t for t in results.get("targets", [])}
    rows: list[tuple[str, ...]] = []

    def add(section, measure, nb, ref, ratio, key=None):
        t = verdict.get(key) or {}
        rows.append((section, measure, nb, ref, ratio, t.get("target", ""), t.get("result", "")))

    for key, (label, section_rows, verdict_row) in SECTION_ROWS.items():
        part = results.get(key, {})
        if part.get("skipped"):
            add(label, "skipped", part["skipped"], "", "")
        section_rows(add, part)
        if verdict_row and verdict_row[1] in verdict:
            measure, name, digits = verdict_row
            add(label, measure, "", "", _f(verdict[name]["value"], digits), name)
    return rows


def print_table(results: dict, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    m = results["machine"]
    title = (f"normbench perf{' (quick)' if results['settings']['quick'] else ''}: {m['cpu']}, "
             f"{m['cores']} cores, torch {m['torch']}, device {m['device']}"
             f"{' ' + m['gpu'] if m.get('gpu') else ''}, {m['torch_threads']} threads")
    table = Table(title=title, title_justify="left")
    for col, justify in (("section", "left"), ("measure", "left"), ("normbench", "right"),
                         ("reference", "right"), ("ratio", "right"), ("target", "right"),
                         ("result", "center")):
        table.add_column(col, justify=justify, no_wrap=col != "measure")
    for row in table_rows(results):
        style = {"PASS": "green", "FAIL": "red"}.get(row[-1])
        table.add_row(*row[:-1], f"[{style}]{row[-1]}[/]" if style else row[-1])
    Console(file=file, width=max(140, Console().width)).print(table)
