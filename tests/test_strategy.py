"""Unit tests of optimus_ckpt.LoadStrategy, its validation, resolve_strategy and PRESETS."""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import re
import textwrap
import typing
import warnings

import pytest
from omegaconf import OmegaConf
from plugin_support import ERRORS, EXPECTED_PRESETS

import optimus_ckpt
from optimus_ckpt import PRESETS, LoadStrategy, LoadStrategyConfig, StrategyError, resolve_strategy

# The original spec (seed-load_strategy.txt): name, type, description, default; plus `strict`.
SPEC_FIELDS = [
    ("load_model", bool, "Whether to load model weights.", True),
    ("load_optimizer", bool, "Whether to load optimizer state.", True),
    ("load_scheduler", bool, "Whether to load learning rate scheduler state.", True),
    (
        "load_data_sources",
        bool,
        "Whether to load data source state (e.g. dataset position).",
        True,
    ),
    ("load_dataloaders", bool, "Whether to load full dataloader state.", True),
    ("load_metrics", bool, "Whether to load accumulated metrics.", True),
    ("load_iteration", bool, "Whether to resume the iteration count.", True),
    (
        "extra_ignore_keys",
        typing.Optional[list[str]],  # noqa: UP045 - compared with the resolved `list[str] | None`
        "List of specific keys to ignore in the checkpoint state dict.",
        None,
    ),
    (
        "strict",
        bool,
        "Model keys must match the checkpoint exactly; when false, missing, unexpected and "
        "shape-mismatched model keys are skipped and reported instead of raising.",
        True,
    ),
]
FLAGS = [name for name, typ, _, _ in SPEC_FIELDS if typ is bool]

# The spec's docstring example, verbatim (it must stay runnable as written).
SPEC_EXAMPLE = """\
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

"""

# --- the schema -----------------------------------------------------------------------------


def test_fields_match_the_spec_exactly() -> None:
    fs = dataclasses.fields(LoadStrategy)
    assert [f.name for f in fs] == [name for name, *_ in SPEC_FIELDS]
    hints = typing.get_type_hints(LoadStrategy)
    for f, (name, typ, description, default) in zip(fs, SPEC_FIELDS):
        assert hints[name] == typ, name
        assert f.metadata["description"] == description, name
        assert f.default == default, name
        assert f.default_factory is dataclasses.MISSING, name


def test_defaults_load_everything() -> None:
    s = LoadStrategy()
    assert all(getattr(s, name) is True for name in FLAGS)
    assert s.extra_ignore_keys is None
    assert s == PRESETS["resume"]


def test_docstring_example_is_the_spec_example_and_runs_verbatim() -> None:
    doc = LoadStrategy.__doc__
    assert doc is not None
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) == 1
    block = textwrap.dedent(blocks[0])
    assert block == SPEC_EXAMPLE
    namespace: dict[str, object] = {"LoadStrategy": LoadStrategy}
    exec(compile(block, "<LoadStrategy docstring>", "exec"), namespace)
    # The last example is "Evaluation: model only".
    assert namespace["strategy"] == LoadStrategy(
        load_optimizer=False,
        load_scheduler=False,
        load_data_sources=False,
        load_dataloaders=False,
        load_metrics=False,
        load_iteration=False,
    )


@pytest.mark.parametrize(
    "module",
    [
        "optimus_ckpt",
        "optimus_ckpt.strategy",
        "optimus_ckpt.layout",
        "optimus_ckpt.hydra_support",
    ],
)
def test_module_doctests_pass(module: str) -> None:
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0, f"{module} lost its doctests"
    assert result.failed == 0


def test_public_names() -> None:
    assert set(optimus_ckpt.__all__) == set(optimus_ckpt._EXPORTS) | {"__version__"}
    for name in ("LoadStrategy", "PRESETS", "resolve_strategy", "register_configs"):
        assert name in dir(optimus_ckpt)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = optimus_ckpt.nope  # type: ignore[attr-defined]


# --- cross-field rules ----------------------------------------------------------------------


def test_optimizer_without_model_names_both_fields_and_the_fix() -> None:
    with pytest.raises(StrategyError) as info:
        LoadStrategy(load_model=False)
    assert str(info.value) == ERRORS["optimizer_without_model"]


def test_dataloaders_without_data_sources_names_both_fields_and_the_fix() -> None:
    with pytest.raises(StrategyError) as info:
        LoadStrategy(load_data_sources=False)
    assert str(info.value) == ERRORS["dataloaders_without_sources"]


def test_strategy_error_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        LoadStrategy(load_model=False)


def test_the_legal_neighbours_of_the_impossible_combinations() -> None:
    assert not LoadStrategy(load_model=False, load_optimizer=False).load_model
    assert not LoadStrategy(load_data_sources=False, load_dataloaders=False).load_data_sources
    # The reverse direction is fine: a model without its optimizer, sources without loaders.
    assert LoadStrategy(load_optimizer=False).load_model
    assert LoadStrategy(load_dataloaders=False).load_data_sources


def test_resolve_strategy_revalidates_a_mutated_instance() -> None:
    s = LoadStrategy()
    s.load_model = False  # legal attribute, illegal combination: caught when it is used
    with pytest.raises(StrategyError, match="load_optimizer=True needs load_model=True"):
        resolve_strategy(s)


# --- wrong types ----------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["yes", "true", 1, 0, None, 1.0])
def test_a_flag_must_be_a_bool(value: object) -> None:
    with pytest.raises(StrategyError) as info:
        LoadStrategy(strict=value)  # type: ignore[arg-type]
    msg = str(info.value)
    assert f"LoadStrategy.strict must be true or false, got {value!r}" in msg
    assert "Fix: load_strategy.strict=true or =false." in msg


def test_wrong_type_message() -> None:
    with pytest.raises(StrategyError) as info:
        LoadStrategy(strict="yes")  # type: ignore[arg-type]
    assert str(info.value) == ERRORS["python_type"]


@pytest.mark.parametrize("value", ["model.head.*", b"x", 3, {"model": 1}])
def test_extra_ignore_keys_must_be_a_list(value: object) -> None:
    with pytest.raises(StrategyError, match="extra_ignore_keys must be a list of glob patterns"):
        LoadStrategy(extra_ignore_keys=value)  # type: ignore[arg-type]


@pytest.mark.parametrize("entry", ["", 3, None])
def test_extra_ignore_keys_entries_must_be_non_empty_strings(entry: object) -> None:
    with pytest.raises(StrategyError, match="entries must be non-empty strings"):
        LoadStrategy(extra_ignore_keys=["model.head.*", entry])  # type: ignore[list-item]


def test_extra_ignore_keys_accepts_any_sequence_and_stores_a_list() -> None:
    s = LoadStrategy(extra_ignore_keys=("model.head.*", "optimizer"))  # type: ignore[arg-type]
    assert s.extra_ignore_keys == ["model.head.*", "optimizer"]
    node = OmegaConf.create({"k": ["model.head.*"]}).k  # a ListConfig, as instantiate passes it
    s = LoadStrategy(extra_ignore_keys=node)
    assert type(s.extra_ignore_keys) is list
    assert s.extra_ignore_keys == ["model.head.*"]


def test_ignore_keys_on_a_strategy_that_loads_nothing_warn() -> None:
    scratch = PRESETS["scratch"].to_dict()
    with pytest.warns(UserWarning, match="loads nothing, so extra_ignore_keys has no effect"):
        LoadStrategy(**{**scratch, "extra_ignore_keys": ["model.*"]})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoadStrategy(**scratch)
        LoadStrategy(extra_ignore_keys=["model.*"])


# --- unknown keys ---------------------------------------------------------------------------

VALID_KEYS = (
    "Valid keys: load_model, load_optimizer, load_scheduler, load_data_sources, "
    "load_dataloaders, load_metrics, load_iteration, extra_ignore_keys, strict."
)


def test_unknown_keyword_is_refused_with_a_suggestion() -> None:
    with pytest.raises(StrategyError) as info:
        LoadStrategy(load_modle=False)  # type: ignore[call-arg]
    assert str(info.value) == (
        f"Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'? {VALID_KEYS}"
    )


def test_unknown_attribute_is_refused() -> None:
    s = LoadStrategy()
    with pytest.raises(
        StrategyError, match=r"Unknown key 'strcit' in load_strategy\. Did you mean"
    ):
        s.strcit = False  # type: ignore[attr-defined]
    assert not hasattr(s, "strcit")


@pytest.mark.parametrize("form", [dict, OmegaConf.create])
def test_resolve_strategy_refuses_unknown_keys(form: typing.Callable[[dict], object]) -> None:
    with pytest.raises(StrategyError) as info:
        resolve_strategy(form({"load_model": True, "load_modle": False}))
    assert "Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'?" in str(
        info.value
    )
    with pytest.raises(StrategyError) as info:
        resolve_strategy(form({"zzz": 1}))
    assert str(info.value) == f"Unknown key 'zzz' in load_strategy. {VALID_KEYS}"


def test_to_object_of_a_node_with_an_added_key_is_refused() -> None:
    # What `+load_strategy.load_modle=false` produces: the schema node with one more key.
    node = OmegaConf.structured(LoadStrategyConfig)
    OmegaConf.set_struct(node, False)
    node.load_modle = False
    with pytest.raises(StrategyError, match="Unknown key 'load_modle' in load_strategy"):
        OmegaConf.to_object(node)


# --- resolve_strategy -----------------------------------------------------------------------


def test_resolve_strategy_from_an_instance_returns_a_plain_copy() -> None:
    s = LoadStrategy(load_optimizer=False, extra_ignore_keys=["model.head.*"])
    out = resolve_strategy(s)
    assert out == s and out is not s
    assert out.extra_ignore_keys is not s.extra_ignore_keys
    cfg_instance = LoadStrategyConfig(strict=False)
    out = resolve_strategy(cfg_instance)
    assert type(out) is LoadStrategy
    assert out == cfg_instance


@pytest.mark.parametrize("name", sorted(EXPECTED_PRESETS))
def test_resolve_strategy_from_a_preset_name(name: str) -> None:
    s = resolve_strategy(name)
    assert type(s) is LoadStrategy
    assert s.to_dict() == EXPECTED_PRESETS[name]


def test_resolve_strategy_none_means_resume() -> None:
    assert resolve_strategy(None) == PRESETS["resume"]


def test_resolve_strategy_misspelled_preset_lists_the_options() -> None:
    with pytest.raises(StrategyError) as info:
        resolve_strategy("finetun")
    assert str(info.value) == ERRORS["python_preset"]


def test_resolve_strategy_from_a_dict_and_a_dictconfig() -> None:
    data = {"load_optimizer": False, "extra_ignore_keys": ["model.head.*"], "strict": False}
    expected = LoadStrategy(**data)  # type: ignore[arg-type]
    assert resolve_strategy(data) == expected
    assert resolve_strategy(OmegaConf.create(data)) == expected
    # The schema node as Hydra composes it, _target_ included.
    node = OmegaConf.merge(OmegaConf.structured(LoadStrategyConfig), data)
    out = resolve_strategy(node)
    assert type(out) is LoadStrategy and out == expected
    assert type(out.extra_ignore_keys) is list


def test_resolve_strategy_resolves_interpolations() -> None:
    cfg = OmegaConf.create(
        {"head": "model.head.*", "s": {"load_optimizer": False, "extra_ignore_keys": ["${head}"]}}
    )
    assert resolve_strategy(cfg.s).extra_ignore_keys == ["model.head.*"]


def test_resolve_strategy_validates_dict_values() -> None:
    with pytest.raises(StrategyError, match="load_optimizer=True needs load_model=True"):
        resolve_strategy(OmegaConf.create({"load_model": False}))
    with pytest.raises(StrategyError, match=r"LoadStrategy\.load_model must be true or false"):
        resolve_strategy({"load_model": "maybe"})


def test_resolve_strategy_refuses_a_foreign_target() -> None:
    with pytest.raises(StrategyError, match=r"_target_ is 'my\.Other'; expected"):
        resolve_strategy({"_target_": "my.Other", "load_model": True})
    ok = resolve_strategy({"_target_": "optimus_ckpt.strategy.LoadStrategy", "strict": False})
    assert ok.strict is False


@pytest.mark.parametrize("value", [3, ["resume"], 2.5])
def test_resolve_strategy_refuses_other_types(value: object) -> None:
    with pytest.raises(StrategyError) as info:
        resolve_strategy(value)
    assert f"Cannot use {type(value).__name__} as a load strategy" in str(info.value)
    assert "eval, finetune, reset_optimizer, resume, scratch" in str(info.value)


# --- PRESETS and helpers --------------------------------------------------------------------


def test_presets_are_exactly_the_shipped_ones() -> None:
    assert sorted(PRESETS) == sorted(EXPECTED_PRESETS)
    for name, values in EXPECTED_PRESETS.items():
        assert PRESETS[name].to_dict() == values, name


def test_presets_hand_out_copies() -> None:
    a = PRESETS["finetune"]
    a.strict = True
    assert PRESETS["finetune"].strict is False
    with pytest.raises(TypeError):
        PRESETS["mine"] = a  # type: ignore[index]


def test_equality_ignores_the_schema_subclass_and_strategies_are_unhashable() -> None:
    assert LoadStrategyConfig() == LoadStrategy()
    assert LoadStrategyConfig(strict=False) != LoadStrategy()
    assert LoadStrategy() != {"load_model": True}
    with pytest.raises(TypeError):
        hash(LoadStrategy())


def test_to_dict_is_plain_and_round_trips() -> None:
    s = LoadStrategyConfig(extra_ignore_keys=["a.*"], strict=False)
    d = s.to_dict()
    assert "_target_" not in d
    assert LoadStrategy(**d) == s
    d["extra_ignore_keys"].append("b")
    assert s.extra_ignore_keys == ["a.*"]


@pytest.mark.parametrize(
    ("component", "preset", "expected"),
    [
        ("model", "eval", True),
        ("model.encoder.weight", "eval", True),
        ("optimizer", "eval", False),
        ("optimizer", "reset_optimizer", False),
        ("scheduler", "reset_optimizer", False),
        ("dataloaders.train", "reset_optimizer", True),
        ("data_sources.train", "finetune", False),
        ("metrics", "resume", True),
        ("rng", "finetune", False),  # RNG state follows load_iteration
        ("rng", "resume", True),
        ("extra", "resume", True),  # extra (EMA, grad scaler, ...) continues a run: it
        ("extra", "finetune", False),  # follows load_iteration
    ],
)
def test_loads(component: str, preset: str, expected: bool) -> None:
    assert PRESETS[preset].loads(component) is expected
