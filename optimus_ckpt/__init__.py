"""optimus_ckpt: selective, config-driven checkpoint loading for PyTorch, through Hydra.

The public API is re-exported here and imported lazily, so ``import optimus_ckpt`` (and Hydra's
plugin scan) stays cheap and does not import torch until a checkpoint is touched.

>>> import optimus_ckpt
>>> optimus_ckpt.PRESETS["eval"].load_optimizer
False
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "LoadStrategy": "strategy",
    "LoadStrategyConfig": "strategy",
    "PRESETS": "strategy",
    "resolve_strategy": "strategy",
    "register_configs": "hydra_support",
    "latest_checkpoint": "layout",
    "list_checkpoints": "layout",
    "Checkpointer": "checkpointer",
    "LoadReport": "report",
    "ComponentReport": "report",
    "Outcome": "report",
    "OptimusCkptError": "errors",
    "StrategyError": "errors",
    "CheckpointNotFoundError": "errors",
    "CheckpointExistsError": "errors",
    "CheckpointWriteError": "errors",
    "CheckpointCorruptError": "errors",
    "UnsafeCheckpointError": "errors",
    "LoadMismatchError": "errors",
}

__all__ = [
    "CheckpointCorruptError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CheckpointWriteError",
    "Checkpointer",
    "ComponentReport",
    "LoadMismatchError",
    "LoadReport",
    "LoadStrategy",
    "LoadStrategyConfig",
    "OptimusCkptError",
    "Outcome",
    "PRESETS",
    "StrategyError",
    "UnsafeCheckpointError",
    "__version__",
    "latest_checkpoint",
    "list_checkpoints",
    "register_configs",
    "resolve_strategy",
]
# A literal list (not computed), so linters and type checkers see the public names; a test
# checks that it matches _EXPORTS.

if TYPE_CHECKING:
    from .checkpointer import Checkpointer
    from .errors import (
        CheckpointCorruptError,
        CheckpointExistsError,
        CheckpointNotFoundError,
        CheckpointWriteError,
        LoadMismatchError,
        OptimusCkptError,
        StrategyError,
        UnsafeCheckpointError,
    )
    from .hydra_support import register_configs
    from .layout import latest_checkpoint, list_checkpoints
    from .report import ComponentReport, LoadReport, Outcome
    from .strategy import PRESETS, LoadStrategy, LoadStrategyConfig, resolve_strategy


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'optimus_ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
