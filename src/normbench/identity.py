"""A run's identity: a short hash of everything in its config that changes the numbers.

`NOT_IDENTITY` is the one definition of the keys that do not: the identity leaves them out, a sweep job's
dir name leaves out overrides of them, and the report pools runs by the identity without the seed.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable

from omegaconf import DictConfig, OmegaConf

# How or where a run executes, or what it records, not what it computes. A key also covers its sub-keys.
NOT_IDENTITY = (
    "hydra", "logger", "experiment_name", "paths", "trusted_targets",
    "search",   # the search group configures the sweeper (hydra.sweeper), not the run
    "pruning",  # whether a run may be stopped early, not what an epoch computes (normbench.pruning)
    "trainer.device", "trainer.threads", "trainer.compile", "trainer.channels_last",
    "trainer.log_every_steps", "trainer.checkpoint", "trainer.eval_batch_size",
    "data.root", "data.download",
)
SEED = "seed"
MAX_DIRNAME = 80    # a sweep job dir name, hash suffix included
HASH_SUFFIX = 11    # "_" + 10 hex digits, when the name had to be cut
MAX_RUN_NAME = 60   # a W&B run name
# The keys the running multirun sweeps (set by normbench.callbacks for its jobs; comma-separated).
SWEPT_KEYS_ENV = "NORMBENCH_SWEPT_KEYS"
INTERNAL_GROUPS = ("hydra", "schema", "vgg_best_row")  # left out of --help


def covered(key: str, keys: Iterable[str]) -> bool:  # `key` is one of `keys` or a sub-key of one
    return any(key == k or key.startswith(k + ".") for k in keys)


def training_config(cfg: DictConfig | dict, ignored: Iterable[str] = NOT_IDENTITY) -> dict:
    container = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    ignored = tuple(ignored)

    def strip(node: dict, prefix: str) -> dict:
        return {key: strip(value, f"{prefix}{key}.") if isinstance(value, dict) else value
                for key, value in node.items() if not covered(f"{prefix}{key}", ignored)}

    return strip(container, "")


def _digest(config: dict) -> str:
    blob = json.dumps(config, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def run_identity(cfg: DictConfig | dict) -> str:
    return _digest(training_config(cfg))


def seedless_identity(cfg: DictConfig | dict) -> str:
    return _digest(training_config(cfg, (*NOT_IDENTITY, SEED)))


def override_key(override: str) -> str:  # `+trainer.fault=raise` -> `trainer.fault`
    return override.split("=", 1)[0].lstrip("+~")


def swept_keys(params: dict | None, overrides: Iterable[str]) -> list[str]:
    """The keys a multirun varies, in order: those of `hydra.sweeper.params` and the command line's
    overrides whose value is a sweep (`a,b`, `choice(...)`, `range(...)`, `interval(...)`, `glob(...)`).
    A key the command line sets to one value is fixed, even when `params` sweeps it (a search space)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()

    def is_sweep(text: str) -> bool:
        try:
            return parser.parse_override(text).is_sweep_override()
        except Exception:  # noqa: BLE001 - a name is no place to report a bad override (Hydra does)
            return False

    overrides = list(overrides)
    fixed = {override_key(o) for o in overrides if not is_sweep(o)}
    keys: list[str] = []
    for text in [f"{key}={value}" for key, value in (params or {}).items()] + overrides:
        key = override_key(text)
        if key not in keys and is_sweep(text) and not (key in fixed and text not in overrides):
            keys.append(key)
    return keys


def sweep_arguments(master: DictConfig) -> tuple[dict, list[str]]:
    params = OmegaConf.select(master, "hydra.sweeper.params", default=None)
    params = OmegaConf.to_container(params, resolve=False) if params is not None else {}
    return params, list(OmegaConf.to_container(master.hydra.overrides.task, resolve=False))


def swept_keys_from_env() -> list[str]:
    return [k for k in os.environ.get(SWEPT_KEYS_ENV, "").split(",") if k]


def _named_parts(overrides: Iterable[str], swept: Iterable[str]) -> tuple[list[str], list[str]]:
    """The overrides of keys that change the numbers: (swept, in sweep order; fixed)."""
    kept = [o.lstrip("+") for o in overrides if not covered(override_key(o), NOT_IDENTITY)]
    swept = list(swept)
    by_key = {override_key(o): o for o in kept}
    first = [by_key[k] for k in swept if k in by_key]
    return first, [o for o in kept if o not in first]


def _trial_part(trial) -> list[str]:
    return [] if trial is None or str(trial) in ("", "None", "-1") else [f"trial-{int(trial):04d}"]


def _fit(parts: list[str], limit: int) -> tuple[str, bool]:
    """`parts` joined with commas, cut at a part boundary to at most `limit` characters (the first part
    is always kept, itself cut when longer); True when something was left out."""
    name = ""
    for part in parts:
        candidate = f"{name},{part}" if name else part
        if len(candidate) > limit:
            return (name or part[:limit]), True
        name = candidate
    return name, False


def job_dirname(overrides: Iterable[str], swept: Iterable[str] = (), trial=None) -> str:
    """A sweep job's subdir: the Optuna trial number, then the swept overrides, then the fixed ones --
    of keys that change the numbers -- cut to at most MAX_DIRNAME characters and then made unique by a
    hash of all of them (stable across re-runs of the same command). `norm=bn,batch_size=8_3fa9c2d1e0`."""
    swept_parts, fixed = _named_parts(overrides, swept)
    full = ",".join(swept_parts + fixed)
    name, cut = _fit(_trial_part(trial) + swept_parts + fixed, MAX_DIRNAME - HASH_SUFFIX)
    name = name.replace("/", "_") or "base"
    if cut:
        name = f"{name}_{hashlib.sha256(full.encode()).hexdigest()[:HASH_SUFFIX - 1]}"
    return name


def short_override(override: str) -> str:  # `optimizer.lr=0.01` -> `lr=0.01`
    key, _, value = override.partition("=")
    return f"{key.rsplit('.', 1)[-1]}={value}"


def run_name(overrides: Iterable[str], swept: Iterable[str] = (), trial=None,
             limit: int = MAX_RUN_NAME) -> str:
    """A W&B run's display name: trial number, swept values, then fixed ones, with the last part of each
    key only, cut at `limit` characters (`…` marks a cut). W&B ids, not names, are unique."""
    swept_parts, fixed = _named_parts(overrides, swept)
    parts = _trial_part(trial) + [short_override(o) for o in swept_parts + fixed]
    name, cut = _fit(parts, limit - 1)
    return (f"{name}…" if cut else name) or "base"


def config_groups_help() -> str:
    """--help's list of the config groups a user picks from, one line each with its options (not Hydra's
    own, nor the schemas and the parts of presets)."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    return "\n".join(f"  {group}: {', '.join(loader.get_group_options(group))}"
                     for group in sorted(loader.list_groups("")) if group not in INTERNAL_GROUPS)


def register_resolvers() -> None:
    """The resolvers conf/ uses (`normbench_job_dir`; `normbench_groups` for --help), before composing."""
    if not OmegaConf.has_resolver("normbench_job_dir"):
        OmegaConf.register_resolver("normbench_job_dir", lambda overrides, trial=None: job_dirname(
            list(overrides), swept_keys_from_env(), trial))
        OmegaConf.register_resolver("normbench_groups", config_groups_help)
