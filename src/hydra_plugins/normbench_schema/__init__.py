"""Registers normbench's config schemas (normbench.schema) as `schema/<group>` nodes: Hydra imports every
module under hydra_plugins before it composes a config, so the option files' defaults lists find them."""

from normbench.schema import register

register()
