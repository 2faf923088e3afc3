"""LoadStrategy: which parts of a checkpoint a load restores. No torch import here.

The fields, names and defaults are those of the original spec, plus ``strict``. Validation lives
in one place, :func:`validate_strategy`, called by ``__post_init__`` and by
:func:`resolve_strategy`, which every loading API uses, so a DictConfig from ``compose`` (which
never ran ``__post_init__``) is checked too.
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import StrategyError

__all__ = ["PRESETS", "LoadStrategy", "LoadStrategyConfig", "resolve_strategy", "validate_strategy"]


@dataclass
class LoadStrategy:
    """Configuration for selective checkpoint loading.

    This class controls which components are loaded from a checkpoint. It's
    particularly useful for:

    - Fine-tuning: Load model weights but not optimizer state
    - Resuming with different configs: Load model but reset optimizer
    - Evaluation: Load only model weights
    - Debugging: Load specific components to isolate issues

    All fields default to True, meaning by default everything is loaded.

    Example:
        ```python
        # Fine-tuning: load model only
        strategy = LoadStrategy(
            load_model=True,
            load_optimizer=False,
            load_scheduler=False,
            load_iteration=False,
        )

        # Resume training: load everything
        strategy = LoadStrategy()  # All defaults to True

        # Evaluation: model only
        strategy = LoadStrategy(
            load_model=True,
            load_optimizer=False,
            load_scheduler=False,
            load_data_sources=False,
            load_dataloaders=False,
            load_metrics=False,
            load_iteration=False,
        )

        ```

    Impossible combinations are refused where they are made:

    >>> LoadStrategy(load_model=False)
    Traceback (most recent call last):
    ...
    optimus_ckpt.errors.StrategyError: load_optimizer=True needs load_model=True: optimizer state is keyed to the model's parameters. Fix: set load_strategy.load_optimizer=false, or load_strategy.load_model=true.
    """

    load_model: bool = field(
        default=True, metadata={"description": "Whether to load model weights."}
    )
    load_optimizer: bool = field(
        default=True, metadata={"description": "Whether to load optimizer state."}
    )
    load_scheduler: bool = field(
        default=True,
        metadata={"description": "Whether to load learning rate scheduler state."},
    )
    load_data_sources: bool = field(
        default=True,
        metadata={"description": "Whether to load data source state (e.g. dataset position)."},
    )
    load_dataloaders: bool = field(
        default=True, metadata={"description": "Whether to load full dataloader state."}
    )
    load_metrics: bool = field(
        default=True, metadata={"description": "Whether to load accumulated metrics."}
    )
    load_iteration: bool = field(
        default=True, metadata={"description": "Whether to resume the iteration count."}
    )
    extra_ignore_keys: list[str] | None = field(
        default=None,
        metadata={"description": "List of specific keys to ignore in the checkpoint state dict."},
    )
    strict: bool = field(
        default=True,
        metadata={
            "description": "Model keys must match the checkpoint exactly; when false, missing, "
            "unexpected and shape-mismatched model keys are skipped and reported instead of raising."
        },
    )

    def __new__(cls, *args: Any, **kwargs: Any) -> LoadStrategy:
        # Unknown keyword arguments (``LoadStrategy(load_modle=False)``, or a key added with
        # ``+load_strategy.load_modle=false`` reaching ``hydra.utils.instantiate``) get the same
        # message as resolve_strategy gives, with a suggestion, instead of a bare TypeError.
        allowed = _field_names(cls)
        for key in kwargs:
            if key not in allowed:
                raise _unknown_key(key, allowed)
        return super().__new__(cls)

    def __setattr__(self, name: str, value: Any) -> None:
        # ``OmegaConf.to_object`` builds the object from the schema's fields, then *sets* any
        # other key of the node as an attribute; refusing unknown names here is what rejects a
        # key added with ``+load_strategy.load_modle=false`` on that path. It also catches
        # ``strategy.load_modle = False`` in Python.
        allowed = _field_names(type(self))
        if name not in allowed:
            raise _unknown_key(name, allowed)
        super().__setattr__(name, value)

    def __post_init__(self) -> None:
        validate_strategy(self)

    def __eq__(self, other: object) -> bool:
        # Compare field values, so the Hydra schema subclass equals the plain class.
        if not isinstance(other, LoadStrategy):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        """The strategy's fields as a plain dict (JSON-ready)."""
        out = {f.name: getattr(self, f.name) for f in fields(LoadStrategy)}
        if out["extra_ignore_keys"] is not None:
            out["extra_ignore_keys"] = list(out["extra_ignore_keys"])
        return out

    def loads(self, component: str) -> bool:
        """Whether this strategy asks for ``component`` (``model``, ``dataloaders.train``, ...)."""
        root = component.split(".", 1)[0]
        flag = _COMPONENT_FLAGS.get(root)
        return True if flag is None else bool(getattr(self, flag))

    @property
    def loads_anything(self) -> bool:
        """False for a strategy that loads nothing (``scratch``): there is nothing to load from.

        >>> LoadStrategy().loads_anything, resolve_strategy("scratch").loads_anything
        (True, False)
        """
        return any(getattr(self, n) for n in _COMPONENT_FLAGS.values())


@dataclass
class LoadStrategyConfig(LoadStrategy):
    """The schema registered in Hydra's ConfigStore: LoadStrategy plus ``_target_``.

    ``_target_`` lets ``hydra.utils.instantiate(cfg.load_strategy)`` build a validated
    :class:`LoadStrategy`; ``OmegaConf.to_object`` builds this subclass, validated the same way.
    """

    _target_: str = "optimus_ckpt.LoadStrategy"


# Which field governs each component root. ``rng`` and ``extra`` (EMA weights, grad scalers,
# early-stopping state: state that continues a run) follow ``load_iteration``.
_COMPONENT_FLAGS = {
    "model": "load_model",
    "optimizer": "load_optimizer",
    "scheduler": "load_scheduler",
    "data_sources": "load_data_sources",
    "dataloaders": "load_dataloaders",
    "metrics": "load_metrics",
    "rng": "load_iteration",
    "extra": "load_iteration",
}

FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(LoadStrategy))
_FIELD_NAMES_BY_CLASS: dict[type, tuple[str, ...]] = {}
# The ``_target_`` values a config node may carry (``LoadStrategyConfig`` writes the first).
_TARGETS = frozenset(
    f"optimus_ckpt.{mod}{cls}"
    for mod in ("", "strategy.")
    for cls in ("LoadStrategy", "LoadStrategyConfig")
)


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES_BY_CLASS.get(cls)
    if names is None:
        names = _FIELD_NAMES_BY_CLASS[cls] = tuple(f.name for f in fields(cls))
    return names


def _unknown_key(key: str, allowed: tuple[str, ...] | None = None) -> StrategyError:
    valid = [n for n in (allowed or FIELD_NAMES) if n != "_target_"]
    return StrategyError(
        f"Unknown key '{key}' in load_strategy.{_suggest(key, valid)} "
        f"Valid keys: {', '.join(valid)}."
    )


_BOOL_FIELDS = tuple(n for n in FIELD_NAMES if n != "extra_ignore_keys")


def validate_strategy(s: LoadStrategy) -> None:
    """Check types and cross-field rules; raise StrategyError naming the fields and the fix.

    Normalises ``extra_ignore_keys`` to a plain list of str (a ListConfig or tuple is accepted).
    """
    for name in _BOOL_FIELDS:
        value = getattr(s, name)
        if not isinstance(value, bool):
            raise StrategyError(
                f"LoadStrategy.{name} must be true or false, got {value!r} "
                f"({type(value).__name__}). Fix: load_strategy.{name}=true or =false."
            )
    keys = s.extra_ignore_keys
    if keys is not None:
        if isinstance(keys, (str, bytes, Mapping)) or not hasattr(keys, "__iter__"):
            raise StrategyError(
                f"LoadStrategy.extra_ignore_keys must be a list of glob patterns or null, got "
                f"{keys!r}. Fix: load_strategy.extra_ignore_keys='[model.head.*]'."
            )
        keys = list(keys)
        for k in keys:
            if not isinstance(k, str) or not k:
                raise StrategyError(
                    f"LoadStrategy.extra_ignore_keys entries must be non-empty strings "
                    f"(fnmatch globs over dotted names such as 'model.head.*' or 'optimizer'), "
                    f"got {k!r}."
                )
        object.__setattr__(s, "extra_ignore_keys", keys)
    if s.load_optimizer and not s.load_model:
        raise StrategyError(
            "load_optimizer=True needs load_model=True: optimizer state is keyed to the model's "
            "parameters. Fix: set load_strategy.load_optimizer=false, or "
            "load_strategy.load_model=true."
        )
    if s.load_dataloaders and not s.load_data_sources:
        raise StrategyError(
            "load_dataloaders=True needs load_data_sources=True: a dataloader's state contains "
            "its data source's. Fix: set load_strategy.load_dataloaders=false, or "
            "load_strategy.load_data_sources=true."
        )
    if keys and not s.loads_anything:
        warnings.warn(
            "LoadStrategy loads nothing, so extra_ignore_keys has no effect.",
            UserWarning,
            stacklevel=4,  # validate_strategy <- __post_init__ <- __init__ <- the caller
        )


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" Did you mean '{close[0]}'?" if close else ""


def resolve_strategy(strategy: Any) -> LoadStrategy:
    """Turn any accepted form into a validated :class:`LoadStrategy`.

    Accepts a LoadStrategy, a preset name, or a mapping / DictConfig node (``cfg.load_strategy``).
    Unknown keys, such as one added with ``+load_strategy.load_modle=false``, are refused.

    >>> resolve_strategy("finetune").strict
    False
    >>> resolve_strategy({"load_modle": False})
    Traceback (most recent call last):
    ...
    optimus_ckpt.errors.StrategyError: Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'? Valid keys: load_model, load_optimizer, load_scheduler, load_data_sources, load_dataloaders, load_metrics, load_iteration, extra_ignore_keys, strict.
    """
    if strategy is None:
        strategy = "resume"
    if isinstance(strategy, LoadStrategy):
        validate_strategy(strategy)
        return LoadStrategy(**strategy.to_dict())
    if isinstance(strategy, str):
        presets = PRESETS
        if strategy not in presets:
            raise StrategyError(
                f"Unknown load strategy preset '{strategy}'.{_suggest(strategy, list(presets))} "
                f"Available presets: {', '.join(sorted(presets))}."
            )
        return LoadStrategy(**presets[strategy].to_dict())
    omegaconf = sys.modules.get("omegaconf")  # a DictConfig exists only once omegaconf is imported
    if omegaconf is not None and isinstance(strategy, omegaconf.DictConfig):
        # A composed node (never ran __post_init__): to plain data, interpolations resolved.
        strategy = omegaconf.OmegaConf.to_container(strategy, resolve=True)
    if isinstance(strategy, Mapping):
        data = {str(k): v for k, v in strategy.items()}
        target = data.pop("_target_", None)
        if target is not None and target not in _TARGETS:
            raise StrategyError(
                f"load_strategy._target_ is {target!r}; expected optimus_ckpt.LoadStrategy."
            )
        for key in data:
            if key not in FIELD_NAMES:
                raise _unknown_key(key)
        return LoadStrategy(**data)
    raise StrategyError(
        f"Cannot use {type(strategy).__name__} as a load strategy: pass a LoadStrategy, a preset "
        f"name ({', '.join(sorted(PRESETS))}) or a config node such as cfg.load_strategy."
    )


def conf_dir() -> str:
    """The directory holding the preset YAML (``load_strategy/*.yaml``).

    In a wheel it is ``optimus_ckpt/conf``; in a source checkout or an editable install it is the
    repository's top-level ``conf/``.
    """
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.join(here, "conf"), os.path.join(os.path.dirname(here), "conf")):
        if os.path.isdir(os.path.join(candidate, "load_strategy")):
            return candidate
    raise FileNotFoundError(
        f"optimus_ckpt's preset YAML (conf/load_strategy/*.yaml) was not found beside {here}; "
        "reinstall the package (pip install optimus-ckpt)."
    )


_PRESET_DEFAULTS = ["/optimus_ckpt/schema/load_strategy@_here_", "_self_"]


def _load_presets() -> dict[str, LoadStrategy]:
    import yaml  # PyYAML (omegaconf's own dependency): plain safe parsing, cheaper than OmegaConf

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    folder = os.path.join(conf_dir(), "load_strategy")
    presets: dict[str, LoadStrategy] = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".yaml"):
            continue
        with open(os.path.join(folder, name), encoding="utf-8") as f:
            raw = yaml.load(f, Loader=loader) or {}
        if not isinstance(raw, dict) or any("${" in str(v) for v in raw.values()):
            raise ValueError(f"{folder}/{name}: a shipped preset must be a plain mapping")
        # Each shipped preset is the schema plus its own values. Reading it without Hydra is only
        # right while that holds, so refuse anything else rather than silently disagree with the
        # config Hydra composes (a test compares the two for every preset).
        if raw.pop("defaults", None) != _PRESET_DEFAULTS:
            raise ValueError(
                f"{folder}/{name}: a shipped preset's defaults list must be exactly "
                f"{_PRESET_DEFAULTS}, so that PRESETS and Hydra agree."
            )
        presets[name[: -len(".yaml")]] = resolve_strategy(raw)
    return presets


class _Presets(Mapping[str, LoadStrategy]):
    """Read-only mapping of preset name to LoadStrategy, read from the shipped YAML on first use."""

    _cache: dict[str, LoadStrategy] | None = None

    def _data(self) -> dict[str, LoadStrategy]:
        if self._cache is None:
            self._cache = _load_presets()
        return self._cache

    def __getitem__(self, key: str) -> LoadStrategy:
        # A copy, so callers cannot change the shared preset.
        return LoadStrategy(**self._data()[key].to_dict())

    def __iter__(self) -> Iterator[str]:
        return iter(self._data())

    def __len__(self) -> int:
        return len(self._data())

    def __repr__(self) -> str:
        return f"PRESETS({sorted(self._data())})"


PRESETS: Mapping[str, LoadStrategy] = _Presets()
"""Preset name -> LoadStrategy, read from the same YAML that Hydra composes (one source)."""
