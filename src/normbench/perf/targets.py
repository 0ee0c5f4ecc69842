"""The performance targets and their PASS / FAIL / skipped verdicts on a result dict."""

from __future__ import annotations

import operator

# The loop ones are for the CPU; on a GPU the aim is the same.
LOOP_TARGETS = {128: 0.97, 8: 0.95}
DATA_RATIO_TARGET = 10.0
DATA_SHARE_TARGET = 0.10       # the data pipeline's time per batch, as a fraction of a training step
FIXED_COST_TARGET = 1.5        # process start -> first step, over bare `import torch`
OUTSIDE_TARGET = 0.20          # a tiny sweep job's share of wall time outside its training steps
CONCURRENCY_TARGET = 2.0       # runs/hour at batch 8 with concurrent jobs, over one job at a time
FUSED_TARGET = (8, 0.125, 8, 1.5)   # K, width, batch: fused model-steps/s over K sequential runs (CPU)


# (section, its key, target name, comparison, goal): the targets read straight from one value
SIMPLE_TARGETS = [
    ("data", "ratio", "data pipeline / torchvision", ">=", DATA_RATIO_TARGET),
    ("fixed_cost", "ratio", "first step / bare import torch", "<=", FIXED_COST_TARGET),
    ("jobs", "outside", "sweep job: share outside training steps", "<=", OUTSIDE_TARGET),
]
COMPARE = {">=": operator.ge, "<=": operator.le}


def target(name: str, value, goal: str, passed: bool | None, note: str = "") -> dict:
    return {"name": name, "value": value, "target": goal,
            "result": "skipped" if passed is None else ("PASS" if passed else "FAIL"), "note": note}


def _compared(name: str, value, op: str, goal, note: str = "") -> dict:
    return target(name, value, f"{op} {goal}", COMPARE[op](value, goal), note)


def _loop_targets(loop: dict) -> list[dict]:
    out = [_compared(f"loop/raw {r['model']} b{r['batch']}", r["ratio"], ">=", LOOP_TARGETS[r["batch"]])
           for r in loop.get("rows", []) if r["batch"] in LOOP_TARGETS]
    if loop.get("rows"):
        worst = max(loop["rows"], key=lambda r: r["data_share"])
        out.append(_compared("data time / step time (worst)", worst["data_share"], "<=", DATA_SHARE_TARGET,
                             f"{worst['model']} b{worst['batch']}"))
    return out


def _cuda_target(cuda: dict) -> dict:
    best = max(cuda.get("concurrency", {}).get("levels", []), key=lambda r: r["speedup"], default=None)
    if best is None:
        return target("runs/hour, concurrent / single (b8)", None, f">= {CONCURRENCY_TARGET}", None,
                      cuda.get("skipped", "not measured"))
    return _compared("runs/hour, concurrent / single (b8)", best["speedup"], ">=", CONCURRENCY_TARGET,
                     f"{best['concurrent']} jobs")


def evaluate_targets(results: dict) -> list[dict]:
    targets = _loop_targets(results.get("loop", {}))
    for section, key, name, op, goal in SIMPLE_TARGETS:
        if key in results.get(section, {}):
            targets.append(_compared(name, results[section][key], op, goal))
    layout = results.get("layout", {})
    if layout.get("rows"):
        wrong = [f"{r['model']}/{r['norm']}" for r in layout["rows"] if not r["auto_ok"]]
        targets.append(target("channels_last=auto picks the faster layout", len(wrong), "0 wrong", not wrong,
                              ", ".join(wrong)))
    targets.append(_cuda_target(results.get("cuda", {})))
    k, width, batch, goal = FUSED_TARGET
    targets += [_compared(f"fused / sequential K={k} w{width:g} b{batch}", row["speedup"], ">=", goal)
                for row in results.get("fused", {}).get("rows", [])
                if (row["k"], row["width"], row["batch"]) == (k, width, batch)]
    return targets
