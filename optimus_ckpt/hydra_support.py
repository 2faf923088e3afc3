"""Hydra registration: the LoadStrategy schema in ConfigStore, the preset search path and the
``${optimus_ckpt.latest:DIR}`` resolver. No torch import here: Hydra imports our plugin, and so
this module, at the start of every app in the environment.
"""

from __future__ import annotations

import inspect
from typing import Any

from omegaconf import OmegaConf

from .layout import latest_checkpoint
from .strategy import LoadStrategyConfig, conf_dir

__all__ = ["SCHEMA_GROUP", "SCHEMA_NAME", "conf_search_path", "register_configs"]

SCHEMA_GROUP = "optimus_ckpt/schema"
SCHEMA_NAME = "load_strategy"
LATEST_RESOLVER = "optimus_ckpt.latest"


def conf_search_path() -> str:
    """The search-path entry holding ``load_strategy/*.yaml`` (an absolute ``file://`` path)."""
    return "file://" + conf_dir()


def _in_store(group: str, name: str) -> bool:
    from hydra.core.config_store import ConfigStore

    node: Any = ConfigStore.instance().repo
    for part in group.split("/"):
        node = node.get(part)
        if not isinstance(node, dict):
            return False
    return f"{name}.yaml" in node


def register_configs() -> None:
    """Register the schema and the resolver, each only if its name is still free. Idempotent.

    Hydra apps get this from the plugin automatically; call it yourself with the compose API or
    hydra-zen. A user's own ConfigStore entry or resolver of the same name wins.

    >>> register_configs(); register_configs()   # safe to call again
    >>> OmegaConf.has_resolver("optimus_ckpt.latest")
    True
    """
    from hydra.core.config_store import ConfigStore

    if not _in_store(SCHEMA_GROUP, SCHEMA_NAME):
        ConfigStore.instance().store(
            group=SCHEMA_GROUP, name=SCHEMA_NAME, node=LoadStrategyConfig, provider="optimus_ckpt"
        )
    if not OmegaConf.has_resolver(LATEST_RESOLVER):
        _register_resolver(LATEST_RESOLVER, _latest)


def _latest(directory: str | None = None) -> str | None:
    return latest_checkpoint(directory)


def _register_resolver(name: str, fn: object) -> None:
    # omegaconf 2.4 renames register_new_resolver to register_resolver (and deprecates the old
    # name); in 2.3 register_resolver is the old, deprecated string-only API. Pick by signature.
    new_api = getattr(OmegaConf, "register_resolver", None)
    if new_api is not None and "use_cache" in inspect.signature(new_api).parameters:
        new_api(name, fn, use_cache=False)
    else:
        OmegaConf.register_new_resolver(name, fn, use_cache=False)  # type: ignore[arg-type]
