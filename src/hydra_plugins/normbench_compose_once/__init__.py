"""hydra/sweeper=basic, Hydra's default sweeper, registered again (after Hydra's own, whose module it
imports) as a subclass that composes each job's config once. Hydra's sweeper composes every job of a batch
to check it before launching any, and a launcher in this process composes each again (10-15 % of a tiny
job); this one hands the launcher what its check composed, pickled: bytes, which neither the garbage
collector walks nor a sweep job's gc.freeze pins."""

from __future__ import annotations

import dataclasses
import pickle
from dataclasses import dataclass

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore

from hydra_plugins.normbench_fused_launcher.fused_launcher import FusedLauncher


@dataclass
class ComposeOnceSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.normbench_compose_once.ComposeOnceBasicSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="basic", node=ComposeOnceSweeperConf,
                             provider="normbench", replace=True)


class KeptConfigs:
    """The config loader, except that a job's config composed by the sweeper's check goes to the launcher."""

    def __init__(self, loader) -> None:
        self.loader, self.kept = loader, {}

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def keep(self, master_config, overrides) -> None:
        config = self.loader.load_sweep_config(master_config, list(overrides))
        self.kept[tuple(overrides)] = pickle.dumps(config)

    def load_sweep_config(self, master_config, sweep_overrides):
        kept = self.kept.pop(tuple(sweep_overrides), None)
        if kept is None:
            return self.loader.load_sweep_config(master_config, sweep_overrides)
        return pickle.loads(kept)


class ComposeOnceBasicSweeper(BasicSweeper):
    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=task_function, config=config)
        self.configs = None
        if isinstance(self.launcher, (BasicLauncher, FusedLauncher)):  # they compose in this process
            self.configs = KeptConfigs(hydra_context.config_loader)
            self.launcher.hydra_context = dataclasses.replace(hydra_context, config_loader=self.configs)

    def validate_batch_is_legal(self, batch) -> None:
        if self.configs is None:
            super().validate_batch_is_legal(batch)
            return
        for overrides in batch:
            self.configs.keep(self.config, overrides)
