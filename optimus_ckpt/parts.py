"""The stateful parts of a training run, as one flat dict, and how each kind turns into stored state.

``collect_parts`` is the single place that names components: ``model``, ``optimizer``,
``scheduler``, ``data_sources`` (or ``data_sources.<name>``), ``dataloaders.<name>``, ``metrics``
(or ``metrics.<name>``), ``extra.<name>`` and ``rng``. Saving and loading both go through it.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["PER_RANK_ROOTS", "canonical_key", "collect_parts", "get_rng_state", "set_rng_state"]

# Per-rank state: each process has its own (data position, running metrics, RNG).
PER_RANK_ROOTS = ("data_sources", "dataloaders", "metrics", "rng")
# Prefixes that wrappers add to parameter names: DDP/DataParallel and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def canonical_key(key: str) -> str:
    """Strip leading wrapper prefixes: ``module._orig_mod.fc.weight`` -> ``fc.weight``."""
    changed = True
    while changed:
        changed = False
        for p in WRAPPER_PREFIXES:
            if key.startswith(p):
                key = key[len(p) :]
                changed = True
    return key


def _has_state(obj: Any, name: str) -> None:
    if not (
        callable(getattr(obj, "state_dict", None))
        and callable(getattr(obj, "load_state_dict", None))
    ):
        raise TypeError(
            f"{name} must have state_dict() and load_state_dict() methods, got "
            f"{type(obj).__name__}. Fix: pass the object itself (e.g. the DataLoader), or wrap it."
        )


def collect_parts(
    *,
    model: Any = None,
    optimizer: Any = None,
    scheduler: Any = None,
    data_sources: Any = None,
    dataloaders: Mapping[str, Any] | None = None,
    metrics: Any = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The given objects as ``{component name: object}``; absent ones are left out."""
    parts: dict[str, Any] = {}
    for name, obj in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None:
            _has_state(obj, name)
            parts[name] = obj
    for root, obj, single_ok in (
        ("data_sources", data_sources, True),
        ("dataloaders", dataloaders, False),
        ("metrics", metrics, True),
        ("extra", extra, False),
    ):
        if obj is None:
            continue
        if isinstance(obj, Mapping):
            for key, value in obj.items():
                if not isinstance(key, str) or not key or "." in key:
                    raise ValueError(
                        f"{root} names must be non-empty strings without dots, got {key!r}"
                    )
                _has_state(value, f"{root}['{key}']")
                parts[f"{root}.{key}"] = value
        elif single_ok:
            _has_state(obj, root)
            parts[root] = obj
        else:
            raise TypeError(
                f"{root} must be a mapping of name -> object (e.g. {root}={{'train': obj}}), "
                f"got {type(obj).__name__}"
            )
    if optimizer is not None and model is None:
        raise ValueError(
            "optimizer given without model: optimizer state is keyed to the model's parameters"
        )
    return parts


def get_rng_state() -> dict[str, Any]:
    """Python, torch CPU, CUDA (when available) and numpy (when installed) RNG states."""
    import torch

    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    np = sys.modules.get("numpy")
    if np is None:
        try:
            import numpy as np
        except ImportError:
            np = None
    if np is not None:
        state["numpy"] = np.random.get_state()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    import torch

    if "python" in state:
        v = state["python"]
        random.setstate((v[0], tuple(v[1]), v[2]))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy as np

        np.random.set_state(state["numpy"])
