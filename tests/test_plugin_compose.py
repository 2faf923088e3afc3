"""Hydra compose-API tests: every preset's values, overrides on top of a preset, the path from a
composed node to a validated LoadStrategy, and the errors a user can hit while composing."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from plugin_support import EXPECTED_PRESETS

from optimus_ckpt import PRESETS, LoadStrategy, StrategyError, register_configs, resolve_strategy
from optimus_ckpt.strategy import conf_dir

PRIMARY = """\
defaults:
  - load_strategy: resume
  - _self_

load_from: null
"""

Compose = Callable[..., DictConfig]


@pytest.fixture
def compose_cfg(tmp_path: Path, hydra_restore_singletons: None) -> Iterator[Compose]:
    """Compose ``config`` from a primary config written into tmp_path (plus extra files)."""
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "config.yaml").write_text(PRIMARY)
    register_configs()  # what compose-API users are told to do (idempotent)

    def _compose(overrides: list[str] | None = None, files: dict[str, str] | None = None) -> Any:
        for rel, text in (files or {}).items():
            (conf / rel).parent.mkdir(parents=True, exist_ok=True)
            (conf / rel).write_text(text)
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(conf), version_base=None):
            return compose(config_name="config", overrides=overrides or [])

    yield _compose
    GlobalHydra.instance().clear()


def strategy_values(cfg: DictConfig) -> dict[str, Any]:
    data = OmegaConf.to_container(cfg.load_strategy, resolve=True)
    assert isinstance(data, dict)
    assert data.pop("_target_") == "optimus_ckpt.LoadStrategy"
    return data


def test_default_is_resume(compose_cfg: Compose) -> None:
    cfg = compose_cfg()
    assert strategy_values(cfg) == EXPECTED_PRESETS["resume"]


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_every_preset_composes_to_its_values(compose_cfg: Compose, preset: str) -> None:
    cfg = compose_cfg([f"load_strategy={preset}"])
    assert strategy_values(cfg) == EXPECTED_PRESETS[preset]
    # The Python PRESETS mapping agrees with the YAML Hydra composed.
    assert OmegaConf.to_object(cfg.load_strategy) == PRESETS[preset]


def test_presets_mapping_lists_exactly_the_options_hydra_offers(
    compose_cfg: Compose, tmp_path: Path
) -> None:
    compose_cfg()  # writes the app's primary config (and leaves nothing initialised)
    shipped = sorted(p[: -len(".yaml")] for p in os.listdir(Path(conf_dir()) / "load_strategy"))
    with initialize_config_dir(config_dir=str(tmp_path / "conf"), version_base=None):
        options = GlobalHydra.instance().config_loader().get_group_options("load_strategy")
    GlobalHydra.instance().clear()
    assert sorted(options) == sorted(PRESETS) == shipped
    # The schema lives in its own group, not among the presets.
    assert "load_strategy" not in options and "schema" not in options


@pytest.mark.parametrize("preset", sorted(EXPECTED_PRESETS))
def test_to_object_and_instantiate_give_a_validated_strategy(
    compose_cfg: Compose, preset: str
) -> None:
    cfg = compose_cfg([f"load_strategy={preset}", "load_strategy.extra_ignore_keys=[x.*]"])
    values = {**EXPECTED_PRESETS[preset], "extra_ignore_keys": ["x.*"]}
    if preset == "scratch":  # ignore rules on a strategy that loads nothing: warned, not fatal
        with pytest.warns(UserWarning, match="loads nothing"):
            as_object = OmegaConf.to_object(cfg.load_strategy)
        with pytest.warns(UserWarning, match="loads nothing"):
            made = instantiate(cfg.load_strategy)
        with pytest.warns(UserWarning, match="loads nothing"):
            assert resolve_strategy(cfg.load_strategy).to_dict() == values
    else:
        as_object = OmegaConf.to_object(cfg.load_strategy)
        made = instantiate(cfg.load_strategy)
        assert resolve_strategy(cfg.load_strategy).to_dict() == values
    assert isinstance(as_object, LoadStrategy) and as_object.to_dict() == values
    assert type(made) is LoadStrategy and made.to_dict() == values
    assert type(made.extra_ignore_keys) is list  # not a ListConfig


@pytest.mark.parametrize(
    ("overrides", "changes"),
    [
        (["load_strategy=finetune", "load_strategy.strict=true"], {"strict": True}),
        (["load_strategy=eval", "load_strategy.load_metrics=true"], {"load_metrics": True}),
        (
            ["load_strategy=finetune", "load_strategy.load_optimizer=true"],
            {"load_optimizer": True},
        ),
        (
            ["load_strategy=finetune", "load_strategy.extra_ignore_keys=[model.head.*,rng]"],
            {"extra_ignore_keys": ["model.head.*", "rng"]},
        ),
        (["load_strategy.load_optimizer=false"], {"load_optimizer": False}),
        (
            ["load_strategy=scratch", "load_strategy.load_model=true"],
            {"load_model": True},
        ),
    ],
)
def test_overrides_on_top_of_a_preset(
    compose_cfg: Compose, overrides: list[str], changes: dict[str, Any]
) -> None:
    preset = next(
        (o.split("=", 1)[1] for o in overrides if o.startswith("load_strategy=")), "resume"
    )
    cfg = compose_cfg(overrides)
    expected = {**EXPECTED_PRESETS[preset], **changes}
    assert strategy_values(cfg) == expected
    assert instantiate(cfg.load_strategy).to_dict() == expected


def test_primary_config_values_after_self_win_over_the_preset(compose_cfg: Compose) -> None:
    cfg = compose_cfg(
        files={
            "config.yaml": PRIMARY + "load_strategy:\n  strict: false\n",
        }
    )
    assert strategy_values(cfg) == {**EXPECTED_PRESETS["resume"], "strict": False}


def test_a_users_own_preset_extends_a_shipped_one(compose_cfg: Compose) -> None:
    mine = """\
defaults:
  - finetune
  - _self_

extra_ignore_keys: [model.head.*]
load_metrics: true
"""
    cfg = compose_cfg(["load_strategy=my_ft"], files={"load_strategy/my_ft.yaml": mine})
    expected = {
        **EXPECTED_PRESETS["finetune"],
        "extra_ignore_keys": ["model.head.*"],
        "load_metrics": True,
    }
    assert strategy_values(cfg) == expected
    assert instantiate(cfg.load_strategy).to_dict() == expected
    # Still typed by the schema: a wrong type in the user's preset is caught while composing.
    with pytest.raises(ConfigCompositionException):
        compose_cfg(
            ["load_strategy=bad"], files={"load_strategy/bad.yaml": mine + "strict: maybe\n"}
        )


def test_null_default_means_no_strategy_node(compose_cfg: Compose) -> None:
    primary = "defaults:\n  - load_strategy: null\n  - _self_\n"
    cfg = compose_cfg(files={"config.yaml": primary})
    assert "load_strategy" not in cfg
    cfg = compose_cfg(["load_strategy=eval"], files={"config.yaml": primary})
    assert strategy_values(cfg) == EXPECTED_PRESETS["eval"]


# --- errors ---------------------------------------------------------------------------------


def test_misspelled_preset_lists_the_options(compose_cfg: Compose) -> None:
    with pytest.raises(MissingConfigException) as info:
        compose_cfg(["load_strategy=finetun"])
    msg = str(info.value)
    assert "Could not find 'load_strategy/finetun'" in msg
    assert "Available options in 'load_strategy':\n\teval\n\tfinetune\n\treset_optimizer\n" in msg


def test_wrong_type(compose_cfg: Compose) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["load_strategy.load_model=maybe"])
    assert "Error merging override load_strategy.load_model=maybe" in str(info.value)
    cause = str(info.value.__cause__)
    assert "Value 'maybe' is not a valid bool (type str)" in cause
    assert "full_key: load_strategy.load_model" in cause


def test_misspelled_field(compose_cfg: Compose) -> None:
    with pytest.raises(ConfigCompositionException) as info:
        compose_cfg(["load_strategy.load_modle=false"])
    assert "Could not override 'load_strategy.load_modle'." in str(info.value)
    assert "Key 'load_modle' not in 'LoadStrategyConfig'" in str(info.value.__cause__)


def test_impossible_combination_composes_but_never_reaches_a_load(compose_cfg: Compose) -> None:
    cfg = compose_cfg(["load_strategy=eval", "load_strategy.load_dataloaders=true"])
    message = "load_dataloaders=True needs load_data_sources=True"
    for build in (
        lambda: OmegaConf.to_object(cfg.load_strategy),
        lambda: resolve_strategy(cfg.load_strategy),
    ):
        with pytest.raises(StrategyError, match=message):
            build()
    with pytest.raises(Exception, match=message):  # instantiate wraps it, message kept
        instantiate(cfg.load_strategy)


def test_unknown_key_added_with_plus_is_refused_by_every_route(compose_cfg: Compose) -> None:
    # Hydra accepts `+load_strategy.load_modle=false` silently (by design) ...
    cfg = compose_cfg(["+load_strategy.load_modle=false"])
    assert cfg.load_strategy.load_modle is False
    # ... so every way from the node to a strategy refuses it, naming the key.
    message = "Unknown key 'load_modle' in load_strategy. Did you mean 'load_model'?"
    for build in (
        lambda: OmegaConf.to_object(cfg.load_strategy),
        lambda: resolve_strategy(cfg.load_strategy),
    ):
        with pytest.raises(StrategyError) as info:
            build()
        assert message in str(info.value)
    with pytest.raises(Exception) as info:
        instantiate(cfg.load_strategy)
    assert message in str(info.value)
